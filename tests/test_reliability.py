"""The reliability campaign in reduced form (docs/reliability.md has the soak figures): kill -9 at
random moments and at the writer's crash points, a flood of clients against a small queue, and
the security properties of a running server. ``pytest -m soak`` runs the long forms."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import crash  # noqa: E402

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
