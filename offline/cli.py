"""Command-line recipes: ``offline-distill`` and ``cache-inspect``. The logic lives in the
components they call; these only parse arguments and turn known errors into one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .cache import CacheError, CacheReader
from .cache.clusters import CLASSES_FORMS, HEADS
from .cache.diagnostics import SoftTargetStats, soft_target_warnings
from .cache.label_names import describe_label_names, printable
from .cache.layout import TopK
from .cache.reader import read_rows
from .cache.remote import configure_downloads
from .cache.trust import TRUST_HELP, UntrustedCode
from .cli_help import HelpFormatter
from .dataset import DEFAULT_SHUFFLE_BYTES
from .journal import Unpublished, unpublished
from .lm.defaults import DEFAULT_STUDENT as LM_STUDENT
from .lm.defaults import LM_RULE
from .malloc import tune_malloc
from .recipe import DEFAULT_RULE, SCHEDULES, WARMUP_SHARE


def fail(prog: str, message: str, code: int = 2) -> int:
    # Errors raised inside DataLoader workers arrive wrapped with the worker's traceback text;
    # the last line is the original message.
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    if len(lines) > 1 and ": " in last and last.split(": ", 1)[0].endswith("Error"):
        last = last.split(": ", 1)[1]
    print(f"{prog}: error: {printable(last)}", file=sys.stderr)  # it may quote a cache's contents
    return code


# The exit status of a process that SIGPIPE ends (128 + 13), which a shell reports for
# `yes | head -1`: the output was cut short, and pipefail may say so.
CLOSED_PIPE = 141


def run_cli(prog: str, body: Callable[[], int], known: tuple[type[BaseException], ...]) -> int:
    try:
        code = body()
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try, not at exit
        return code
    except known as exc:
        return fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cache-inspect --json | head -1`): stop quietly. Python's own
        # flush at exit would meet the closed pipe again, so stdout now points at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE


# ---------------------------------------------------------------------------------------------
# offline-distill


class ListStudents(argparse.Action):
    """``--list-students``: print the built-in students and exit, as ``--help`` does (so before
    the required ``--cache`` is asked for)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        from . import models  # torch, only when asked

        print(models.describe_students())
        parser.exit()


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="offline-distill",
        description="Train a student on cached teacher outputs (HDF5 shards). Never loads the teacher.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--cache", nargs="+", required=True, metavar="DIR",
        help="one or more caches: directories, or URLs such as s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)",
    )  # fmt: skip
    p.add_argument(
        "--local-cache", metavar="DIR", default=None,
        help="where the shards of a cache on object storage are downloaded, whole and checked, before training reads them "
        "(default: kd-shards under the temp directory)",
    )  # fmt: skip
    p.add_argument(
        "--local-cache-gb", type=float, metavar="G", default=None,
        help="the local cache's budget; the least recently used shards go first (default 16)",
    )  # fmt: skip
    p.add_argument(
        "--task", choices=TASKS, default=None,
        help="classify, a classifier's cache; lm, a language model's token cache (default: the cache's task, from its metadata)",
    )  # fmt: skip
    p.add_argument(
        "--student", default=None,
        help="a built-in student (see --list-students) or module:factory; for --task lm, gpt:layers=L,dim=D,heads=H[,dropout=P] "
        f"(a small GPT with the cache's vocabulary and context) or hf:CONFIG_DIR (a transformers config: fresh weights) "
        f"(default: mlp, or the arch of --init's student.pt; {LM_STUDENT} for --task lm)",
    )  # fmt: skip
    p.add_argument("--list-students", action=ListStudents, help="print the built-in students and exit")
    p.add_argument(
        "--init", metavar="STUDENT_PT",
        help="start from the weights of a student.pt that offline-distill wrote (read as data, weights_only), for the same inputs "
        "and classes; its arch is the student (a module:factory arch needs --trust-code)",
    )  # fmt: skip
    p.add_argument(
        "--specialist", metavar="CLASSES",
        help=f"train a specialist (Hinton et al. 2015, section 5) on a cluster of classes: {CLASSES_FORMS}; half of each epoch's "
        "samples are the cluster's, and --init starts it from a generalist",
    )  # fmt: skip
    p.add_argument(
        "--specialist-head", choices=HEADS, default="full",
        help="a specialist's outputs: full, the C-way softmax (section 6.1); dustbin, the cluster's K classes and one for all the "
        "others (K+1), trained on the teacher's distribution pooled the same way (default: full, chosen on validation)",
    )  # fmt: skip
    recipe = "default: the recipe's, printed at the start and recorded in metrics.json"
    p.add_argument(
        "--epochs", type=int, default=None, help=f"passes over the cache ({recipe}: enough for about {DEFAULT_RULE.steps:,} steps, "
        f"{DEFAULT_RULE.min_epochs} to {DEFAULT_RULE.max_epochs} epochs; --task lm: about {LM_RULE.steps:,} steps, {LM_RULE.min_epochs} to "
        f"{LM_RULE.max_epochs} epochs)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=None,
        help=f"samples per step ({recipe}: {DEFAULT_RULE.batch_size}; --task lm: {LM_RULE.batch_size} sequences)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({recipe}: {DEFAULT_RULE.lr:g}; --task lm: {LM_RULE.lr:g})")
    p.add_argument(
        "--max-steps", type=int, default=None, metavar="N",
        help="--task lm: stop after N optimiser steps in all, the schedule fitted to them (without it, every step of the epochs)",
    )  # fmt: skip
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=None,
        help=f"the learning rate over the steps: warmup-cosine (a linear warm-up over {WARMUP_SHARE:.0%}% of them, then cosine to 0), "
        f"cosine, or constant ({recipe}: {DEFAULT_RULE.schedule})",
    )  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="distillation temperature T (default 4, and the serving temperature for --task lm; a cache of topk or sampled "
        "targets is defined at its serving temperature, the only T it takes)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"weight of the soft term; 0 trains on the labels alone, or for --task lm on the next-token cross-entropy alone "
        f"({recipe}: {DEFAULT_RULE.alpha:g}; --task lm: {LM_RULE.alpha:g})",
    )
    p.add_argument(
        "--label-fraction", type=float, default=1.0, metavar="F",
        help="keep the labels of a seeded fraction F of the samples and train the rest on soft targets alone (the paper's section 6)",
    )  # fmt: skip
    p.add_argument("--label-seed", type=int, default=0, help="which samples --label-fraction keeps labelled: a function of (seed, id)")
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
        help="held-out inputs and labels: a transfer set (.npz, .npy, image folder, Parquet, Hugging Face dataset) or a cache directory; "
        "for --task lm, an .npz of input_ids [N, L'] (and lengths [N]) for the perplexity, or a token cache directory for the "
        "perplexity and the top-1 agreement with its teacher",
    )
    p.add_argument(
        "--out", default="runs/distill", metavar="RUN_DIR", help="where the student, checkpoint.pt, metrics.json and curves.png go"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the student's initialisation and of the sample order")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--resume", action="store_true",
        help="continue from RUN_DIR/checkpoint.pt (read as data, weights_only; the student is the one --student names), from the "
        "sample it stopped at, on any number of processes: the order of samples depends on --seed, the caches and the shuffle window alone",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="N",
        help="also write RUN_DIR/checkpoint.pt after every N-th optimiser step, with the position in the epoch, so that --resume "
        "continues mid-epoch (without it, after each epoch only)",
    )  # fmt: skip
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes reading the shards (default: 0 for caches under 256 MiB, else 2)",
    )
    p.add_argument(
        "--shuffle-mb", type=float, default=DEFAULT_SHUFFLE_BYTES >> 20, metavar="MB",
        help="the shuffle window, in MiB of cache rows (the cache's bytes per row decide how many; at least one batch); each "
        "process holds its share of a window",
    )  # fmt: skip
    p.add_argument(
        "--shuffle-buffer", type=int, default=None, metavar="ROWS",
        help="the shuffle window in rows instead of --shuffle-mb (what it was before the window was counted in bytes)",
    )  # fmt: skip
    p.add_argument(
        "--allow-vocab-padding", action="store_true",
        help="--task lm: accept a student whose vocabulary differs from the cache's when every token id and target index the "
        "cache stores is below the smaller of the two (checked by reading the whole cache)",
    )  # fmt: skip
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
    from .cache.views import PolicyError
    from .lm.student import StudentError
    from .models import ModelSpecError
    from .train import TrainConfig, TrainError, train

    args = distill_parser().parse_args(argv)
    tune_malloc()  # before DataLoader workers fork and pin-memory threads start

    def body() -> int:
        configure_downloads(args.local_cache, args.local_cache_gb)
        if settle_task(args) == "lm":
            return distill_lm(args)
        train(
            TrainConfig(
                caches=args.cache, student=args.student, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                schedule=args.schedule, label_fraction=args.label_fraction, label_seed=args.label_seed,
                temperature=args.temperature, alpha=args.alpha, eval_path=args.eval_path, out=args.out, seed=args.seed,
                device=args.device, resume=args.resume, loss=args.loss, topk_tail=args.topk_tail, weight_decay=args.weight_decay,
                workers=args.workers, shuffle_buffer=args.shuffle_buffer, allow_mixed_teachers=args.allow_mixed_teachers,
                skip_corrupt=args.skip_corrupt, verify_checksums=args.verify_checksums, progress=not args.no_progress, export=not args.no_export,
                trust_code=args.trust_code, specialist=args.specialist, specialist_head=args.specialist_head, init=args.init,
                shuffle_bytes=shuffle_bytes(args), checkpoint_every=args.checkpoint_every,
            )
        )  # fmt: skip
        return 0

    return run_cli("offline-distill", body, (CacheError, TrainError, ModelSpecError, PolicyError, UntrustedCode, StudentError))


