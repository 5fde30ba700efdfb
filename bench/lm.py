"""Language-model caches: bytes per token, and the trainer's speed from the cache against memory.

Bytes: caches of one random-weight GPT-2's per-token targets, written by ``CacheWriter`` from
fields encoded as the service encodes them (``encode_tensor``), for each layout, with every
sequence ``--seq-len`` tokens long (a transfer set packed to L) and with lengths drawn uniformly
from 1..L (padded rows). Bytes per token are the shards' bytes on disk ÷ the valid tokens.

Trainer: ``offline-distill --task lm``'s own ``train_step`` on the ``topk:16`` cache, fed by the
``ShardStream`` + ``DataLoader`` it trains with, against the same rows held in memory as torch
tensors (a fresh permutation per pass); ABBA rounds of ``--steps`` steps each; tokens/s of the
valid tokens. Goal: cache ≥ 0.95 × memory.

    .venv/bin/python -m bench.lm --json        # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import harness
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cache.tokens import FULL_VOCAB_LIMIT

LAYOUTS = (("topk:16", "float16"), ("topk:16", "float32"), ("sampled:32", "float32"), ("full", "float16"))
CHUNK = 8  # sequences encoded at once


def write_cache(directory: Path, model: Any, layout: str, dtype: str, ids: np.ndarray, lengths: np.ndarray, vocab: int) -> dict[str, Any]:
    meta = CacheMeta("bench-gpt2", "gpt2", vocab, (ids.shape[1],), "int64", serving_temperature=1.0, logits_dtype=dtype,
                     logits_layout=layout, task="lm", target_seed=7)  # fmt: skip
    with CacheWriter(directory, meta) as writer, torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            part = slice(start, start + CHUNK)
            logits = model(torch.from_numpy(ids[part])).logits
            names = [f"s{i}" for i in range(start, min(start + CHUNK, len(ids)))]
            fields = meta.layout.encode_tensor(logits, meta.draw_seeds(names), lengths[part])
            writer.append_encoded(names, np.where(np.arange(ids.shape[1]) < lengths[part, None], ids[part], 0), fields)
    reader = CacheReader(directory)
    tokens = int(lengths.sum())
    return {"layout": layout, "logits_dtype": dtype, "tokens": tokens, "bytes": reader.total_bytes,
            "bytes_per_token": reader.total_bytes / tokens, "row_bytes": meta.row_bytes()}  # fmt: skip


def bytes_per_token(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    layers, dim, heads, vocab = args.lm_config
    teacher = harness.write_lm_teacher(root / "gpt2", vocab, args.seq_len, layers=layers, dim=dim, heads=heads, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, vocab, (args.sequences, args.seq_len), dtype=np.int64)
    rows = []
    for packing, lengths in (("packed", np.full(args.sequences, args.seq_len)), ("padded", rng.integers(1, args.seq_len + 1, args.sequences))):
        for layout, dtype in LAYOUTS:
            if layout == "full" and vocab > FULL_VOCAB_LIMIT:
                continue  # refused: full per-token logits are for small vocabularies only
            harness.say(f"bytes: {layout} {dtype}, {packing} ...")
            row = write_cache(root / f"cache-{layout.replace(':', '')}-{dtype}-{packing}", teacher.model, layout, dtype, ids, lengths, vocab)
            rows.append({"packing": packing, **row})
    return rows


def trainer_speed(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kdcache.offline.lm.loss import LMStats
    from kdcache.offline.lm.train import LMConfig, open_run, train_step
    from kdcache.offline.train import setup_distributed

    cache = root / "cache-topk16-float16-packed"
    cfg = LMConfig(caches=[str(cache)], student=args.student, batch_size=args.batch_size, epochs=1000, out=str(root / "run"),
                   seed=args.seed, device="cpu", progress=False, workers=args.workers)  # fmt: skip
    run = open_run(cfg, setup_distributed("cpu"), lambda *a, **k: None)
    data = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in CacheReader(cache).read(("inputs", *run.meta.layout.fields(run.meta.num_classes))).items()}
    generator = torch.Generator().manual_seed(args.seed)

    def memory() -> Any:
        while True:
            order = torch.randperm(len(data["inputs"]), generator=generator)
            for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
                yield {name: values[order[start : start + args.batch_size]] for name, values in data.items()}

    def cached() -> Any:
        epoch = 0
        while True:
            run.stream.set_epoch(epoch)
            yield from run.loader
            epoch += 1

    sources = {"cache": cached(), "memory": memory()}

    def measure(side: str) -> dict[str, Any]:
        stats, batches = LMStats(torch.device("cpu")), sources[side]
        for _ in range(2):
            train_step(run, next(batches), stats)  # warm: the loader's workers, the allocator
        stats = LMStats(torch.device("cpu"))
        started = time.perf_counter()
        for _ in range(args.steps):
            train_step(run, next(batches), stats)
        seconds = time.perf_counter() - started
        tokens = stats.read()["tokens"]
        harness.say(f"  trainer from {side}: {tokens / seconds:,.0f} tokens/s")
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    rounds = harness.alternate(("cache", "memory"), args.repeats, measure)
    ratios = [c["tokens_per_s"] / m["tokens_per_s"] for c, m in zip(rounds["cache"], rounds["memory"], strict=True)]
    return {"student": args.student, "batch_size": args.batch_size, "steps_per_round": args.steps, "workers": run.workers,
            **{f"{side}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs) for side, rs in rounds.items()},
            "ratio_cache_vs_memory": statistics.median(ratios), "ratio_per_round": ratios, "target": ">= 0.95"}  # fmt: skip


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    with harness.workdir("bench-lm-", args.tmpdir, args.keep) as root:
        rows = bytes_per_token(root, args)
        trainer = trainer_speed(root, args)
    return {"env": harness.environment("cpu"), "config": {k: v for k, v in vars(args).items() if k != "json"}, "bytes": rows,
            "trainer": trainer}  # fmt: skip


def report(result: dict[str, Any]) -> None:
    cfg = result["config"]
    harness.print_header(
        "bench.lm: bytes per token of token caches, and offline-distill --task lm from the cache vs memory", result["env"],
        f"teacher    random-weight GPT-2 {cfg['lm_config']} (layers, dim, heads, vocab), {cfg['sequences']} sequences of {cfg['seq_len']}",
    )  # fmt: skip
    harness.table(
        [("packing", ""), ("layout", ""), ("dtype", ""), ("tokens", ",d"), ("bytes/token", ",.1f"), ("row bytes", ",d")],
        [(r["packing"], r["layout"], r["logits_dtype"], r["tokens"], r["bytes_per_token"], r["row_bytes"]) for r in result["bytes"]],
    )
    t = result["trainer"]
    print(f"\ntrainer {t['student']}, batch {t['batch_size']}, {t['steps_per_round']} steps per round, {t['workers']} loader workers")
    print(f"cache {t['cache_tokens_per_s']:,.0f} tokens/s, memory {t['memory_tokens_per_s']:,.0f} tokens/s: "
          f"cache/memory {t['ratio_cache_vs_memory']:.3f} (rounds {' '.join(f'{r:.3f}' for r in t['ratio_per_round'])}; goal {t['target']})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, workdir_of="the teacher and caches")
    p.add_argument("--lm-config", type=int, nargs=4, default=[2, 128, 4, 8192], metavar=("LAYERS", "DIM", "HEADS", "VOCAB"))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--student", default="gpt:layers=2,dim=128,heads=4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=3, help="ABBA rounds")
    p.add_argument("--workers", type=int, default=None, help="the loader's workers (default: offline-distill's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return harness.timed_main(args, run_all, report)


if __name__ == "__main__":
    sys.exit(main())
