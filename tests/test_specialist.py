"""offline-distill --specialist (Hinton et al. 2015, sections 5 and 6.1) and --init: the cluster
and its checks, the half/half enrichment and the stream's exact batch count, the pooled targets
and mapped labels, the dustbin head's start from a generalist, the student.pt record, and the
one-line errors. Tiny caches, one-epoch runs."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cache.reader import read_rows
from kdcache.offline.cli import distill_main
from kdcache.offline.dataset import ShardStream, open_caches
from kdcache.offline.losses import distillation_loss
from kdcache.offline.specialist import Cluster, Enrichment, PooledTargets, SpecialistError, dustbin_state, membership, prepare, read_cluster
from kdcache.offline.train import TrainConfig

C, SHAPE, T_S = 6, (4,), 2.0
NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]
SHARDS = (90, 17, 64, 100, 29)  # 300 rows in uneven shards


def teacher_rows(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, logits whose top class is row % 5 (class 5 never is), and labels: half unknown,
    the rest the top class but for a tenth, labelled with the next class instead."""
    rng = np.random.default_rng(seed)
    top = np.arange(rows) % 5
    logits = rng.normal(size=(rows, C)).astype(np.float32)
    logits[np.arange(rows), top] += 4.0
    labels = np.where(rng.random(rows) < 0.5, top, -1)
    flipped = (labels >= 0) & (rng.random(rows) < 0.2)
    labels[flipped] = (labels[flipped] + 1) % 5
    return rng.random((rows, *SHAPE), dtype=np.float32), logits, labels


def write_cache(directory, spec: str = "full", shards=SHARDS, **extra):
    meta = CacheMeta("f" * 64, "t", C, SHAPE, "float32", serving_temperature=T_S, logits_layout=spec, **extra)
    x, logits, labels = teacher_rows(sum(shards))
    start = 0
    with CacheWriter(directory, meta, label_names=NAMES) as writer:
        for size in shards:
            rows = slice(start, start + size)
            writer.append([f"s{i}" for i in range(start, start + size)], x[rows], logits[rows], labels[rows])
            writer.flush_shard()
            start += size
    return directory


def expected_members(classes) -> np.ndarray:
    _, logits, labels = teacher_rows(sum(SHARDS))
    return np.isin(np.where(labels >= 0, labels, logits.argmax(1)), classes)


def softmax(x, t=1.0):
    x = np.asarray(x, dtype=np.float64) / t
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- the cluster ----


def test_a_cluster_is_read_and_checked(tmp_path):
    cluster = read_cluster("3, 1", "dustbin", C)
    assert cluster == Cluster((3, 1), "dustbin", C) and cluster.width == 3 and cluster.others() == [0, 2, 4, 5]
    assert read_cluster("3,1", "full", C).width == C
    assert cluster.record() == {"classes": [3, 1], "head": "dustbin", "classes_total": C}
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": [[0, 2], [4, 5, 1]]}))
    assert read_cluster(f"@{tmp_path / 'clusters.json'}:1", "dustbin", C).classes == (4, 5, 1)
    (tmp_path / "overlap.json").write_text(json.dumps({"clusters": [[0, 2], [2, 3]]}))
    for text, head, message in [
        ("0,6", "dustbin", r"class 6 is outside \[0, 6\)"),
        ("-1", "dustbin", "class -1 is outside"),
        ("0,1,2,3,4,5", "dustbin", "names all 6 classes"),
        ("0,0", "dustbin", "given twice"),
        ("a,b", "dustbin", "expected class indices"),
        (f"@{tmp_path / 'overlap.json'}:0", "dustbin", "overlapping clusters"),
        (f"@{tmp_path / 'clusters.json'}:2", "dustbin", "holds 2 cluster"),
        ("0,1", "both", "--specialist-head must be one of dustbin, full"),
    ]:
        with pytest.raises(SpecialistError, match=message):
            read_cluster(text, head, C)


def test_labels_map_to_the_heads_outputs():
    labels = np.array([3, 1, 0, -1, 5, 3])
    assert Cluster((3, 1), "dustbin", C).map_labels(labels).tolist() == [0, 1, 2, -1, 2, 0]
    assert Cluster((3, 1), "full", C).map_labels(labels).tolist() == labels.tolist()


def test_membership_is_by_label_else_the_teachers_top_class(tmp_path):
    readers, meta = open_caches([str(write_cache(tmp_path / "c"))])
    found = np.concatenate(membership(readers[0].shards, meta, read_cluster("0,3", "dustbin", C)))
    assert found.tolist() == expected_members([0, 3]).tolist()
    kept = np.concatenate(membership(readers[0].shards, meta, read_cluster("0,3", "dustbin", C), label_fraction=0.3, label_seed=1))
    assert kept.tolist() != found.tolist()  # a dropped label no longer decides


