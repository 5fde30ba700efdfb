"""The benchmark scripts run, end to end, on a tiny configuration: the figures in
docs/benchmarks.md come from them, so a change that breaks one must fail here, not at the next
measurement. The figures themselves are not asserted (they are ratios of timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_bench(name: str, *args: str, timeout: float = 240) -> dict:
    """``python -m bench.NAME ARGS --json`` from the repository root, as the docs run it."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args, "--json"], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def tiny_reader(device: str) -> dict:
    return run_bench(
        "reader", "--samples", "768", "--repeats", "1", "--epochs-per-repeat", "1", "--workers", "0", "--skip-rss",
        "--malloc", "trainer", "--batch-size", "128", "--device", device,
    )  # fmt: skip


def test_reader_bench_runs_both_sides_on_the_cpu():
    result = tiny_reader("cpu")
    (row,) = result["throughput"]
    assert row["workers"] == 0 and row["malloc"] == "trainer"
    # Both sides trained on every sample of the epoch: 768 rows in batches of 128.
    for side in ("memory", "shards"):
        assert [r["samples"] for r in row["repeats"][side]] == [768]
        assert [r["steps"] for r in row["repeats"][side]] == [6]
    assert result["reader_vs_memory_workers0"] == pytest.approx(row["ratio"], abs=1e-3)
    assert result["env"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reader_bench_trains_on_the_gpu():
    result = tiny_reader("cuda")
    assert result["env"]["device"].startswith("cuda (")
    (row,) = result["throughput"]
    assert row["ratio"] > 0


def test_malloc_bench_compares_the_trainer_setting_with_glibc_defaults():
    result = run_bench("malloc", "--students", "mlp-small", "--rounds", "1", "--epochs", "1", "--samples", "512")
    row = result["students"]["mlp-small"]
    assert len(row["trainer"]) == len(row["glibc"]) == 1
    assert row["ratio_median"] == pytest.approx(row["trainer"][0] / row["glibc"][0])


def test_views_bench_runs_every_arm():
    result = run_bench("views", "--quick", "--epochs", "2", "--views", "2", "--rounds", "1", "--train-samples", "256", timeout=300)
    arms = result["accuracy"]["arms"]
    assert "distilled, 2 views" in arms and "online KD, same policy" in arms and "labels + augmentation" in arms
    assert all(len(arm["accuracies"]) == 1 and 0 <= arm["mean"] <= 1 for arm in arms.values())
    assert arms["distilled, 2 views"]["bytes_per_sample"] > arms["labels only"]["bytes_per_sample"]
    assert result["serving"]["ratio"] > 0 and result["training"]["ratio"] > 0


def test_targets_bench_trains_on_every_kind_of_layout():
    result = run_bench(
        "targets", "--quick", "--problems", "digits", "--layouts", "full", "topk:2:uniform", "topk:10", "sampled:4",
        "--epochs", "1", "--temperatures", "2", "--rounds", "1",
    )  # fmt: skip
    digits = result["problems"]["digits"]
    arms = digits["arms"]
    assert list(arms) == ["full float32", "topk:2 uniform", "sampled:4"]
    assert "K < C" in digits["skipped"]["topk:10 bucket"]  # 10 classes: no tail would remain
    # target bytes per sample: 10 float32 logits; 2 values, 2 uint8 indices and the tail; 4 (index, count) uint8 pairs
    assert [arm["row_bytes"] for arm in arms.values()] == [40, 14, 8]
    assert digits["serving_temperature"] == 2.0
    for arm in arms.values():
        assert len(arm["accuracies"]) == len(arm["eces"]) == 1 and 0 <= arm["accuracy"] <= 1 and 0 <= arm["ece"] <= 1
    assert 1 <= arms["sampled:4"]["sampled"]["distinct_mean"] <= 4
    assert result["speed"]["topk:5_vs_full"] > 0 and result["speed"]["sampled:16_vs_full"] > 0


def test_targets_bench_serves_every_layout():
    result = run_bench(
        "targets", "--service", "--quick", "--teacher-arch", "mlp-small", "--input-shape", "8", "8", "--request-size", "64",
        "--requests", "2", "--serve-rounds", "1",
    )  # fmt: skip
    service = result["service"]
    assert [len(service["rounds"][spec]) for spec in ("full", "topk:5", "sampled:16")] == [1, 1, 1]
    assert all(run["cache_matches_acks"] for runs in service["rounds"].values() for run in runs)
    assert service["topk:5_vs_full"] > 0 and service["sampled:16_vs_full"] > 0


def test_push_bench_decodes_and_pushes_every_source():
    result = run_bench("push", "--quick", "--images", "48", "--batch-size", "16")
    measured = result["measured"]
    assert list(measured["push"]) == ["npy", "png", "jpeg"]
    # every push sent all 48 samples in 3 requests to a fresh cache (the bench checks they were all misses)
    assert [(run["samples"], run["requests"]) for runs in measured["push"].values() for run in runs] == [(48, 3)] * 3
    assert [run["samples"] for fmt in measured["decode"].values() for runs in fmt.values() for run in runs] == [48] * 4
    summary = measured["summary"]
    assert summary["ingest_samples_per_s"] > 0 and summary["push_png_vs_ingest"] > 0 and summary["decode_jpeg_default_vs_1"] > 0
    assert measured["bytes_per_image"]["png"] > measured["bytes_per_image"]["jpeg"] > 0


def test_ids_bench_measures_the_index_and_a_writer_start():
    result = run_bench("ids", "--ids", "20000", "--dict-ids", "5000", "--start-ids", "20000")
    index = result["index"][0]
    assert index["kind"].startswith("RowIndex") and index["ids"] == 20000
    assert 16 <= index["bytes_per_id"] <= 64  # the bound: 64 bytes per id


def test_remote_bench_trains_from_a_bucket_and_from_a_directory():
    result = run_bench("remote", "--samples", "4096", "--shard-samples", "512", "--epochs", "2", "--rounds", "1", "--workers", "0")
    assert result["shards"] == 8 and result["local_cache_bytes"] * 4 <= result["cache_bytes"] + 4
    (bucket,) = result["runs"]["bucket"]
    assert bucket["shard_window"] is not None and bucket["note"]  # a quarter-size local cache narrows the shuffle, and says so
    assert [e["steps"] for e in bucket["epochs"]] == [e["steps"] for e in result["runs"]["local"][0]["epochs"]] == [16, 16]
