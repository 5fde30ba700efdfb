"""Crash trials: concurrent clients store unique samples while ``teacher-serve`` dies by SIGKILL.

Random ``kill -9`` trials and, with ``--points``, a SIGKILL at each of the writer's crash points
(``KDCACHE_CRASH_AT``); after each, a restart replays the journal and every acknowledged id must
be in the cache with the teacher's logits, every shard must verify; at the end
``cache-inspect --verify`` and one epoch of ``offline-distill`` must pass. Exit 1 on any loss.
The method and results: docs/reliability.md, "1. Crash trials".

    python -m bench.crash --trials 20            # random kills, seeds 0..19
    python -m bench.crash --points --repeat 3    # every crash point at n = 1, 2, 3
    python -m bench.crash --trials 3 --points --repeat 1 --json   # what CI runs (tests/test_reliability.py)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench import harness
from bench.harness import Teacher
from kdcache.offline.cache import CRASH_POINTS, CacheError, CacheReader
from kdcache.service.client import TeacherClient
from kdcache.service.launch import LaunchError, ServeProcess

INPUT_SHAPE = (8, 8)
NUM_CLASSES = 10
CLIENTS = 4


def make_teacher(directory: Path, seed: int = 0) -> Teacher:
    """A randomly initialised ``mlp-teacher`` on 8×8 uint8 inputs (0-16), saved as ``teacher-serve`` loads it."""
    return harness.write_teacher(directory / "crash-teacher.pt", "mlp-teacher", INPUT_SHAPE, NUM_CLASSES, seed=seed, levels=17)


@dataclass
class TrialResult:
    trial: int
    seed: int
    fault: str  # "kill -9 at 0.84 s" or "shard-renamed:2"
    acknowledged: int = 0
    lost: int = 0
    wrong_logits: int = 0
    shards: int = 0
    corrupt_shards: int = 0
    journal_samples: int = 0  # samples the restart found in the journal
    died_during: str = "serving"  # or "recovery" (a crash point reached while replaying the journal)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong_logits or self.corrupt_shards or self.problems)


class Clients:
    """``CLIENTS`` threads sending batches of new samples until the server stops answering."""

    def __init__(self, url: str, prefix: str, rng: np.random.Generator, capacity: int = 200_000) -> None:
        self.inputs = rng.integers(0, 17, size=(capacity, *INPUT_SHAPE), dtype=np.uint8)
        self.sizes = rng.integers(1, 33, size=capacity)
        self.prefix = prefix
        self.url = url
        self.acknowledged: list[np.ndarray] = []
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def ids(self, index: np.ndarray) -> np.ndarray:
        return np.array([f"{self.prefix}-{i}" for i in index.tolist()], dtype=object)

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> np.ndarray:
        for thread in self._threads:
            thread.join(60)
        return np.sort(np.concatenate(self.acknowledged)) if self.acknowledged else np.zeros(0, dtype=np.int64)

    def count(self) -> int:
        with self._lock:
            return sum(len(a) for a in self.acknowledged)

    def _run(self) -> None:
        with TeacherClient(self.url, max_retries=0, timeout=30) as client:
            while True:
                with self._lock:
                    start = self._next
                    stop = min(start + int(self.sizes[start % len(self.sizes)]), len(self.inputs))
                    self._next = stop
                if start >= stop:
                    return
                index = np.arange(start, stop)
                try:
                    client.infer(self.inputs[index], ids=self.ids(index), outputs=("logits",))
                except Exception:  # noqa: BLE001 - the server died mid-request: not acknowledged
                    return
                with self._lock:
                    self.acknowledged.append(index)


def serve_args(teacher: Teacher, cache: Path, shard_samples: int, ack: str, log_level: str = "warning") -> list[str]:
    """``ack``: durable, or buffered to show what the journal's fsync before the answer buys."""
    return [
        "--teacher", str(teacher.path), "--cache", str(cache), "--device", "cpu", "--max-batch", "64",
        "--max-delay-ms", "2", "--shard-samples", str(shard_samples), "--ack", ack, "--log-level", log_level,
    ]  # fmt: skip