# ---- the batches ----


def stream_of(directory, cluster_classes, *, rank=0, world=1, seed=0):
    readers, meta = open_caches([str(directory)])
    cluster = read_cluster(cluster_classes, "dustbin", C)
    enrichment = Enrichment(membership([s for r in readers for s in r.shards], meta, cluster), seed)
    stream = ShardStream.from_readers(
        readers, meta, batch_size=16, shuffle_buffer=40, block_rows=16, with_ids=True, rank=rank, world_size=world, seed=seed,
        repeats=enrichment,
    )  # fmt: skip
    return stream, enrichment


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 0)])
def test_an_epoch_is_half_cluster_samples_each_row_as_often_as_drawn_and_num_batches_exact(tmp_path, world, workers):
    directory = write_cache(tmp_path / "c")
    members = expected_members([0])
    ids = {f"s{i}": bool(m) for i, m in enumerate(members)}
    for epoch in (0, 1):
        seen: Counter[str] = Counter()
        for rank in range(world):
            stream, enrichment = stream_of(directory, "0", rank=rank, world=world)
            stream.set_epoch(epoch)
            batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
            assert stream.num_batches(workers) == stream.num_batches(workers, epoch) == len(batches)
            seen.update(i for b in batches for i in b["ids"])
        assert enrichment.fraction == pytest.approx(members.mean())
        drawn = Counter()
        for shard, info in enumerate(stream.shards):
            shard_ids = read_rows(info, ("ids",))["ids"]
            drawn.update({i: int(n) for i, n in zip(shard_ids, enrichment.counts(shard, epoch), strict=True) if n})
        assert seen == drawn  # every row exactly as often as its count, across ranks and workers
        total = sum(seen.values())
        inside = sum(n for i, n in seen.items() if ids[i])
        assert abs(total - len(ids)) < 0.1 * len(ids)  # an epoch is still about N samples
        assert abs(inside / total - 0.5) < 0.06, inside / total  # about half the cluster's (f is about 0.2)
    counts = [enrichment.counts(0, e) for e in (0, 1)]
    assert not np.array_equal(*counts) and np.array_equal(counts[0], Enrichment(enrichment.members, 0).counts(0, 0))


# ---- the targets ----


def pooled(p: np.ndarray, classes) -> np.ndarray:
    others = [c for c in range(C) if c not in classes]
    return np.concatenate([p[:, list(classes)], p[:, others].sum(1, keepdims=True)], axis=1)


def test_a_full_caches_target_is_the_pooled_softmax_at_any_temperature(tmp_path):
    reader = CacheReader(write_cache(tmp_path / "c"))
    stored = reader.read(("labels", "logits"))
    cluster, t = Cluster((3, 1), "dustbin", C), 3.0
    out = PooledTargets(cluster, reader.meta.target_layout, t)({"labels": stored["labels"], "logits": stored["logits"]})
    assert out["logits"].dtype == np.float32 and out["logits"].shape == (300, 3)
    expected = pooled(softmax(stored["logits"], t), (3, 1))
    np.testing.assert_allclose(softmax(out["logits"], t), expected, rtol=1e-6, atol=1e-9)
    assert out["labels"].tolist() == cluster.map_labels(stored["labels"]).tolist()
    # The unchanged full-logits soft term is then T^2 KL(pooled p || softmax(z/T)).
    z = torch.randn(300, 3, dtype=torch.float64)
    loss = distillation_loss(z, torch.from_numpy(out["logits"]), torch.full((300,), -1), t, 1.0)
    log_q = torch.log_softmax(z / t, -1).numpy()
    assert float(loss) == pytest.approx(t**2 * (expected * (np.log(expected) - log_q)).sum(1).mean(), rel=1e-5)


def test_topk_and_sampled_targets_are_their_decoded_distributions_pooled(tmp_path):
    _, logits, _ = teacher_rows(sum(SHARDS))
    truth = softmax(logits, T_S)
    classes = (3, 5)
    for spec in ("topk:2", "sampled:16"):
        reader = CacheReader(write_cache(tmp_path / spec.replace(":", ""), spec, **({"target_seed": 9} if spec[0] == "s" else {})))
        layout = reader.meta.target_layout
        fields = reader.read(("labels", *layout.fields(C)))
        out = PooledTargets(Cluster(classes, "dustbin", C), layout, T_S)(dict(fields))
        got = softmax(out["logits"], T_S)
        if spec.startswith("topk"):  # the top two exactly, the tail's mass spread evenly over the other four
            top = fields["topk_indices"].astype(int)
            tail = np.exp(fields["tail_logmass"].astype(np.float64)) / (C - 2)
            head = np.stack([np.where((top == c).any(1), truth[:, c], tail) for c in classes], 1)
            atol = 1e-6
        else:  # the draw frequencies
            counts = fields["sample_counts"].astype(np.float64)
            head = np.stack([(counts * (fields["sample_indices"] == c)).sum(1) / 16 for c in classes], 1)
            atol = 1e-9
        np.testing.assert_allclose(got, np.concatenate([head, 1 - head.sum(1, keepdims=True)], 1), atol=atol)