TASKS = ("classify", "lm")
# Options of one task only: (the option, its dest, the value that means "not given").
CLASSIFY_ONLY = (
    ("--init", "init", None), ("--specialist", "specialist", None), ("--specialist-head", "specialist_head", "full"),
    ("--label-fraction", "label_fraction", 1.0), ("--label-seed", "label_seed", 0), ("--loss", "loss", "kl"),
)  # fmt: skip
LM_ONLY = (("--max-steps", "max_steps", None), ("--allow-vocab-padding", "allow_vocab_padding", False))


def shuffle_bytes(args: argparse.Namespace) -> int:
    return int(args.shuffle_mb * (1 << 20))


def settle_task(args: argparse.Namespace) -> str:
    """``--task``, or the first cache's; a task the cache is not of, or an option of the other
    task, is refused in one line (TrainError)."""
    from .train import TrainError

    cache_task = CacheReader(args.cache[0], check_files=False).meta.task  # the manifest only: the trainer checks the shards
    task = args.task or cache_task
    if task != cache_task:
        kinds = {"classify": "a classifier's cache (task classify)", "lm": "a language model's token cache (task lm)"}
        raise TrainError(f"--task {task}: {args.cache[0]} is {kinds[cache_task]}; train it with --task {cache_task}")
    for option, dest, unset in LM_ONLY if task == "classify" else CLASSIFY_ONLY:
        if getattr(args, dest) != unset:
            raise TrainError(f"{option} does not apply to --task {task}")
    return task


