"""The reliability campaign in reduced form (docs/reliability.md has the soak figures): kill -9 at
random moments and at the writer's crash points, a flood of clients against a small queue and a
small in-flight budget, and a disk that fills up. ``pytest -m soak`` runs the long forms.
Fuzzing, corrupt caches and security have their own files (test_fuzz, test_corrupt,
test_security)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_service import GatedTeacher, infer, run, serving

from bench import crash, flood
from kdcache.offline.cache import CacheReader
from kdcache.service.store import CacheStore
from kdcache.service.teacher import load_teacher

pytestmark = pytest.mark.slow


def describe(summary: dict) -> str:
    failed = [r for r in summary["results"] if r["problems"]]
    return "\n".join(f"trial {r['trial']} ({r['fault']}): {'; '.join(r['problems'])}" for r in failed) or str(summary)


def run_crash_trials(tmp_path: Path, *argv: str) -> dict:
    return crash.run(crash.parse_args([*argv, "--workdir", str(tmp_path / "crash")]))


def test_kill_9_at_random_moments_and_at_every_crash_point_loses_nothing(tmp_path):
    summary = run_crash_trials(tmp_path, "--trials", "2", "--points", "--repeat", "1")
    assert summary["trials"] == 2 + len(crash.CRASH_POINTS)
    assert summary["failed_trials"] == 0, describe(summary)
    assert summary["lost"] == 0 and summary["wrong_logits"] == 0 and summary["unreadable_shards"] == 0
    # The kills landed while samples were being acknowledged, and the journal had work to replay.
    assert summary["acknowledged"] > 1000
    assert sum(r["journal_samples"] > 0 for r in summary["results"]) >= len(crash.CRASH_POINTS)
    assert summary["verify_exit"] == 0, summary["verify_tail"]
    assert summary["distill_exit"] == 0, summary["distill_tail"]


@pytest.mark.soak
def test_soak_buffered_acknowledgement_is_what_kill_9_can_lose(tmp_path):
    """The same trials detect loss: ``--ack buffered`` answers before the journal write, so a
    kill -9 under load loses some acknowledged samples (the documented trade-off). How many
    depends on how much was queued at the kill, so this runs in the soak only."""
    summary = run_crash_trials(tmp_path, "--trials", "5", "--ack", "buffered")
    assert summary["lost"] > 0, describe(summary)
    assert summary["unreadable_shards"] == 0 and summary["wrong_logits"] == 0


@pytest.mark.soak
def test_soak_crash_trials(tmp_path):
    trials = os.environ.get("KD_CRASH_TRIALS", "20")
    summary = run_crash_trials(tmp_path, "--trials", trials, "--points", "--repeat", "3")
    assert summary["failed_trials"] == 0, describe(summary)
    assert summary["verify_exit"] == 0 and summary["distill_exit"] == 0


def test_a_flood_is_refused_with_retry_after_memory_stays_bounded_and_every_200_is_kept(tmp_path):
    """64 clients offer 1 MiB bodies without retrying, against a 4 MiB queue and 8 MiB of bodies
    in flight: about 64 MiB at once. Without the in-flight budget the server's RSS grew by about
    220 MB in this setting (docs/reliability.md); with it, by about 65."""
    result = flood.run(
        flood.parse_args(
            ["--clients", "64", "--seconds", "6", "--batch", "16384", "--queue-mb", "4", "--inflight-mb", "8",
             "--max-growth-mb", "128", "--workdir", str(tmp_path / "flood")]
        )
    )  # fmt: skip
    assert not result.problems, result
    assert result.statuses.get("200", 0) > 0 and result.rejection_rate > 0.5, result
    assert result.health_probes > 10 and result.health_failures == 0
    assert result.lost == 0 and result.server_exit == 0


@pytest.mark.soak
def test_soak_flood(tmp_path):
    seconds = os.environ.get("KD_FLOOD_SECONDS", "60")
    result = flood.run(flood.parse_args(["--clients", "128", "--seconds", seconds, "--workdir", str(tmp_path / "flood")]))
    assert not result.problems, result


def test_bodies_beyond_the_in_flight_budget_get_503_before_they_are_kept(tmp_path, digits_teacher, digits_teacher_pt):
    gated = GatedTeacher(load_teacher([str(digits_teacher_pt)], temperature=4.0, device="cpu"))
    x = digits_teacher["x_train"]

    async def body():
        # 6 KiB of bodies in flight: one request of 64 digits (about 5 KiB) at a time.
        async with serving(tmp_path, [digits_teacher_pt], teacher=gated, max_batch=16, max_inflight_mb=6 / 1024) as (service, client):
            gated.gate.set()
            await infer(client, x[:1])  # warm
            first = await gated.hold(infer(client, x[:64], ids=np.arange(64)))
            response, _, _ = await infer(client, x[100:164], ids=np.arange(100, 164))
            assert response.status_code == 503 and response.headers["retry-after"]
            assert "request bodies" in response.json()["error"] and "--max-inflight-mb" in response.json()["error"]
            assert (await client.get("/v2/health/ready")).status_code == 200
            gated.gate.set()
            assert (await first)[0].status_code == 200
            # Alone, a body larger than the whole budget is still served.
            response, _, _ = await infer(client, x[200:400], ids=np.arange(200, 400))
            assert response.status_code == 200
            assert service.store.num_samples == 1 + 64 + 200

    run(body())


def fill_free_cycles(tiny_filesystem: Path, x: np.ndarray, teacher_pt: Path, cycles: int) -> None:
    """Each cycle: fill the disk to 1 MiB free, push until three requests get 507, free it, push
    again. Afterwards every acknowledged sample is in the cache and every shard verifies."""

    async def body():
        async with serving(tiny_filesystem, [teacher_pt], shard_samples=512) as (service, client):
            acknowledged, next_id = [], 0
            for cycle in range(cycles):
                stats = os.statvfs(tiny_filesystem)
                filler = tiny_filesystem / "filler"
                filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - (1 << 20)))  # leave 1 MiB
                refused = 0
                while refused < 3:
                    index = np.arange(next_id, next_id + 128)
                    next_id += 128
                    response, _, _ = await infer(client, x[index % len(x)], ids=index, outputs=("logits",))
                    if response.status_code == 200:
                        acknowledged.extend(index.tolist())
                    else:
                        assert response.status_code == 507, response.text
                        assert "disk is full" in response.json()["error"] and response.headers["retry-after"]
                        refused += 1
                assert (await client.get("/v2/health/ready")).status_code == 200
                filler.unlink()
                index = np.arange(next_id, next_id + 64)
                next_id += 64
                response, _, _ = await infer(client, x[index % len(x)], ids=index, outputs=("logits",))
                assert response.status_code == 200, f"cycle {cycle}: {response.text}"
                acknowledged.extend(index.tolist())
            return acknowledged, service

    acknowledged, service = run(body())
    reader = CacheReader(service.store.directory)
    stored = set(reader.read(("ids",))["ids"].astype(int).tolist())
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged samples lost"
    assert reader.verify() == []


def test_a_disk_filled_by_someone_else_behind_the_free_space_check_loses_nothing(
    tiny_filesystem, digits_teacher, digits_teacher_pt, monkeypatch
):
    """Without the free-space check the writes meet ENOSPC themselves: in the journal, or when
    a full shard is published. Requests get 507, the open shard stays in memory, nothing
    acknowledged is lost, and the service recovers once space is freed (HDF5 never writes to
    the disk itself, so it never meets the full disk: that once crashed the process)."""
    monkeypatch.setattr(CacheStore, "_check_space", lambda self, samples: None)
    fill_free_cycles(tiny_filesystem, digits_teacher["x_train"], digits_teacher_pt, cycles=1)


@pytest.mark.soak
@pytest.mark.parametrize("check_space", [True, False])
def test_soak_disk_full_cycles(tiny_filesystem, digits_teacher, digits_teacher_pt, monkeypatch, check_space):
    if not check_space:
        monkeypatch.setattr(CacheStore, "_check_space", lambda self, samples: None)
    fill_free_cycles(tiny_filesystem, digits_teacher["x_train"], digits_teacher_pt, cycles=int(os.environ.get("KD_DISKFULL_CYCLES", "8")))
