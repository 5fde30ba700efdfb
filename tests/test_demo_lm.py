"""``distill-demo --task lm``'s own parts: the corpora and their split, the BPE tokenizer, packing
into sequences, and a tiny GPT-2 teacher that saves and loads with ``transformers``. The pipeline
itself (teacher-serve, teacher-push, offline-distill --task lm) is not run here."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli_help import help_problems  # noqa: E402

from kdcache.demo import corpora, digits, lm  # noqa: E402

CODE = 'def f(x):\n    """Dé jà vu, 東京."""\n\treturn {"a": [x ** 2, None]}  # done\n\n\n'


@pytest.fixture(scope="module")
def small_corpus() -> tuple[list[str], list[str]]:
    return corpora.load_corpus("python-stdlib", train_bytes=120_000, test_bytes=30_000)


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return corpora.train_tokenizer(small_corpus[0], vocab_size=600)


def test_split_is_disjoint_by_document_deterministic_and_within_budget():
    docs = [(f"pkg/mod{i}.py", f"# mod{i}\n" + "x = 1\n" * 50) for i in range(400)]
    train, test = corpora.split_documents(docs, train_bytes=10**9, test_bytes=10**9)
    names = {side: {text.split("\n", 1)[0][2:] for text in texts} for side, texts in (("train", train), ("test", test))}
    assert not names["train"] & names["test"] and len(names["train"]) + len(names["test"]) == 400
    assert all(corpora.split_bucket(f"pkg/{name}.py") < corpora.TEST_PERCENT for name in names["test"])
    assert 0.05 < len(test) / 400 < 0.15
    assert (train, test) == corpora.split_documents(list(reversed(docs)), 10**9, 10**9)  # the input's order does not matter
    capped, _ = corpora.split_documents(docs, train_bytes=1000, test_bytes=0)
    assert sum(len(text.encode()) for text in capped) == 1000


@pytest.mark.parametrize("name", corpora.CORPORA)
def test_corpora_load_deterministically(name, small_corpus):
    train, test = small_corpus if name == "python-stdlib" else corpora.load_corpus(name, train_bytes=120_000, test_bytes=30_000)
    assert train and test and not set(train) & set(test)
    assert sum(len(t.encode()) for t in train) <= 120_000 and sum(len(t.encode()) for t in test) <= 30_000
    assert (train, test) == corpora.load_corpus(name, train_bytes=120_000, test_bytes=30_000)
    if name == "python-stdlib":
        assert any("def " in text for text in train)
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.load_corpus("nope")


def test_tokenizer_honours_the_vocabulary_and_round_trips(tokenizer, small_corpus, tmp_path):
    assert tokenizer.get_vocab_size() == 600 and tokenizer.token_to_id(corpora.EOS) == 0
    for text in (CODE, small_corpus[1][0][:2000]):
        ids = tokenizer.encode(text).ids
        assert len(ids) < len(text.encode()) and tokenizer.decode(ids) == text
    corpora.save_tokenizer(tokenizer, tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.eos_token == corpora.EOS and loaded.eos_token_id == 0 and len(loaded) == 600
    assert loaded(CODE)["input_ids"] == tokenizer.encode(CODE).ids and loaded.decode(loaded(CODE)["input_ids"]) == CODE


def test_pack_joins_documents_with_eos_into_full_rows(tokenizer):
    texts = [CODE * 3, "print('hello')\n", CODE]
    total = sum(len(tokenizer.encode(text).ids) + 1 for text in texts)
    rows = corpora.pack(tokenizer, texts, seq_len=16)
    assert rows.dtype == np.int64 and rows.shape == (total // 16, 16)
    assert (rows == 0).sum() == sum(1 for i in np.cumsum([len(tokenizer.encode(t).ids) + 1 for t in texts]) if i <= rows.size)
    assert tokenizer.decode(rows.reshape(-1)[: len(tokenizer.encode(texts[0]).ids)].tolist()) == texts[0]
    assert corpora.pack(tokenizer, texts, seq_len=16, max_sequences=2).shape == (2, 16)
    assert corpora.pack(tokenizer, ["x"], seq_len=16).shape == (0, 16)


def test_tiny_teacher_trains_saves_and_loads(tokenizer, small_corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    data = corpora.pack(tokenizer, small_corpus[0], seq_len=32, max_sequences=64)
    held_out = corpora.pack(tokenizer, small_corpus[1], seq_len=32, max_sequences=8)
    model = lm.build_teacher(600, seq_len=32, n_layer=1, n_embd=32, n_head=2)
    before = lm.perplexity(model, held_out)
    lm.train_lm(model, data, steps=30, batch=8, lr=3e-3)
    after = lm.perplexity(model, held_out)
    assert math.isfinite(after) and after < before
    model.save_pretrained(str(tmp_path))
    corpora.save_tokenizer(tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True)
    assert loaded.config.vocab_size == 600 and loaded.config.n_positions == 32
    rows = torch.from_numpy(held_out[:2])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=rows).logits, model(input_ids=rows).logits, atol=1e-5)
    assert lm.perplexity(loaded, held_out) == pytest.approx(after, rel=1e-5)


def test_distill_demo_task_lm_has_its_own_options(capsys):
    assert help_problems(lm.lm_parser()) == []
    with pytest.raises(SystemExit) as exited:
        digits.main(["--task", "lm", "--help"])
    assert exited.value.code == 0 and capsys.readouterr().out == lm.lm_parser().format_help()
    with pytest.raises(SystemExit) as exited:
        digits.main(["--task", "lm", "--seeds", "0"])
    assert exited.value.code == 2 and "--seeds must be >= 1" in capsys.readouterr().err
    assert digits.task_of(["--out", "x"]) == "digits" and digits.task_of(["--task=lm"]) == "lm"


def test_table_of_a_summary():
    summary = {
        "settings": {"student": lm.STUDENT, "seeds": 2, "temperature": 1.0, "device": "cpu", "recipe": {"epochs": 6, "lr": 0.003}},
        "data": {"corpus": "python-stdlib", "train_tokens": 565_248, "bytes_per_token": 3.54, "transfer_tokens": 131_072, "eval_sequences": 256,
                 "seq_len": 128, "vocab_size": 4096},
        "teacher": {**lm.TEACHER, "params": 4_240_896, "steps": 340, "eval_perplexity": 143.5},
        "cache": {"targets": "topk:16", "bytes": 14_279_527, "bytes_per_token": 108.9, "full_float32_bytes_per_token": 16_384},
        "arms": {"distilled": {"perplexities": [206.0, 208.0], "mean": 207.0, "std": 1.41}, "ce": {"perplexities": [235.1], "mean": 235.1, "std": 0.0}},
        "gain": 28.1, "seconds": {"data": 4.0, "teacher": 180.0}, "files": {"summary": "out/summary.json"},
    }  # fmt: skip
    table = lm.format_table(summary)
    assert "eval perplexity 143.50" in table and "eval perplexity 207.00 ± 1.41  (206.00, 208.00)" in table
    assert "108.9 bytes/token" in table and "+28.10" in table and "time: total" in table and "184.0 s" in table