def distill_lm(args: argparse.Namespace) -> int:
    """``offline-distill --task lm`` (offline/lm/train.py)."""
    from .lm.train import LMConfig, train_lm

    train_lm(
        LMConfig(
            caches=args.cache, student=args.student, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
            schedule=args.schedule, temperature=args.temperature, topk_tail=args.topk_tail, weight_decay=args.weight_decay,
            max_steps=args.max_steps, eval_path=args.eval_path, out=args.out, seed=args.seed, device=args.device, resume=args.resume,
            workers=args.workers, shuffle_buffer=args.shuffle_buffer, shuffle_bytes=shuffle_bytes(args),
            allow_vocab_padding=args.allow_vocab_padding, allow_mixed_teachers=args.allow_mixed_teachers, skip_corrupt=args.skip_corrupt,
            verify_checksums=args.verify_checksums, progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
        )
    )  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# cache-inspect


def inspect_summary(reader: CacheReader) -> dict[str, Any]:
    """What ``cache-inspect`` reports. ``samples`` counts the published shards' samples
    (``published_samples``) and the journal's that no published shard holds yet
    (``journal_samples``: acknowledged by teacher-serve, published when it stops or restarts);
    so do ``label_coverage`` and the soft-target statistics."""
    meta = reader.meta
    # A sample that two writers both stored is one sample (CacheReader.duplicates).
    published = reader.num_samples - sum(int(skip.sum()) for skip in reader.duplicates().values())
    if isinstance(reader.directory, str):  # a bucket: the journals are in the writers' spools
        journal = Unpublished([], meta.layout.empty(meta.num_classes), np.empty(0, np.int64))
    else:
        journal = unpublished(reader.directory, meta, (read_rows(info, ("ids",))["ids"] for info in reversed(reader.shards)))
    samples = published + len(journal.ids)
    labelled = round(reader.label_coverage() * published) + int((journal.labels >= 0).sum())
    accumulator = reader.soft_target_stats()  # at the serving temperature, over a bounded sample
    if journal.ids:
        accumulator.add_stored(meta.layout, journal.fields, journal.labels)  # as a cache hit answers them
    soft_targets = accumulator.stats()
    target_bytes = meta.layout.row_bytes(meta.num_classes)
    full_bytes = 4 * meta.num_classes * meta.views_per_id  # what full float32 logits of every view take
    return {
        "directory": str(reader.directory),
        "schema_version": meta.schema_version,
        "shards": len(reader.shards),
        "samples": samples,
        "published_samples": published,
        "journal_samples": len(journal.ids),
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
        "bytes_per_sample": reader.total_bytes / published if published else None,
        "label_coverage": labelled / samples if samples else 0.0,
        "sampled_shards": len(reader.sampled_shards()),
        "soft_targets": soft_targets.to_dict(),
        "warnings": soft_target_warnings(soft_targets),
        "label_names": reader.label_names,
        "unlisted_files": reader.unlisted_files(),
        **(token_summary(reader, journal.fields) if meta.task == "lm" else {}),
    }


