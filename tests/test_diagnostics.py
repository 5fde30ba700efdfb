"""Soft-target statistics and the warnings they raise (``offline.cache.diagnostics``): their
figures against formulas written out here, for every layout and a cache of views; the warnings
in ``cache-inspect`` (text and JSON), ``offline-distill`` (output and metrics.json) and
``teacher-serve``'s log; the journal's samples counted by ``cache-inspect``; and a closed pipe."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from conftest import BIN, small_float_teacher

from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cache.diagnostics import (
    LOW_AGREEMENT,
    NEAR_ONE_HOT,
    SoftTargetAccumulator,
    SoftTargetWatch,
    sample_size,
    soft_target_warnings,
)
from kdcache.offline.cli import CLOSED_PIPE, inspect_main
from kdcache.offline.journal import Journal, encode_record

T = 4.0
CLASSES = 10


def softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(logits: np.ndarray, labels: np.ndarray, t: float = T) -> tuple[float, float, float]:
    """Mean top-1, mean entropy, label agreement over every distribution (every view)."""
    p = softmax(logits, t).reshape(-1, logits.shape[-1])
    views = p.shape[0] // len(labels)
    per_view = np.repeat(labels, views)
    known = per_view >= 0
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    return p.max(axis=1).mean(), entropy.mean(), (p[known].argmax(axis=1) == per_view[known]).mean()


def teacher_outputs(n: int, views: int = 1, scale: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a plausible teacher, and labels it mostly agrees with (a fifth are wrong, a fifth unknown)."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, views, CLASSES) if views > 1 else (n, CLASSES)) * scale).astype(np.float32)
    labels = logits.reshape(n, -1, CLASSES).mean(axis=1).argmax(axis=1)
    wrong = rng.random(n) < 0.2
    labels[wrong] = (labels[wrong] + 1) % CLASSES
    labels[rng.random(n) < 0.2] = -1
    return logits, labels.astype(np.int64)


def write_cache(
    directory, logits, labels, layout: str = "full", views: int = 1, max_samples: int = 64, dtype: str = "float32"
) -> CacheMeta:
    augment = None
    if views > 1:
        from kdcache.offline.cache.views import parse_policy

        augment = parse_policy("random-crop:1").describe()
    meta = CacheMeta(
        "cd" * 32, "diag-test", CLASSES, (4,), "float32", serving_temperature=T, logits_layout=layout, logits_dtype=dtype,
        views_per_id=views, augment=augment, view_salt=7 if views > 1 else 0, target_seed=3,
    )  # fmt: skip
    n = len(logits)
    with CacheWriter(directory, meta, max_samples=max_samples) as writer:
        if n:
            writer.append([f"s{i}" for i in range(n)], np.zeros((n, 4), np.float32), logits, labels)
    return meta


def inspect_json(directory, capsys) -> dict:
    assert inspect_main([str(directory), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- the statistics, for every layout ----


def test_full_logits_give_the_formulas_figures(tmp_path):
    logits, labels = teacher_outputs(300)
    write_cache(tmp_path / "c", logits, labels, max_samples=64)  # 5 shards
    stats = CacheReader(tmp_path / "c").soft_target_stats().stats()
    top1, entropy, agreement = reference(logits, labels)
    assert stats.samples == 300 and stats.labelled == int((labels >= 0).sum()) and stats.temperature == T
    assert stats.mean_top1 == pytest.approx(top1, abs=1e-6)
    assert stats.mean_entropy == pytest.approx(entropy, abs=1e-6)
    assert stats.label_agreement == pytest.approx(agreement, abs=1e-12)
    assert 0.6 < agreement < 0.95 and soft_target_warnings(stats) == []
    # Another temperature (offline-distill's, on full logits) gives that temperature's figures.
    hot = CacheReader(tmp_path / "c").soft_target_stats(temperature=1.0).stats()
    assert hot.mean_top1 == pytest.approx(reference(logits, labels, 1.0)[0], abs=1e-6) and hot.mean_top1 > stats.mean_top1


def test_topk_keeps_the_top1_and_agreement_and_spreads_its_tail(tmp_path):
    logits, labels = teacher_outputs(200)
    write_cache(tmp_path / "c", logits, labels, layout="topk:3")
    stats = CacheReader(tmp_path / "c").soft_target_stats().stats()
    top1, entropy, agreement = reference(logits, labels)
    assert stats.mean_top1 == pytest.approx(top1, abs=1e-5)
    assert stats.label_agreement == pytest.approx(agreement, abs=1e-12)
    # The tail is stored as one mass and spread evenly on decoding: more entropy, never less.
    assert entropy < stats.mean_entropy < entropy + 0.5


def test_sampled_targets_give_the_stored_frequencies(tmp_path):
    logits, labels = teacher_outputs(200)
    write_cache(tmp_path / "c", logits, labels, layout="sampled:16")
    stored = CacheReader(tmp_path / "c").read(("sample_counts", "labels"))
    stats = CacheReader(tmp_path / "c").soft_target_stats().stats()
    assert stats.mean_top1 == pytest.approx(stored["sample_counts"].max(axis=1).mean() / 16, abs=1e-6)
    assert stats.label_agreement is not None and stats.samples == 200


def test_a_views_cache_averages_over_every_view_each_against_its_label(tmp_path):
    logits, labels = teacher_outputs(120, views=3)
    write_cache(tmp_path / "c", logits, labels, views=3, max_samples=50)
    stats = CacheReader(tmp_path / "c").soft_target_stats().stats()
    top1, entropy, agreement = reference(logits, labels)
    assert stats.samples == 120 and stats.labelled == int((labels >= 0).sum())
    assert stats.mean_top1 == pytest.approx(top1, abs=1e-6) and stats.mean_entropy == pytest.approx(entropy, abs=1e-6)
    assert stats.label_agreement == pytest.approx(agreement, abs=1e-12)
    # Per view, not per sample: the views disagree among themselves here.
    assert stats.label_agreement != pytest.approx(reference(logits.mean(axis=1), labels)[2], abs=1e-3)


def test_a_big_cache_is_sampled_across_its_shards_and_the_count_is_reported(tmp_path):
    logits, labels = teacher_outputs(400)
    write_cache(tmp_path / "c", logits, labels, max_samples=100)  # 4 shards, written class by class would be biased
    reader = CacheReader(tmp_path / "c")
    ids = np.concatenate([block["ids"] for _, _, block in reader.sample_rows(["ids"], 90)])
    assert len(ids) == 90 and len(set(ids)) == 90
    rows = np.sort([int(i[1:]) for i in ids])
    assert all(((rows >= start) & (rows < start + 100)).sum() in (22, 23) for start in range(0, 400, 100)), rows
    assert rows.max() - rows.min() > 350  # spread within each shard too, not its first rows only
    assert reader.soft_target_stats(samples=90).stats().samples == 90
    assert sample_size(1, 10) == 20_000 and sample_size(4, 10) == 5_000 and sample_size(1, 50_000) == 1_000


def test_the_warnings_and_their_thresholds():
    def stats(top1_logit_gap: float, agree: bool, n: int = 500):
        logits = np.zeros((n, CLASSES), np.float32)
        logits[:, 0] = top1_logit_gap
        acc = SoftTargetAccumulator(T)
        acc.add(logits, np.zeros(n, np.int64) if agree else np.ones(n, np.int64))
        return acc.stats()

    # p_top = e^(g/T) / (e^(g/T) + 9): above NEAR_ONE_HOT from a gap of T*ln(9*99) = 27.2
    assert soft_target_warnings(stats(26.0, agree=True)) == []
    (one_hot,) = soft_target_warnings(stats(28.0, agree=True))
    assert one_hot.startswith("the soft targets are near one-hot (mean top-1 probability 0.99")
    assert "at T=4, over 500 samples" in one_hot and "--input-scale" in one_hot and "raise the temperature" in one_hot
    (disagree,) = soft_target_warnings(stats(5.0, agree=False))
    assert "agrees with the label on only 0.0% of 500 labelled samples" in disagree and "label_names" in disagree
    assert len(soft_target_warnings(stats(28.0, agree=False))) == 2
    assert soft_target_warnings(stats(5.0, agree=False, n=99)) == []  # too few labels to say
    assert NEAR_ONE_HOT == 0.99 and LOW_AGREEMENT == 0.5
    empty = SoftTargetAccumulator(T).stats()
    assert empty.mean_top1 is None and empty.label_agreement is None and soft_target_warnings(empty) == []


def test_the_watch_reports_once_after_its_samples():
    reported: list[str] = []
    watch = SoftTargetWatch(T, reported.append, samples=100)
    one_hot = np.zeros((60, CLASSES), np.float32)
    one_hot[:, 3] = 200.0
    watch.observe(one_hot)
    assert reported == [] and not watch.done
    watch.observe(one_hot)  # 120 samples: the first 100 count
    assert len(reported) == 1 and "near one-hot" in reported[0] and "over 100 samples" in reported[0] and watch.done
    watch.observe(one_hot)
    assert len(reported) == 1


# ---- cache-inspect ----


def test_cache_inspect_reports_the_statistics_and_warns_on_near_one_hot_targets(tmp_path, capsys):
    logits, labels = teacher_outputs(300)
    write_cache(tmp_path / "healthy", logits, labels)
    write_cache(tmp_path / "unscaled", logits * 255, labels)  # a float teacher given 0..255 inputs
    healthy = inspect_json(tmp_path / "healthy", capsys)
    top1, entropy, agreement = reference(logits, labels)
    assert healthy["warnings"] == []
    assert healthy["soft_targets"]["mean_top1"] == pytest.approx(top1, abs=1e-6)
    assert healthy["soft_targets"]["mean_entropy"] == pytest.approx(entropy, abs=1e-6)
    assert healthy["soft_targets"]["label_agreement"] == pytest.approx(agreement)
    assert healthy["soft_targets"]["samples"] == 300 and healthy["soft_targets"]["temperature"] == T
    unscaled = inspect_json(tmp_path / "unscaled", capsys)
    assert unscaled["soft_targets"]["mean_top1"] > 0.99
    assert len(unscaled["warnings"]) == 1 and "near one-hot" in unscaled["warnings"][0]

    assert inspect_main([str(tmp_path / "healthy")]) == 0
    text = capsys.readouterr().out
    assert f"soft targets     mean top-1 {top1:.3f}, entropy {entropy:.2f} nats, top-1 agrees with the label on {agreement:.1%}" in text
    assert "(at T=4, over 300 samples)" in text and "warning:" not in text
    assert inspect_main([str(tmp_path / "unscaled")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {unscaled['warnings'][0]}"]


def test_cache_inspect_without_labels_says_so(tmp_path, capsys):
    logits, _ = teacher_outputs(50)
    write_cache(tmp_path / "c", logits, np.full(50, -1))
    summary = inspect_json(tmp_path / "c", capsys)
    assert summary["soft_targets"]["label_agreement"] is None and summary["soft_targets"]["labelled"] == 0
    assert inspect_main([str(tmp_path / "c")]) == 0
    assert "nats, no labels (at T=4, over 50 samples)" in capsys.readouterr().out


def test_cache_inspect_counts_the_journals_pending_samples(tmp_path, capsys):
    """What a running teacher-serve leaves: published shards, and acknowledged samples in the
    journal, some of which a shard already holds (a rollover the journal has not caught up with)."""
    logits, labels = teacher_outputs(100, scale=300.0)  # near one-hot
    meta = write_cache(tmp_path / "c", logits[:40], labels[:40], max_samples=16)  # shards of 16, 16, 8
    journal = Journal(tmp_path / "c")
    ids = [f"s{i}" for i in range(36, 100)]  # s36..s39 are published already
    for part in (slice(0, 30), slice(30, 64)):
        rows = slice(36 + part.start, 36 + part.stop)
        journal.append(encode_record(meta, ids[part], np.zeros((len(ids[part]), 4), np.float32), meta.layout.encode(logits[rows]), labels[rows]), 30)
    journal.append(encode_record(meta, ["s50"], np.zeros((1, 4), np.float32), meta.layout.encode(logits[50:51]), labels[50:51]), 1)  # a repeat
    journal.sync()
    journal.close()
    summary = inspect_json(tmp_path / "c", capsys)
    assert (summary["samples"], summary["published_samples"], summary["journal_samples"]) == (100, 40, 60)
    assert summary["label_coverage"] == pytest.approx((labels >= 0).mean())
    assert summary["soft_targets"]["samples"] == 100 and summary["soft_targets"]["labelled"] == int((labels >= 0).sum())
    assert summary["soft_targets"]["mean_top1"] == pytest.approx(reference(logits, labels)[0], abs=1e-6)
    assert any("near one-hot" in warning for warning in summary["warnings"])
    assert inspect_main([str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "samples          100 (40 in published shards, 60 in the journal)" in text
    assert f"label coverage   {(labels >= 0).mean():.1%} (the journal's samples included)" in text
    assert "journal          60 samples acknowledged by teacher-serve and not yet in a published shard, counted above" in text


def test_a_cache_whose_samples_are_all_in_the_journal(tmp_path, capsys):
    logits, labels = teacher_outputs(30)
    meta = write_cache(tmp_path / "c", logits[:0], labels[:0])
    journal = Journal(tmp_path / "c")
    journal.append(encode_record(meta, [f"j{i}" for i in range(30)], np.zeros((30, 4), np.float32), meta.layout.encode(logits), labels), 30)
    journal.close()
    summary = inspect_json(tmp_path / "c", capsys)
    assert (summary["samples"], summary["published_samples"], summary["journal_samples"]) == (30, 0, 30)
    assert summary["label_coverage"] == pytest.approx((labels >= 0).mean()) and summary["soft_targets"]["samples"] == 30


def test_damaged_rows_in_the_sample_are_named_not_decoded(tmp_path, capsys):
    import h5py

    logits, labels = teacher_outputs(40)
    write_cache(tmp_path / "c", logits, labels, layout="topk:2")
    shard = next((tmp_path / "c").glob("shard-*.h5"))
    with h5py.File(shard, "r+") as h5:  # a flipped byte: an index no writer stores, the file's size kept
        h5["topk_indices"][0, 0] = 200
    assert inspect_main([str(tmp_path / "c")]) == 1
    assert f"cache-inspect: error: {shard}: a top-k class index out of range [0, 10) in rows 0:" in capsys.readouterr().err
    assert CacheReader(tmp_path / "c").soft_target_stats(skip_corrupt=True).stats().samples < 40


@pytest.mark.slow
@pytest.mark.parametrize("json_output", [True, False])
def test_a_closed_pipe_ends_cache_inspect_quietly(tmp_path, json_output):
    logits, labels = teacher_outputs(20)
    write_cache(tmp_path / "c", logits, labels)
    proc = subprocess.Popen(
        [str(BIN / "cache-inspect"), str(tmp_path / "c"), *(["--json"] if json_output else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # as `| head -0` would, before the program has written anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == CLOSED_PIPE, stderr
    assert stderr == "", stderr


# ---- offline-distill ----


@pytest.mark.parametrize(("scale", "warned"), [(1.0, False), (255.0, True)])
def test_offline_distill_warns_at_its_start_and_records_the_warnings(tmp_path, capsys, scale, warned):
    from kdcache.offline.train import TrainConfig, train

    logits, labels = teacher_outputs(200)
    write_cache(tmp_path / "c", logits * scale, labels)
    summary = train(
        TrainConfig(
            caches=[str(tmp_path / "c")], epochs=1, batch_size=32, out=str(tmp_path / "run"), workers=0, progress=False, export=False
        )
    )
    output = capsys.readouterr().out.splitlines()
    warnings = [line for line in output if line.startswith("warning:") and "soft targets" in line]
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["warnings"]
    assert recorded == summary["warnings"]
    if warned:
        assert len(warnings) == 1 and "near one-hot" in warnings[0] and f"at T={T:g}" in warnings[0]
        assert warnings == [f"warning: {warning}" for warning in recorded]
        start = next(i for i, line in enumerate(output) if line.startswith("training "))
        assert output.index(warnings[0]) < start + 8, output  # with the run's description, before any epoch
    else:
        assert warnings == [] and recorded == []


# ---- teacher-serve ----


@pytest.mark.slow
def test_teacher_serve_logs_the_warning_once_after_the_first_thousand_samples(tmp_path):
    from kdcache.service.client import TeacherClient
    from kdcache.service.launch import ServeProcess

    _, teacher = small_float_teacher(tmp_path, (16,), CLASSES)
    args = ["--teacher", str(teacher), "--cache", str(tmp_path / "c"), "--device", "cpu", "--temperature", str(T)]
    server = ServeProcess(args, tmp_path / "serve.log", command=[str(BIN / "teacher-serve")])
    try:
        server.wait_ready(90)
        rng = np.random.default_rng(0)
        # A float teacher given raw 0..255 bytes: its soft targets are near one-hot.
        inputs = (rng.random((1100, 16)) * 255 * 255).astype(np.float32)
        with TeacherClient(server.url) as client:
            for part in np.array_split(np.arange(1100), 4):
                client.infer(inputs[part], ids=[f"u{i}" for i in part])
            before = [line for line in server.output().splitlines() if "warning: the soft targets are near one-hot" in line]
            client.infer(inputs[:300] + 1, ids=[f"v{i}" for i in range(300)])  # more samples computed: no second warning
        deadline = time.monotonic() + 10
        while not before and time.monotonic() < deadline:  # the log is written by the worker thread
            time.sleep(0.1)
            before = [line for line in server.output().splitlines() if "warning: the soft targets are near one-hot" in line]
        assert server.stop() == 0, server.output()
        lines = [line for line in server.output().splitlines() if "warning: the soft targets are near one-hot" in line]
        assert len(lines) == 1 and "over 1,000 samples" in lines[0], server.output()
    finally:
        if server.proc.poll() is None:
            server.kill()