def check(cache: Path, clients: Clients, acknowledged: np.ndarray, teacher: Teacher, result: TrialResult) -> None:
    """Every acknowledged id published with the teacher's logits; every published shard verifies."""
    try:
        reader = CacheReader(cache)
        problems = reader.verify()
        stored = reader.read(("ids", "logits"))
    except CacheError as exc:
        result.problems.append(f"cache unreadable: {exc}")
        return
    result.shards = len(reader.shards)
    result.corrupt_shards = len(problems)
    result.problems += [f"{path}: {why}" for path, why in problems]
    row_of = {sample_id: row for row, sample_id in enumerate(stored["ids"].tolist())}
    ids = clients.ids(acknowledged).tolist()
    rows = np.array([row_of.get(i, -1) for i in ids], dtype=np.int64)
    result.lost = int((rows < 0).sum())
    if result.lost:
        result.problems.append(f"{result.lost} acknowledged ids missing, e.g. {[i for i, r in zip(ids, rows, strict=True) if r < 0][:3]}")
    present = rows >= 0
    if present.any():
        expected = teacher.logits(clients.inputs[acknowledged[present]])
        close = np.isclose(stored["logits"][rows[present]], expected, atol=1e-5).all(axis=1)
        result.wrong_logits = int((~close).sum())
        if result.wrong_logits:
            result.problems.append(f"{result.wrong_logits} acknowledged samples have logits unlike the teacher's")


def restart(teacher: Teacher, cache: Path, log_dir: Path, shard_samples: int, ack: str, result: TrialResult) -> ServeProcess | None:
    server = ServeProcess(serve_args(teacher, cache, shard_samples, ack, "info"), log_dir / f"restart-{result.trial}.log")
    try:
        server.wait_ready(120)
    except LaunchError as exc:
        result.problems.append(f"restart failed: {exc}")
        server.kill()
        return None
    for line in server.output().splitlines():
        if "recovered the journal" in line:
            result.journal_samples = int(line.split("interrupted run: ")[1].split()[0])
    return server


def run_trial(
    trial: int, seed: int, fault: str | None, teacher: Teacher, cache: Path, log_dir: Path, shard_samples: int, ack: str = "durable"
) -> TrialResult:
    """``fault`` is a crash point ``name:n``, or None for a kill -9 at a random moment."""
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    delay = float(rng.uniform(0.2, 2.5))
    result = TrialResult(trial, seed, fault or f"kill -9 at {delay:.2f} s")
    env = {"KDCACHE_CRASH_AT": fault} if fault else None
    server = ServeProcess(serve_args(teacher, cache, shard_samples, ack), log_dir / f"trial-{trial}.log", env=env)
    try:
        server.wait_ready(120)
    except LaunchError:
        if server.proc.returncode != -9:
            server.kill()
            result.problems.append(f"server did not start: {server.last_line()}")
            return result
        result.died_during = "recovery"
    clients = Clients(server.url, f"t{trial}", rng)
    if result.died_during == "serving":
        clients.start()
        if fault:
            try:
                server.proc.wait(120)
            except subprocess.TimeoutExpired:
                result.problems.append(f"crash point {fault} not reached in 120 s")
        else:
            time.sleep(delay)
        server.kill()
    acknowledged = clients.join() if result.died_during == "serving" else np.zeros(0, dtype=np.int64)
    result.acknowledged = len(acknowledged)
    restarted = restart(teacher, cache, log_dir, shard_samples, ack, result)
    if restarted is not None:
        check(cache, clients, acknowledged, teacher, result)
        code = restarted.stop()
        if code != 0:
            result.problems.append(f"restarted server exited {code} on SIGTERM: {restarted.last_line()}")
    result.seconds = time.monotonic() - started
    return result


