"""Training from a cache on object storage against the same cache in a local directory.

The cache is on moto's S3 server on 127.0.0.1 (a process of its own, reached through s3fs as a
bucket is), read through a local cache of a quarter of its size (``--local-cache-gb``), with
the next shards downloaded ahead (``dataset.Prefetch``) and shuffle windows that fit the local
cache (``shard_window_for``). Each arm trains ``offline-distill``'s own ``train_step`` on the
stream the trainer builds (``ShardStream.loader``), for a first epoch with an empty local cache
and then more epochs; the arms alternate (local, bucket, bucket, local per round). Goal
(issue 23): steps/s from the bucket >= 0.8x the local directory's in the first epoch, >= 0.9x
after it.

    .venv/bin/python -m bench.remote --quick      # about a minute on 2 cores
    .venv/bin/python -m bench.remote
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from kdcache.offline.cache import CacheReader
from kdcache.offline.cache.remote import FsspecStorage, configure_downloads
from kdcache.offline.dataset import ShardStream, shard_window_for

QUICK = {"samples": 12288, "shard_samples": 1024, "epochs": 2, "rounds": 1}
FULL = {"samples": 49152, "shard_samples": 2048, "epochs": 3, "rounds": 2}
BUCKET = "bench"


def moto_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(root / "moto.log", "w")  # noqa: SIM115 - the server's life
    proc = subprocess.Popen([str(harness.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"moto_server did not start: {(root / 'moto.log').read_text()[-2000:]}")


def upload(local: Path, url: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    storage = FsspecStorage(url)
    for path in sorted(local.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            storage.put_file(path.name, path)


def train_epochs(reader: CacheReader, args: argparse.Namespace, window: int | None) -> list[dict[str, float]]:
    """Each epoch's steps/s, from a fresh student and stream."""
    device = torch.device("cpu")
    student = harness.Student(args.student, reader.meta, seed=args.seed, device=device)
    stream = ShardStream.from_readers(
        [reader], reader.meta, batch_size=args.batch_size, seed=args.seed, shard_window=window, rank=0, world_size=1
    )
    loader = stream.loader(args.workers)
    out = []
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        started, steps = time.perf_counter(), 0
        for batch in loader:
            student.step(batch)
            steps += 1
        seconds = time.perf_counter() - started
        out.append({"epoch": epoch, "steps": steps, "seconds": seconds, "steps_per_s": steps / seconds})
    return out


def run_arm(kind: str, local: Path, url: str, root: Path, args: argparse.Namespace, budget: int) -> dict[str, Any]:
    meter = harness.CpuMeter()
    if kind == "local":
        reader, window, note = CacheReader(local), None, None
    else:
        downloads = root / "downloads"
        shutil.rmtree(downloads, ignore_errors=True)  # the first epoch starts empty
        configure_downloads(downloads, budget / 2**30)
        reader = CacheReader(url)
        window, note = shard_window_for(reader.shards)
    epochs = train_epochs(reader, args, window)
    return {"kind": kind, "epochs": epochs, "shard_window": window, "note": note, **meter.stop()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with harness.workdir("bench-remote-", args.tmpdir, args.keep) as root:
        meta = harness.synthetic_meta((3, 32, 32), 10)
        local = root / "local"
        reader = harness.synthetic_cache(local, meta, args.samples, max_samples=args.shard_samples)
        total = sum(info.bytes for info in reader.shards)
        budget = total // 4
        proc, endpoint = moto_server(root)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
        )
        try:
            url = f"s3://{BUCKET}/cache"
            upload(local, url)
            runs = harness.alternate(["local", "bucket"], args.rounds, lambda kind: run_arm(kind, local, url, root, args, budget))
        finally:
            proc.kill()
            proc.wait()
    first = {kind: [r["epochs"][0]["steps_per_s"] for r in rows] for kind, rows in runs.items()}
    later = {kind: [e["steps_per_s"] for r in rows for e in r["epochs"][1:]] for kind, rows in runs.items()}
    first_ratio = statistics.median(first["bucket"]) / statistics.median(first["local"])
    later_ratio = statistics.median(later["bucket"]) / statistics.median(later["local"]) if later["local"] else None
    return {
        "cache_bytes": total, "local_cache_bytes": budget, "shards": len(reader.shards), "runs": runs,
        "first_epoch_ratio": first_ratio, "later_epochs_ratio": later_ratio,
        "max_foreign_cpu": max(r["foreign_cpu"] for rows in runs.values() for r in rows),
        "target_first": ">= 0.8", "target_later": ">= 0.9",
    }  # fmt: skip


def report(result: dict[str, Any]) -> None:
    print(
        f"cache {result['cache_bytes'] / 2**20:.1f} MiB in {result['shards']} shards; local cache {result['local_cache_bytes'] / 2**20:.1f} MiB"
    )
    rows = []
    for kind, runs in result["runs"].items():
        for run in runs:
            rows.append(
                [kind, *(f"{e['steps_per_s']:.1f}" for e in run["epochs"]), run["shard_window"] or "all", f"{run['foreign_cpu']:.0%}"]
            )
    epochs = len(result["runs"]["local"][0]["epochs"])
    harness.table([("arm", "<"), *((f"epoch {i} steps/s", ">") for i in range(epochs)), ("shard window", ">"), ("other CPU", ">")], rows)
    later = result["later_epochs_ratio"]
    print(f"first epoch: bucket / local = {result['first_epoch_ratio']:.2f} (goal >= 0.8); "
          f"later epochs: {later:.2f} (goal >= 0.9)" if later is not None else "")  # fmt: skip
    harness.noise_warning(result["max_foreign_cpu"])


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the cache, the local cache and the server log")
    p.add_argument("--quick", action="store_true", help=f"small run ({QUICK})")
    p.add_argument("--samples", type=int)
    p.add_argument("--shard-samples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--student", default="mlp-small")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = harness.parse(p, argv, QUICK, FULL)
    harness.emit(measure(args), args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
