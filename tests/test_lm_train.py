"""offline-distill --task lm, in process: tiny token caches of a bigram teacher (a fixed next-token
distribution that generates the sequences and whose logits are cached), a few steps each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cli import distill_main
from kdcache.offline.dataset import ShardStream, shuffle_rows
from kdcache.offline.lm.evaluate import evaluate_lm, load_lm_eval
from kdcache.offline.lm.loss import LMObjective
from kdcache.offline.lm.student import GPT, StudentError, parse_student
from kdcache.offline.lm.train import student_from_record
from kdcache.offline.losses import distillation_loss
from kdcache.offline.step import to_device

V, L = 64, 16
GPT_SMALL = "gpt:layers=1,dim=32,heads=2"


def bigram(seed: int = 0, classes: int = V) -> np.ndarray:
    """Peaked next-token logits [V, V]; rows of classes >= ``classes`` never drawn nor predicted."""
    logits = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * 3
    logits[:, classes:] = -30.0
    return logits


def sample(table: np.ndarray, n: int, seed: int, classes: int = V, ragged: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences drawn from the bigram chain, half of them shorter than L (0 beyond)."""
    rng = np.random.default_rng(seed)
    probs = np.exp(table - table.max(1, keepdims=True))
    cdf = (probs / probs.sum(1, keepdims=True)).cumsum(1)
    ids = np.zeros((n, L), dtype=np.int64)
    ids[:, 0] = rng.integers(0, classes, n)
    for t in range(1, L):
        ids[:, t] = np.minimum((cdf[ids[:, t - 1]] < rng.random(n)[:, None]).sum(1), V - 1)
    lengths = np.full(n, L)
    if ragged:
        lengths[n // 2 :] = rng.integers(2, L, n - n // 2)
    ids[np.arange(L)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def write_cache(directory, table, ids, lengths, layout="topk:8", fingerprint="ab" * 32):
    meta = CacheMeta(fingerprint, "bigram", V, (L,), "int64", logits_layout=layout, task="lm", tokenizer_fingerprint="cd" * 32)
    writer = CacheWriter(directory, meta)
    writer.append([f"s{i}" for i in range(len(ids))], ids, table[ids], lengths=lengths)
    writer.close()
    return str(directory)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The students are tiny: one thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    table = bigram()
    files = {"root": root, "table": table}
    files["cache"] = write_cache(root / "cache", table, *sample(table, 96, seed=1))
    files["eval_cache"] = write_cache(root / "eval_cache", table, *sample(table, 24, seed=2))
    ids, lengths = sample(table, 48, seed=3)
    np.savez(root / "eval.npz", input_ids=ids, lengths=lengths)
    files["eval"] = str(root / "eval.npz")
    small = bigram(classes=48)  # every token and top-k index below 48
    files["small_cache"] = write_cache(root / "small", small, *sample(small, 32, seed=4, classes=48))
    meta = CacheMeta("ef" * 32, "classifier", 10, (4,), "float32")
    writer = CacheWriter(root / "classify", meta)
    writer.append(["a", "b"], np.zeros((2, 4), np.float32), np.zeros((2, 10), np.float32))
    writer.close()
    files["classify"] = str(root / "classify")
    return files


def distill(capsys, *args: object) -> tuple[int, str]:
    code = distill_main(["--no-progress", *map(str, args)])
    return code, capsys.readouterr().err


def lm_args(lm, out, *extra: object) -> list[object]:
    return ["--task", "lm", "--cache", lm["cache"], "--out", out, "--batch-size", 16, "--max-steps", 6, "--student", GPT_SMALL, *extra]


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_distill_writes_metrics_and_a_student_that_reloads(lm, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = distill(capsys, *lm_args(lm, out, "--eval", lm["eval"]))
    assert code == 0, err
    m = metrics(out)
    assert math.isfinite(m["eval_perplexity"]) and 1 < m["eval_perplexity"] < 2 * V
    assert m["task"] == "lm" and m["steps"] == 6 and m["student"] == GPT_SMALL and m["eval_agreement"] is None
    assert m["train_tokens"] > 0 and m["tokens_per_s"] > 0 and m["alpha"] == m["recipe"]["alpha"]
    assert m["tokenizer_fingerprint"] == "cd" * 32 and m["temperature"] == 1.0
    assert [json.loads(line)["steps"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 6
    record = torch.load(out / "student.pt", weights_only=True)
    assert (record["task"], record["arch"], record["vocab_size"], record["context"]) == ("lm", GPT_SMALL, V, L)
    assert record["format"] == "kd-student" and record["input_shape"] == [L] and record["input_dtype"] == "int64"
    student = student_from_record(record)
    meta = CacheReader(lm["cache"]).meta
    again = evaluate_lm(student, load_lm_eval(lm["eval"], meta, V, L), torch.device("cpu"), V)
    assert again["eval_perplexity"] == pytest.approx(m["eval_perplexity"], rel=1e-5)


@pytest.mark.parametrize("layout", ["sampled:16", "full"])
def test_the_other_layouts_train(lm, tmp_path, capsys, layout):
    """A full-logits cache trains a larger vocabulary too (its extra classes get probability 0),
    never a smaller one."""
    cache = write_cache(tmp_path / "cache", lm["table"], *sample(lm["table"], 32, seed=5), layout=layout)
    common = ["--task", "lm", "--cache", cache, "--max-steps", 2, "--allow-vocab-padding"]
    code, err = distill(capsys, *common, "--out", tmp_path / "run", "--student", f"{GPT_SMALL},vocab=80")
    assert code == 0, err
    assert math.isfinite(metrics(tmp_path / "run")["train_loss"])
    if layout == "full":
        code, err = distill(capsys, *common, "--out", tmp_path / "smaller", "--student", f"{GPT_SMALL},vocab=48")
        assert code == 2 and "cannot train a smaller vocabulary" in err


def test_the_loss_is_the_classification_soft_term_per_token_plus_the_next_token_ce(lm):
    """alpha 1: distillation_loss over the valid tokens (labels unknown); alpha 0: the CE of t vs t+1."""
    reader = CacheReader(lm["cache"])
    batch = next(iter(ShardStream.from_readers([reader], reader.meta, batch_size=8, shuffle=False)))
    target = reader.meta.layout.target(batch)
    target["inner"] = to_device(target["inner"], torch.device("cpu"))
    ids = batch["inputs"].long()
    logits = torch.randn(8, L, V)
    mask = target["mask"]
    soft = LMObjective(1.0, 1.0, "topk")(logits, target, ids).loss
    expected = distillation_loss(logits[mask], target["inner"], torch.full((int(mask.sum()),), -1), 1.0, 1.0, targets="topk")
    torch.testing.assert_close(soft, expected)
    ce = LMObjective(1.0, 0.0, "topk")(logits, target, ids).loss
    rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits[rows, cols], ids[rows, cols + 1]))


def test_an_interrupted_run_resumes_to_the_same_student(lm, tmp_path, capsys, monkeypatch):
    from kdcache.offline.lm import train

    args = ["--epochs", 2, "--max-steps", 4, "--batch-size", 32]  # 3 steps in epoch 1, 1 in epoch 2
    assert distill(capsys, *lm_args(lm, tmp_path / "straight", *args))[0] == 0
    finish = train.train_epoch

    def interrupted(run, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return finish(run, epoch)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    assert distill(capsys, *lm_args(lm, tmp_path / "resumed", *args))[0] == 130
    monkeypatch.setattr(train, "train_epoch", finish)
    code, err = distill(capsys, *lm_args(lm, tmp_path / "resumed", *args))
    assert code == 2 and "--resume" in err
    assert distill(capsys, *lm_args(lm, tmp_path / "resumed", *args, "--resume"))[0] == 0
    straight, resumed = (torch.load(tmp_path / name / "student.pt", weights_only=True)["state_dict"] for name in ("straight", "resumed"))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert metrics(tmp_path / "resumed")["steps"] == 4


def test_a_vocabulary_that_differs_is_refused_with_both_sizes(lm, tmp_path, capsys):
    code, err = distill(capsys, *lm_args(lm, tmp_path / "r", "--student", f"{GPT_SMALL},vocab=80"))
    assert code == 2 and "80" in err and "64" in err and "--allow-vocab-padding" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_vocab_padding_is_accepted_only_when_every_stored_index_fits(lm, tmp_path, capsys):
    code, err = distill(capsys, *lm_args(lm, tmp_path / "larger", "--student", f"{GPT_SMALL},vocab=80", "--allow-vocab-padding"))
    assert code == 0, err
    assert metrics(tmp_path / "larger")["student_vocab_size"] == 80
    # smaller than the cache's: refused when the cache holds an index >= 48, with where it is ...
    code, err = distill(capsys, *lm_args(lm, tmp_path / "refused", "--student", f"{GPT_SMALL},vocab=48", "--allow-vocab-padding"))
    assert code == 2 and "not below 48" in err and "shard-" in err and "row " in err and "position " in err
    # ... and accepted on a cache whose tokens and top-k indices are all below 48
    small = ["--task", "lm", "--cache", lm["small_cache"], "--out", tmp_path / "small", "--max-steps", 2, "--allow-vocab-padding"]
    code, err = distill(capsys, *small, "--student", f"{GPT_SMALL},vocab=48")
    assert code == 0, err


def test_the_task_must_be_the_caches(lm, tmp_path, capsys):
    code, err = distill(capsys, "--task", "lm", "--cache", lm["classify"], "--out", tmp_path / "a", "--student", GPT_SMALL)
    assert code == 2 and "task classify" in err and len(err.strip().splitlines()) == 1
    code, err = distill(capsys, "--task", "classify", "--cache", lm["cache"], "--out", tmp_path / "b")
    assert code == 2 and "task lm" in err
    code, err = distill(capsys, "--cache", lm["classify"], "--out", tmp_path / "c", "--max-steps", 3)
    assert code == 2 and "--max-steps does not apply to --task classify" in err
    code, err = distill(capsys, *lm_args(lm, tmp_path / "d", "--label-fraction", 0.5))
    assert code == 2 and "--label-fraction does not apply to --task lm" in err


def test_eval_on_a_cache_reports_the_agreement_with_the_teacher(lm, tmp_path, capsys):
    """Without --task, a token cache is trained as one (and --shuffle-mb sets the window)."""
    args = ["--cache", lm["cache"], "--out", tmp_path / "r", "--max-steps", 4, "--student", GPT_SMALL, "--shuffle-mb", 0.01]
    code, err = distill(capsys, *args, "--eval", lm["eval_cache"])
    assert code == 0, err
    m = metrics(tmp_path / "r")
    assert m["task"] == "lm" and 0.0 <= m["eval_agreement"] <= 1.0 and math.isfinite(m["eval_perplexity"])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"tokens": np.zeros((2, 4), np.int64)}, "has no 'input_ids' array"),
        ({"input_ids": np.full((2, 4), V, np.int64)}, "outside the vocabulary [0, 64)"),
        ({"input_ids": np.zeros((2, L + 1), np.int64)}, "longer than the student's context of 16"),
        ({"input_ids": np.zeros((2, 4), np.int64), "lengths": np.array([0, 4])}, "lengths must be 2 integers in [1, 4]"),
    ],
)
def test_a_bad_eval_file_is_refused_in_one_line(lm, tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "eval.npz", **arrays)
    code, err = distill(capsys, *lm_args(lm, tmp_path / "r", "--eval", tmp_path / "eval.npz"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_student_specs():
    assert parse_student("gpt:layers=2,dim=64,heads=4,dropout=0.1").params == {"layers": 2, "dim": 64, "heads": 4, "dropout": 0.1}
    for bad in ("gpt:layers=2", "gpt:layers=2,dim=64,heads=3", "gpt:layers=x,dim=64,heads=4", "gpt:size=3", "mlp", "hf:"):
        with pytest.raises(StudentError, match="gpt:layers=L,dim=D,heads=H|multiple of heads"):
            parse_student(bad)
    model = GPT(V, L, layers=1, dim=32, heads=2)
    assert model.head.weight is model.tokens.weight  # tied
    ids = torch.randint(0, V, (2, L))
    out = model(ids)
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % V
    assert out.shape == (2, L, V) and torch.allclose(model(changed)[:, :-1], out[:, :-1], atol=1e-6)  # causal


def test_an_hf_student_is_saved_with_save_pretrained(lm, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=V, n_positions=L, n_layer=1, n_embd=32, n_head=2, bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path / "config")
    code, err = distill(capsys, *lm_args(lm, tmp_path / "r", "--student", f"hf:{tmp_path / 'config'}", "--eval", lm["eval"]))
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "student").eval()
    data = np.load(lm["eval"])
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"])).logits
    ids, lengths = torch.from_numpy(data["input_ids"]), torch.from_numpy(data["lengths"])
    predicted = torch.arange(L)[None, 1:] < lengths[:, None]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][predicted], ids[:, 1:][predicted])
    assert math.exp(float(ce)) == pytest.approx(metrics(tmp_path / "r")["eval_perplexity"], rel=1e-4)


