"""Command-line recipes: ``offline-distill`` and ``cache-inspect``. The logic lives in the
components they call; these only parse arguments and turn known errors into one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .cache import CacheError, CacheReader
from .cache.layout import TopK
from .cache.manifest import describe_label_names
from .journal import pending_samples
from .malloc import tune_malloc


def fail(prog: str, message: str, code: int = 2) -> int:
    # Errors raised inside DataLoader workers arrive wrapped with the worker's traceback text;
    # the last line is the original message.
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    if len(lines) > 1 and ": " in last and last.split(": ", 1)[0].endswith("Error"):
        last = last.split(": ", 1)[1]
    print(f"{prog}: error: {last}", file=sys.stderr)
    return code


def run_cli(prog: str, body: Callable[[], int], known: tuple[type[BaseException], ...]) -> int:
    try:
        return body()
    except known as exc:
        return fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# offline-distill


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offline-distill",
        description="Train a student on cached teacher outputs (HDF5 shards). Never loads the teacher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cache", nargs="+", required=True, metavar="DIR", help="one or more cache directories")
    p.add_argument("--student", default="mlp", help="a built-in student (see --list-students) or module:factory")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine-annealed over the epochs")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="distillation temperature T (default 4; a cache of topk or sampled targets is defined at its serving "
        "temperature, which is then the default and the only T it takes)",
    )
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term; 0 trains on the labels alone")
    p.add_argument("--loss", choices=("kl", "mse"), default="kl", help="kl: Hinton et al.; mse: logit matching (Caruana; full logits only)")
    p.add_argument(
        "--topk-tail",
        choices=TopK.tails,
        default="bucket",
        help="a topk cache's tail: bucket, one (K+1)-th class holding the rest of the mass (the ghost token); "
        "uniform, the rest spread evenly over the other classes (TinyViT, FKD)",
    )
    p.add_argument(
        "--eval",
        dest="eval_path",
        metavar="SOURCE",
        help="held-out inputs and labels: a transfer set (.npz, .npy, image folder, Parquet, Hugging Face dataset) or a cache directory",
    )
    p.add_argument("--out", default="runs/distill", metavar="RUN_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes reading the shards (default: 0 for caches under 256 MiB, else 2)",
    )
    p.add_argument("--shuffle-buffer", type=int, default=16384, help="rows in each worker's shuffle window")
    p.add_argument("--allow-mixed-teachers", action="store_true", help="train on caches written by different teachers")
    p.add_argument("--skip-corrupt", action="store_true", help="warn about corrupt shards and train without them")
    # On by default: the cheap checks (sizes, HDF5 structure) cannot see a flipped or zeroed
    # byte that keeps a shard's size, and such a shard trains silently on garbage, fails
    # mid-epoch, or makes HDF5 loop forever (bench/corrupt.py). One read of the cache before
    # training costs less than one epoch of reading it; --no-verify-checksums skips it.
    p.add_argument(
        "--verify-checksums",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check every shard's sha256 before HDF5 reads it (one extra read of the cache, by every rank); "
        "without it a damaged shard that kept its size is not noticed before training",
    )
    p.add_argument("--no-export", action="store_true", help="skip the torch.export of the student (student.pt2)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def distill_main(argv: Sequence[str] | None = None) -> int:
    from .models import REGISTRY, ModelSpecError
    from .train import TrainConfig, TrainError, train

    if argv is None:
        argv = sys.argv[1:]
    if "--list-students" in argv:
        print("\n".join(sorted(REGISTRY)))
        return 0
    args = distill_parser().parse_args(argv)
    tune_malloc()  # before DataLoader workers fork and pin-memory threads start

    def body() -> int:
        train(
            TrainConfig(
                caches=args.cache, student=args.student, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                temperature=args.temperature, alpha=args.alpha, eval_path=args.eval_path, out=args.out, seed=args.seed,
                device=args.device, resume=args.resume, loss=args.loss, topk_tail=args.topk_tail, weight_decay=args.weight_decay,
                workers=args.workers, shuffle_buffer=args.shuffle_buffer, allow_mixed_teachers=args.allow_mixed_teachers,
                skip_corrupt=args.skip_corrupt, verify_checksums=args.verify_checksums, progress=not args.no_progress, export=not args.no_export,
            )
        )  # fmt: skip
        return 0

    return run_cli("offline-distill", body, (CacheError, TrainError, ModelSpecError))


# ---------------------------------------------------------------------------------------------
# cache-inspect


def inspect_summary(reader: CacheReader) -> dict[str, Any]:
    meta = reader.meta
    samples = reader.num_samples
    target_bytes = meta.layout.row_bytes(meta.num_classes)
    full_bytes = 4 * meta.num_classes * meta.views_per_id  # what full float32 logits of every view take
    return {
        "directory": str(reader.directory),
        "schema_version": meta.schema_version,
        "shards": len(reader.shards),
        "samples": samples,
        "num_classes": meta.num_classes,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "teacher_name": meta.teacher_name,
        "input_shape": list(meta.input_shape),
        "input_dtype": meta.input_dtype,
        "logits_dtype": meta.logits_dtype,
        "preprocessing": meta.preprocessing.to_dict(),
        "serving_temperature": meta.serving_temperature,
        "temperature_rule": meta.temperature_rule,
        "fixed_temperature": meta.layout.fixed_temperature,  # sparse targets: the trainer takes T_s only
        "views_per_id": meta.views_per_id,
        "augment": meta.augment,
        "logits_layout": meta.logits_layout,
        "target_bytes_per_sample": target_bytes,
        "full_float32_bytes_per_sample": full_bytes,
        "target_fraction_of_full_float32": target_bytes / full_bytes,
        "target_seed": meta.target_seed if meta.layout.randomized else None,
        "provenance": reader.provenance,
        "bytes": reader.total_bytes,
        "bytes_per_sample": reader.total_bytes / samples if samples else None,
        "label_coverage": reader.label_coverage(),
        "label_names": reader.label_names,
        "unlisted_files": reader.unlisted_files(),
        "journal_samples": pending_samples(reader.directory, meta),
    }


def describe_provenance(provenance: dict[str, Any]) -> str:
    """One line for a cache's provenance (manifest.py): the tool and the source it read."""
    tool = " ".join(str(provenance[key]) for key in ("tool", "version") if provenance.get(key)) or "an unnamed tool"
    source = provenance.get("source")
    if not isinstance(source, dict):
        return f"written by {tool}"
    sha = str(source.get("manifest_sha256") or "")
    samples = source.get("samples")
    return (
        f"converted by {tool} from {source.get('directory', '?')} ({source.get('logits_layout', '?')} {source.get('logits_dtype', '?')}"
        + (f", {samples:,} samples" if isinstance(samples, int) else "")
        + (f", manifest sha256 {sha[:12]}…" if sha else "")
        + ")"
        + (f" at {provenance['converted_at']}" if provenance.get("converted_at") else "")
    )


