"""``distill-demo`` end to end with reduced settings: a real teacher-serve, teacher-push,
cache-convert and three offline-distill processes. The gain itself is too noisy to assert with one seed and few epochs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    command = [
        sys.executable,
        "-m",
        "kdcache.demo.digits",
        "--out",
        str(out),
        "--json",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--teacher-epochs",
        "1",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert (out / "curves.png").stat().st_size > 0
    assert summary["data"]["train_samples"] == 1257 and summary["data"]["test_samples"] == 540
    assert summary["cache"]["samples"] == summary["data"]["train_samples"]
    assert 0 < summary["data"]["labelled_train_samples"] < summary["data"]["train_samples"]
    assert 0 <= summary["teacher"]["test_accuracy"] <= 1
    assert set(summary["arms"]) == {"labels_only", "distilled", "distilled_topk2"}
    for arm in summary["arms"].values():
        assert len(arm["accuracies"]) == 1 and all(0 <= a <= 1 for a in arm["accuracies"])
        assert len(arm["curve_mean"]) == 2
    assert summary["arms"]["labels_only"]["alpha"] == 0
    assert {"teacher", "serve", "push", "stop", "convert", "plot"} <= set(summary["seconds"])
    assert "[push] done" in proc.stderr
    # The third arm trains from a topk:2 copy made by cache-convert: 2 float32 values, 2 uint8
    # indices and the float32 tail mass per sample, against 10 float32 logits.
    compressed = summary["compressed_cache"]
    assert compressed["targets"] == "topk:2" and compressed["samples"] == summary["cache"]["samples"]
    assert compressed["target_bytes_per_sample"] == 14 and compressed["full_float32_target_bytes_per_sample"] == 40
    assert summary["cache"]["target_bytes_per_sample"] == 40
    from kdcache.demo.digits import format_table
    from kdcache.offline.cache import CacheReader

    assert CacheReader(out / "cache-top2").meta.logits_layout == "topk:2"
    run = json.loads((out / "runs" / "distilled_topk2-seed0" / "metrics.json").read_text())
    assert run["temperature"] == summary["settings"]["temperature"]
    table = format_table(summary)
    assert "student, distilled, topk:2 cache" in table and "targets 14 bytes/sample, 35% of full float32 (40)" in table


def test_demo_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdcache.demo.digits", "--out", str(tmp_path), "--transfer-fraction", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--label-fraction" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_with_augmented_views(tmp_path):
    """distill-demo --augment POLICY --views V: the service caches the views, both arms train on them."""
    out = tmp_path / "demo-out"
    command = [sys.executable, "-m", "kdcache.demo.digits", "--out", str(out), "--json", "--seeds", "1", "--epochs", "2",
               "--teacher-epochs", "1", "--augment", "random-crop:1", "--views", "3"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["settings"]["augment"] == "random-crop:1" and summary["settings"]["views"] == 3
    from kdcache.offline.cache import CacheReader

    reader = CacheReader(out / "cache")
    assert reader.meta.views_per_id == 3 and reader.meta.augment["name"] == "random-crop"
    assert summary["cache"]["bytes_per_sample"] > 162  # 3 rows of logits and their seeds per sample
    # the topk:2 copy keeps the views: 3 × 14 target bytes against 3 × 40
    assert CacheReader(out / "cache-top2").meta.views_per_id == 3
    assert summary["compressed_cache"]["target_bytes_per_sample"] == 42
    assert summary["compressed_cache"]["full_float32_target_bytes_per_sample"] == 120