def test_the_shuffle_window_is_bounded_in_bytes(lm):
    meta = CacheReader(lm["cache"]).meta
    assert shuffle_rows(meta, 100 * meta.row_bytes()) == 100
    assert shuffle_rows(meta, 1) == 1 and shuffle_rows(meta, 1 << 30, shuffle_buffer=7) == 7
    reader = CacheReader(lm["cache"])
    assert ShardStream.from_readers([reader], meta, batch_size=8, shuffle_bytes=20 * meta.row_bytes()).shuffle_buffer == 20
    assert ShardStream.from_readers([reader], meta, batch_size=8, shuffle_bytes=1).shuffle_buffer == 8  # at least one batch


def test_distillation_beats_the_next_token_alone_on_a_bigram_teacher(lm, tmp_path, capsys):
    """The teacher's cached logits are the true next-token distribution: at the same few steps,
    the distilled student's held-out perplexity is lower than the cross-entropy-only one's."""
    ppl = {}
    for alpha in (0.0, 0.9):  # --alpha 0: the cross-entropy-only student, with the same options
        out = tmp_path / f"a{alpha}"
        code, err = distill(capsys, *lm_args(lm, out, "--eval", lm["eval"], "--max-steps", 20, "--lr", 1e-2, "--alpha", alpha))
        assert code == 0, err
        assert metrics(out)["alpha"] == alpha
        ppl[alpha] = metrics(out)["eval_perplexity"]
    assert ppl[0.9] < 0.9 * ppl[0.0], ppl  # 20 vs 26 (seeds 0-2: 0.75-0.80)