def inspect_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cache-inspect", description="Summarise a teacher-output cache; --verify checks every shard's checksum."
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every shard against the manifest")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    def body() -> int:
        try:
            if args.verify:
                # Checksums before HDF5 parses a shard (a damaged shard can make HDF5 hang, see
                # CacheReader); the corrupt shards are listed, the summary covers the others.
                from tqdm import tqdm

                total = CacheReader(args.directory, check_files=False).total_bytes
                with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.json, file=sys.stderr) as bar:
                    reader = CacheReader(args.directory, skip_corrupt=True, verify_checksums=True, progress=bar)
            else:
                reader = CacheReader(args.directory)
        except CacheError as exc:
            if args.json:
                print(json.dumps({"directory": args.directory, "ok": False, "problems": [str(exc)]}))
            return fail("cache-inspect", str(exc), code=1)
        summary = inspect_summary(reader)
        problems = [problem for _, problem in reader.skipped]
        if args.verify:
            summary["verified"] = True
        summary["ok"] = not problems
        summary["problems"] = problems
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            bps = summary["bytes_per_sample"]
            print(f"cache            {summary['directory']} (schema v{summary['schema_version']})")
            print(f"shards           {summary['shards']}" + (f" readable, {len(problems)} corrupt" if problems else ""))
            print(f"samples          {summary['samples']:,}")
            print(f"classes          {summary['num_classes']}")
            print(f"teacher          {summary['teacher_name']}  {summary['teacher_fingerprint']}")
            print(
                f"inputs           {summary['input_shape']} {summary['input_dtype']}, "
                f"targets {summary['logits_layout']} logits {summary['logits_dtype']}"
            )
            print(f"preprocessing    {summary['preprocessing']}")
            if summary["augment"] is not None or summary["views_per_id"] > 1:
                policy = summary["augment"] or {"name": "none", "params": {}, "version": 1}
                params = ", ".join(f"{k}={v}" for k, v in policy["params"].items())
                print(
                    f"views            {summary['views_per_id']} per sample, replayed from their seeds; "
                    f"policy {policy['name']}{f' ({params})' if params else ''}, version {policy['version']}"
                )
            print(
                f"target bytes     {summary['target_bytes_per_sample']:,}/sample, "
                f"{summary['target_fraction_of_full_float32']:.1%} of full float32 ({summary['full_float32_bytes_per_sample']:,})"
            )
            if summary["target_seed"] is not None:
                print(f"target seed      {summary['target_seed']} (the salt of the sampled draws)")
            if summary["provenance"]:
                print(f"provenance       {describe_provenance(summary['provenance'])}")
            rule = (
                f"{summary['logits_layout']} targets: distilled at this T only"
                if summary["fixed_temperature"]
                else "soft targets valid at any T"
                if summary["temperature_rule"] == "any"
                else "soft targets exact only at this T"
            )
            print(f"serving T        {summary['serving_temperature']} ({rule})")
            print(f"size             {summary['bytes']:,} bytes" + (f", {bps:,.1f} bytes/sample" if bps else ""))
            print(f"label coverage   {summary['label_coverage']:.1%}")
            if summary["label_names"] is not None:
                print(f"label names      {describe_label_names(summary['label_names'])}")
            if summary["unlisted_files"]:
                print(f"not published    {', '.join(summary['unlisted_files'])} (left by an interrupted writer; ignored)")
            if summary["journal_samples"]:
                print(
                    f"journal          {summary['journal_samples']:,} samples acknowledged by teacher-serve and not yet in a "
                    "published shard (published when the service stops, or when it restarts after a crash)"
                )
            if args.verify:
                print("checksums        " + ("all match" if not problems else f"{len(problems)} shard(s) corrupt"))
        for line in problems:
            print(f"cache-inspect: corrupt: {line}", file=sys.stderr)
        return 1 if problems else 0

    return run_cli("cache-inspect", body, (CacheError,))


if __name__ == "__main__":
    sys.exit(distill_main())