def token_summary(reader: CacheReader, journal_fields: dict[str, np.ndarray]) -> dict[str, Any]:
    """A token cache's own figures: its vocabulary, its sequence length, the tokens it holds
    (published and in the journal) and the bytes each published token costs."""
    meta = reader.meta
    published = sum(int(read_rows(info, ("lengths",))["lengths"].sum()) for info in reader.shards)
    pending = int(np.asarray(journal_fields["lengths"], dtype=np.int64).sum())
    return {
        "task": "lm",
        "vocab_size": meta.num_classes,
        "sequence_length": meta.input_shape[0],
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "tokens": published + pending,
        "published_tokens": published,
        "bytes_per_token": reader.total_bytes / published if published else None,
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


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cache-inspect", description="Summarise a teacher-output cache; --verify checks every shard's checksum."
    )
    p.add_argument("directory", metavar="DIR", help="the cache directory (the one holding manifest.json)")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every shard against the manifest")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--clusters", type=int, metavar="K",
        help="instead of the summary, propose K disjoint clusters of confusable classes for specialists (Hinton et al. 2015, "
        "section 5), from every cached prediction at the serving temperature; with --json, the clusters file that @FILE:k "
        "names (offline-distill --specialist)",
    )  # fmt: skip
    p.add_argument(
        "--cluster-method", choices=("spectral", "covariance"), default="spectral",
        help="spectral: spectral clustering of the classes' confusion (the mass predictions share); covariance: the paper's "
        "K-means on the columns of the predictions' covariance, which tends to give one large cluster and single classes "
        "(default: spectral)",
    )  # fmt: skip
    p.add_argument(
        "--trust-code", action="store_true",
        help="accepted as by the other commands, and changes nothing: cache-inspect shows the name of any code a cache names "
        "and never imports it",
    )  # fmt: skip
    return p