# ---- the start ----


@pytest.mark.parametrize(("arch", "shape"), [("mlp-small", (4,)), ("cnn-small", (1, 8, 8))])
def test_a_dustbin_head_starts_with_the_generalists_cluster_logits(arch, shape):
    torch.manual_seed(0)
    generalist = models.build(arch, shape, C).eval()
    cluster = Cluster((4, 1), "dustbin", C)
    specialist = models.build(arch, shape, cluster.width)
    specialist.load_state_dict(dustbin_state(generalist, cluster))
    specialist.eval()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        g, s = generalist(x), specialist(x)
    torch.testing.assert_close(s[:, :2], g[:, [4, 1]])
    torch.testing.assert_close(s[:, 2], g[:, [0, 2, 3, 5]].mean(1) + math.log(4))


# ---- offline-distill ----


def distill(*args) -> int:
    return distill_main(["--no-progress", "--no-export", "--workers", "0", "--epochs", "1", "--batch-size", "32", *map(str, args)])


@pytest.fixture(scope="module")
def generalist(tmp_path_factory):
    root = tmp_path_factory.mktemp("specialist")
    cache = write_cache(root / "cache")
    x, _, _ = teacher_rows(80, seed=1)
    np.savez(root / "eval.npz", inputs=x, labels=np.arange(80) % C)
    assert distill("--cache", cache, "--student", "mlp-small", "--out", root / "gen") == 0
    return {"root": root, "cache": cache, "eval": root / "eval.npz", "pt": root / "gen" / "student.pt"}