def final_checks(cache: Path, out: Path) -> dict[str, object]:
    """``cache-inspect --verify`` and one epoch of ``offline-distill`` on what the trials left."""
    verify = subprocess.run([str(harness.BIN / "cache-inspect"), str(cache), "--verify"], capture_output=True, text=True, timeout=600)
    distill = subprocess.run(
        [str(harness.BIN / "offline-distill"), "--cache", str(cache), "--student", "mlp-small", "--epochs", "1", "--out", str(out),
         "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return {
        "verify_exit": verify.returncode,
        "verify_tail": (verify.stdout + verify.stderr).strip().splitlines()[-1:],
        "distill_exit": distill.returncode,
        "distill_tail": (distill.stdout + distill.stderr).strip().splitlines()[-1:],
    }


def plan(args: argparse.Namespace) -> list[tuple[int, str | None]]:
    trials: list[tuple[int, str | None]] = [(args.seed + i, None) for i in range(args.trials)]
    if args.points:
        for repeat in range(1, args.repeat + 1):
            trials += [(args.seed + 1000 * repeat + k, f"{point}:{repeat}") for k, point in enumerate(CRASH_POINTS)]
    return trials


def run(args: argparse.Namespace) -> dict[str, object]:
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kd-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    cache, log_dir = root / "cache", root / "logs"
    log_dir.mkdir(exist_ok=True)
    teacher = make_teacher(root)
    results = []
    # A first clean run gives every trial a cache that already has published shards and a manifest.
    with ServeProcess(serve_args(teacher, cache, args.shard_samples, args.ack), log_dir / "seed.log") as server:
        server.wait_ready(120)
        seed_clients = Clients(server.url, "seed", np.random.default_rng(args.seed), capacity=2 * args.shard_samples).start()
        seed_clients.join()
    for trial, (seed, fault) in enumerate(plan(args)):
        result = run_trial(trial, seed, fault, teacher, cache, log_dir, args.shard_samples, args.ack)
        results.append(result)
        if not args.json:
            status = "ok" if result.ok else "FAIL: " + "; ".join(result.problems)
            print(
                f"trial {trial:3d}  {result.fault:28s}  acked {result.acknowledged:6d}  lost {result.lost}  wrong {result.wrong_logits}"
                f"  shards {result.shards:3d}  corrupt {result.corrupt_shards}  journal {result.journal_samples:5d}"
                f"  died in {result.died_during:8s}  {result.seconds:5.1f} s  {status}",
                flush=True,
            )
    final = final_checks(cache, root / "distill")
    summary = {
        "trials": len(results),
        "random_kills": sum(r.fault.startswith("kill") for r in results),
        "crash_point_kills": sum(not r.fault.startswith("kill") for r in results),
        "acknowledged": sum(r.acknowledged for r in results),
        "lost": sum(r.lost for r in results),
        "wrong_logits": sum(r.wrong_logits for r in results),
        "unreadable_shards": sum(r.corrupt_shards for r in results),
        "failed_trials": sum(not r.ok for r in results),
        "ack": args.ack,
        **final,
        "workdir": str(root),
        "results": [asdict(r) for r in results],
    }
    summary["ok"] = summary["failed_trials"] == 0 and final["verify_exit"] == 0 and final["distill_exit"] == 0
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--trials", type=int, default=20, help="random kill -9 trials")
    p.add_argument("--points", action="store_true", help="also one trial per crash point and repeat")
    p.add_argument("--repeat", type=int, default=3, help="with --points: crash at the 1st..n-th arrival at each point")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--shard-samples", type=int, default=256, help="rows per shard: small, so rollovers are frequent")
    p.add_argument("--workdir", help="keep the cache and logs here (default: a new temporary directory)")
    p.add_argument("--ack", choices=("durable", "buffered"), default="durable", help="the servers' ack mode")
    return p.parse_args(argv)


def print_summary(summary: dict[str, object]) -> None:
    print()
    print(f"trials {summary['trials']} ({summary['random_kills']} random kill -9, {summary['crash_point_kills']} at crash points)")
    print(f"acknowledged {summary['acknowledged']}  lost {summary['lost']}  wrong logits {summary['wrong_logits']}")
    print(f"unreadable shards exposed {summary['unreadable_shards']}  failed trials {summary['failed_trials']}")
    print(f"cache-inspect --verify exit {summary['verify_exit']}  offline-distill exit {summary['distill_exit']}")
    print(f"workdir {summary['workdir']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = run(args)
    harness.emit(summary, args.json, print_summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