def inspect_main(argv: Sequence[str] | None = None) -> int:
    args = inspect_parser().parse_args(argv)
    if args.clusters is not None:
        return inspect_clusters(args)

    def body() -> int:
        try:
            if args.verify:
                # Checksums before HDF5 parses a shard (a damaged shard can make HDF5 hang, see
                # CacheReader); the corrupt shards are listed, the summary covers the others.
                from tqdm import tqdm

                total = CacheReader(args.directory, check_files=False, report_bad_label_names=True).total_bytes
                with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=args.json, file=sys.stderr) as bar:
                    reader = CacheReader(
                        args.directory, skip_corrupt=True, verify_checksums=True, progress=bar, report_bad_label_names=True
                    )
            else:
                reader = CacheReader(args.directory, report_bad_label_names=True)  # damaged label names: shown below, the rest too
            summary = inspect_summary(reader)  # reads a sample of rows: damage in them is found here
        except CacheError as exc:
            if args.json:
                print(json.dumps({"directory": args.directory, "ok": False, "problems": [str(exc)]}))
            return fail("cache-inspect", str(exc), code=1)
        corrupt = [problem for _, problem in reader.skipped]
        problems = corrupt + ([reader.label_names_problem] if reader.label_names_problem else [])
        if args.verify:
            summary["verified"] = True
        summary["ok"] = not problems
        summary["problems"] = problems
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            bps = summary["bytes_per_sample"]
            # Anything read from the cache is printed through printable(): a manifest may hold
            # control characters (a forged line, a recoloured terminal) or lone surrogates.
            print(printable(f"cache            {summary['directory']} (schema v{summary['schema_version']})"))
            print(f"shards           {summary['shards']}" + (f" readable, {len(corrupt)} corrupt" if corrupt else ""))
            journal = summary["journal_samples"]
            print(
                f"samples          {summary['samples']:,}"
                + (f" ({summary['published_samples']:,} in published shards, {journal:,} in the journal)" if journal else "")
            )
            if summary.get("task") == "lm":
                bpt = summary["bytes_per_token"]
                print(
                    f"tokens           {summary['tokens']:,} in sequences of up to {summary['sequence_length']:,}, "
                    f"vocabulary {summary['vocab_size']:,}" + (f", {bpt:,.1f} bytes/token" if bpt else "")
                )
            else:
                print(f"classes          {summary['num_classes']}")
            print(printable(f"teacher          {summary['teacher_name']}  {summary['teacher_fingerprint']}"))
            print(
                f"inputs           {summary['input_shape']} {summary['input_dtype']}, "
                f"targets {summary['logits_layout']} logits {summary['logits_dtype']}"
            )
            print(printable(f"preprocessing    {summary['preprocessing']}"))
            if summary["augment"] is not None or summary["views_per_id"] > 1:
                print(
                    printable(
                        f"views            {summary['views_per_id']} per sample, replayed from their seeds; "
                        f"policy {reader.meta.augment_text}, version {(summary['augment'] or {'version': 1})['version']}"
                    )
                )
            print(
                f"target bytes     {summary['target_bytes_per_sample']:,}/sample, "
                f"{summary['target_fraction_of_full_float32']:.1%} of full float32 ({summary['full_float32_bytes_per_sample']:,})"
            )
            if summary["target_seed"] is not None:
                print(f"target seed      {summary['target_seed']} (the salt of the sampled draws)")
            if summary["provenance"]:
                print(printable(f"provenance       {describe_provenance(summary['provenance'])}"))
            rule = (
                f"{summary['logits_layout']} targets: distilled at this T only"
                if summary["fixed_temperature"]
                else "soft targets valid at any T"
                if summary["temperature_rule"] == "any"
                else "soft targets exact only at this T"
            )
            print(f"serving T        {summary['serving_temperature']} ({rule})")
            print(f"size             {summary['bytes']:,} bytes" + (f", {bps:,.1f} bytes/sample" if bps else ""))
            estimated = f" (estimated from {summary['sampled_shards']} of {summary['shards']} shards)" if summary["sampled_shards"] < summary["shards"] else ""
            print(f"label coverage   {summary['label_coverage']:.1%}" + (" (the journal's samples included)" if journal else "") + estimated)
            print(f"soft targets     {SoftTargetStats(**summary['soft_targets']).describe()}")
            if summary["label_names"] is not None:
                print(f"label names      {describe_label_names(summary['label_names'])}")
            elif reader.label_names_problem:
                print("label names      damaged, not shown (below)")
            if summary["unlisted_files"]:
                print(printable(f"not published    {', '.join(summary['unlisted_files'])} (left by an interrupted writer; ignored)"))
            if journal:
                print(
                    f"journal          {journal:,} samples acknowledged by teacher-serve and not yet in a published shard, "
                    "counted above (published when the service stops, or when it restarts after a crash)"
                )
            if args.verify:
                print("checksums        " + ("all match" if not corrupt else f"{len(corrupt)} shard(s) corrupt"))
            for warning in summary["warnings"]:
                print(printable(f"warning: {warning}"))
        for line in corrupt:
            print(printable(f"cache-inspect: corrupt: {line}"), file=sys.stderr)
        if reader.label_names_problem:
            print(printable(f"cache-inspect: error: {reader.label_names_problem}"), file=sys.stderr)
        return 1 if problems else 0

    return run_cli("cache-inspect", body, (CacheError,))


def inspect_clusters(args: argparse.Namespace) -> int:
    """``cache-inspect DIR --clusters K [--json]`` (``offline.clustering``): nothing on stdout
    but the clusters on success, so that ``--json > clusters.json`` is a clusters file or empty."""
    from .clustering import ClusteringError, cluster_classes

    def body() -> int:
        try:
            reader = CacheReader(args.directory, verify_checksums=args.verify, report_bad_label_names=True)
            result = cluster_classes(reader, args.clusters, method=args.cluster_method, progress=True)
        except CacheError as exc:
            return fail("cache-inspect", str(exc), code=1)
        if reader.label_names_problem:
            print(printable(f"cache-inspect: warning: label names not shown: {reader.label_names_problem}"), file=sys.stderr)
        print(result.to_json_text(args.directory) if args.json else "\n".join(result.describe()))
        return 0

    return run_cli("cache-inspect", body, (ClusteringError,))


if __name__ == "__main__":
    sys.exit(distill_main())