def test_a_specialist_run_from_a_generalist_records_its_cluster(generalist, tmp_path, capsys):
    out = tmp_path / "s0"
    assert (
        distill(
            "--cache",
            generalist["cache"],
            "--specialist",
            "0,1",
            "--specialist-head",
            "dustbin",
            "--init",
            generalist["pt"],
            "--out",
            out,
            "--eval",
            generalist["eval"],
        )
        == 0
    )
    printed = capsys.readouterr().out
    f = expected_members([0, 1]).mean()
    assert (
        f"specialist: classes 0 (ant), 1 (bee) of 6; head dustbin (3 outputs: these and one for the other 4); cluster fraction f={f:.3f}"
        in printed
    )
    assert f"init: from {generalist['pt']} (mlp-small): every weight; the classifier's rows" in printed
    record = torch.load(out / "student.pt", weights_only=True)
    assert record["arch"] == "mlp-small" and record["num_classes"] == 3
    assert {k: v for k, v in record["specialist"].items() if k != "prior_shift"} == {
        "classes": [0, 1],
        "head": "dustbin",
        "classes_total": 6,
    }
    model = models.build(record["arch"], record["input_shape"], record["num_classes"])
    model.load_state_dict(record["state_dict"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["specialist"]["classes"] == [0, 1] and metrics["specialist"]["cluster_fraction"] == pytest.approx(f)
    assert metrics["student"] == "mlp-small" and metrics["init"] == str(generalist["pt"])
    # --eval scores the dustbin head against the labels mapped to it
    eval_set = np.load(generalist["eval"])
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(eval_set["inputs"])).argmax(1).numpy()
    mapped = Cluster((0, 1), "dustbin", C).map_labels(eval_set["labels"])
    assert metrics["eval_accuracy"] == pytest.approx((predicted == mapped).mean())

    full = tmp_path / "full"
    assert (
        distill("--cache", generalist["cache"], "--specialist", "2", "--specialist-head", "full", "--init", generalist["pt"], "--out", full)
        == 0
    )
    record = torch.load(full / "student.pt", weights_only=True)
    assert record["num_classes"] == C and record["specialist"]["classes"] == [2] and record["specialist"]["head"] == "full"


def test_a_specialist_resumes_only_as_the_same_specialist(generalist, tmp_path, capsys):
    out = tmp_path / "s"
    assert distill("--cache", generalist["cache"], "--specialist", "0,1", "--out", out, "--student", "mlp-small") == 0
    capsys.readouterr()
    assert distill("--cache", generalist["cache"], "--specialist", "0,2", "--out", out, "--student", "mlp-small", "--resume") == 2
    assert "was made with --student mlp-small --epochs 1 --batch-size 32 " in capsys.readouterr().err
    assert distill("--cache", generalist["cache"], "--specialist", "0,1", "--out", out, "--student", "mlp-small", "--resume") == 0
    assert f"resuming {out} after epoch 1" in capsys.readouterr().out


def test_init_alone_starts_from_the_generalists_weights(generalist, tmp_path):
    readers, meta = open_caches([str(generalist["cache"])])
    config = TrainConfig(caches=[str(generalist["cache"])], student=None, init=str(generalist["pt"]), temperature=4.0)
    start = prepare(config, readers, meta)
    assert start.arch == "mlp-small" and start.cluster is None and start.enrichment is None and start.transform is None
    record = torch.load(generalist["pt"], weights_only=True)
    for name, tensor in start.build_student().state_dict().items():
        assert torch.equal(tensor, record["state_dict"][name]), name


def other_shape_record(root):
    path = root / "other.pt"
    meta = CacheMeta("f" * 64, "t", C, (8,), "float32")
    torch.save(models.student_record("mlp-small", models.build("mlp-small", (8,), C), meta, temperature=1.0, alpha=1.0), path)
    return path


def overlapping_clusters(root):
    (root / "overlap.json").write_text(json.dumps({"clusters": [[0, 1], [1, 2]]}))
    return root / "overlap.json"


def code_arch_record(root):
    path = root / "code.pt"
    record = torch.load(root / "gen" / "student.pt", weights_only=True)
    torch.save({**record, "arch": "not_a_module_anywhere:make"}, path)
    return path


ERRORS = {
    "class out of range": (lambda g: ["--specialist", "0,6"], r"--specialist '0,6': class 6 is outside [0, 6)"),
    "all classes": (lambda g: ["--specialist", "0,1,2,3,4,5"], "names all 6 classes of the cache"),
    "no sample in the cluster": (lambda g: ["--specialist", "5"], "no sample of the cache belongs to the cluster"),
    "every sample in the cluster": (lambda g: ["--specialist", "0,1,2,3,4"], "every sample of the cache belongs to the cluster"),
    "overlapping clusters": (
        lambda g: ["--specialist", f"@{overlapping_clusters(g['root'])}:0"],
        "overlapping clusters: class 1 is in both cluster 0 and cluster 1",
    ),
    "mse with a dustbin": (
        lambda g: ["--specialist", "0,1", "--specialist-head", "dustbin", "--loss", "mse"],
        "--loss mse matches the teacher's logits",
    ),
    "init of another input contract": (
        lambda g: ["--specialist", "0,1", "--init", other_shape_record(g["root"])],
        "a student from another input contract: it takes [8] float32",
    ),
    "student other than the init's": (
        lambda g: ["--specialist", "0,1", "--init", g["pt"], "--student", "mlp"],
        "holds a 'mlp-small' student, but --student says 'mlp'",
    ),
    "init from a specialist": (lambda g: ["--init", g["root"] / "spec" / "student.pt"], "a student of 3 classes (a specialist's"),
    "init missing": (lambda g: ["--init", g["root"] / "none.pt"], "none.pt: no such file"),
    "code in the init": (lambda g: ["--init", code_arch_record(g["root"])], "names code to import"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_bad_specialist_or_init_is_one_line_and_writes_nothing(case, generalist, tmp_path, capsys):
    if case == "init from a specialist" and not (generalist["root"] / "spec" / "student.pt").exists():
        assert (
            distill(
                "--cache", generalist["cache"], "--specialist", "0,1", "--specialist-head", "dustbin", "--out", generalist["root"] / "spec"
            )
            == 0
        )
    make_args, expected = ERRORS[case]
    args = make_args(generalist)
    capsys.readouterr()
    assert distill("--cache", generalist["cache"], *args, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("offline-distill: error: ") and expected in err, err
    assert not (tmp_path / "run").exists()


def test_the_enriched_prior_is_undone_in_the_saved_head(generalist, tmp_path):
    """Hinton et al., section 5: the batches oversample one side; student.pt's bias of the
    outputs outside the cluster carries log((1 - f) / f), so that a sample's probabilities are
    the cache's mix again (the final bias differs from the last checkpoint's by exactly that)."""
    out = tmp_path / "s"
    assert (
        distill(
            "--cache", generalist["cache"], "--specialist", "0,1", "--specialist-head", "dustbin", "--init", generalist["pt"], "--out", out
        )
        == 0
    )
    record = torch.load(out / "student.pt", weights_only=True)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    f = json.loads((out / "metrics.json").read_text())["specialist"]["cluster_fraction"]
    name = next(k for k in record["state_dict"] if k.endswith(".bias") and record["state_dict"][k].numel() == 3)
    shift = record["state_dict"][name] - checkpoint[name]
    assert record["specialist"]["prior_shift"] == pytest.approx(math.log((1 - f) / f))
    torch.testing.assert_close(shift, torch.tensor([0.0, 0.0, math.log((1 - f) / f)]))
