"""The offline training loop: a student learns from cached teacher outputs; no teacher is loaded.

Read it top to bottom: the config (with the recipe for what the user left out), the set-up
(device and process group, DataLoader workers), then the loop that ``train`` runs: ``open_run``
opens the caches and builds the student, ``announce`` says what it trains with, and each epoch
(``train_epoch``) streams batches through ``train_step``, evaluates, logs and checkpoints (with
``--checkpoint-every``, mid-epoch too, so that ``--resume`` continues from the same sample). What
the run writes is in ``outputs.py``; what ``--specialist`` and ``--init`` change, in
``specialist.py``. Under ``torchrun`` the same loop runs with DDP (gloo on the CPU, nccl on
CUDA); each rank takes its slice of each global batch (``dataset.Split``) and only rank 0
writes files.
The benchmarks import ``train_step`` and ``EpochStats``, so that they time exactly this step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import models, outputs
from .cache import CacheError, CacheMeta, CacheReader
from .cache.diagnostics import soft_target_warnings
from .cache.label_names import describe_label_names, merge_label_names, printable
from .dataset import DEFAULT_SHUFFLE_BYTES, ShardStream, open_caches, shard_window_for
from .evaluate import EvalSetError, evaluate, evaluate_ece, load_eval_set
from .losses import LOSS_KINDS, TOPK_TAILS, Objective
from .outputs import CHECKPOINT_NAME, Checkpoint, CheckpointError, export_program, run_summary, save_atomic, student_record, write_outputs
from .recipe import DEFAULT_RULE, SCHEDULES, Recipe, lr_factor
from .specialist import DEFAULT_HEAD, SpecialistError, Start, prepare
from .step import EpochStats, step_on_inputs, train_step
from .warmstart import InitError

# Below this size the shards sit in the page cache and reading them in the training process is
# cheaper than shipping batches from worker processes (docs/benchmarks.md).
AUTO_WORKERS_BYTES = 256 << 20


DEFAULT_TEMPERATURE = 4.0
# What a resumed run must share with the checkpoint's (and a specialist's head, with --specialist).
RESUME_FIXED = ("student", "epochs", "batch_size", "schedule", "specialist")
# For tests of the order: KDCACHE_TRACE_IDS=DIR makes each rank write the ids it trains on (IdTrace).
TRACE_ENV = "KDCACHE_TRACE_IDS"


class TrainError(Exception):
    """A bad argument or input file, explained in one line."""


@dataclass
class TrainConfig:
    caches: list[str]
    student: str | None = "mlp"  # None: --init's arch, else mlp
    # None: the recipe's default for the caches (recipe.DEFAULT_RULE, settled by with_recipe).
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    temperature: float | None = None  # None: DEFAULT_TEMPERATURE, or a sparse cache's serving temperature
    alpha: float | None = None
    schedule: str | None = None
    label_fraction: float = 1.0  # keep the labels of this seeded fraction of the samples (paper, section 6)
    label_seed: int = 0
    eval_path: str | None = None
    out: str = "runs/distill"
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    loss: str = "kl"
    topk_tail: str = "bucket"
    weight_decay: float = 0.0
    workers: int | None = None  # None: default_workers(the caches' bytes)
    checkpoint_every: int | None = None  # also write checkpoint.pt after every N-th optimiser step
    shuffle_buffer: int | None = None  # rows in the shuffle window; None: shuffle_bytes decides
    shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES
    allow_mixed_teachers: bool = False
    skip_corrupt: bool = False
    verify_checksums: bool = False
    progress: bool = True
    export: bool = True
    trust_code: bool = False  # import a module:factory augment policy or --init arch that a file names
    specialist: str | None = None  # train a specialist on these classes (specialist.py): "3,5,8" or "@clusters.json:K"
    specialist_head: str = DEFAULT_HEAD  # dustbin or full (specialist.HEADS)
    init: str | None = None  # start from this student.pt (a generalist's, for a specialist)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise TrainError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise TrainError(f"--label-fraction must lie in (0, 1], got {self.label_fraction}")
        if self.temperature is not None and not self.temperature > 0:
            raise TrainError(f"--temperature must be > 0, got {self.temperature}")
        if self.topk_tail not in TOPK_TAILS:
            raise TrainError(f"--topk-tail must be one of {', '.join(TOPK_TAILS)}, got {self.topk_tail!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise TrainError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.loss not in LOSS_KINDS:
            raise TrainError(f"--loss must be kl or mse, got {self.loss!r}")
        if self.workers is not None and self.workers < 0:
            raise TrainError(f"--workers must be >= 0, got {self.workers}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise TrainError(f"--checkpoint-every must be >= 1 step, got {self.checkpoint_every}")
        check_shuffle(self.shuffle_bytes, self.shuffle_buffer)

    def for_caches(self, metas: Sequence[CacheMeta]) -> TrainConfig:
        """This config with its temperature settled for these caches. Full logits take any T
        (default ``DEFAULT_TEMPERATURE``). Top-k and sampled targets are the teacher's
        distribution at the serving temperature T_s and cannot be re-tempered: T defaults to
        T_s, and another T is refused, as is the mse loss, which needs every logit."""
        fixed = {m.serving_temperature: m for m in metas if m.layout.fixed_temperature}
        if not fixed:
            return replace(self, temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature)
        meta = next(iter(fixed.values()))
        what = f"this cache holds {meta.logits_layout} targets"
        if len(fixed) > 1:
            raise TrainError(
                f"these caches hold {meta.logits_layout} targets made at different serving temperatures ({', '.join(f'{t:g}' for t in sorted(fixed))}); they cannot be trained on together"
            )
        if self.loss != "kl":
            raise TrainError(f"{what}; --loss {self.loss} needs full logits (use --loss kl)")
        t_s = meta.serving_temperature
        if self.temperature is not None and self.temperature != t_s:
            raise TrainError(
                f"{what}, made at the serving temperature T={t_s:g}, and sparse targets cannot be re-tempered: "
                f"--temperature must be {t_s:g} (or omitted), got {self.temperature:g}"
            )
        return replace(self, temperature=t_s)

    def with_recipe(self, samples: int) -> tuple[TrainConfig, Recipe]:
        """This config with what the user left out taken from the recipe for ``samples``."""
        recipe = DEFAULT_RULE.recipe(
            samples, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size, schedule=self.schedule, alpha=self.alpha
        )
        settled = replace(
            self, lr=recipe.lr, epochs=recipe.epochs, batch_size=recipe.batch_size, schedule=recipe.schedule, alpha=recipe.alpha
        )
        return settled, recipe

    def objective(self, meta: CacheMeta) -> Objective:
        assert self.temperature is not None and self.alpha is not None, "for_caches and with_recipe settle them"
        return Objective(self.temperature, self.alpha, self.loss, targets=meta.layout.name, tail=self.topk_tail)


def check_shuffle(shuffle_bytes: int, shuffle_buffer: int | None) -> None:
    """``--shuffle-mb`` and ``--shuffle-buffer``, as both tasks take them."""
    if not shuffle_bytes > 0:
        raise TrainError(f"--shuffle-mb must be > 0, got {shuffle_bytes / (1 << 20):g}")
    if shuffle_buffer is not None and shuffle_buffer < 1:
        raise TrainError(f"--shuffle-buffer must be >= 1 row, got {shuffle_buffer}")


# ---------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Pick the device; join the process group when started by torchrun."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise TrainError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but torch sees no CUDA device")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=torch.device(device if device.startswith("cuda:") else ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        device=torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"),
    )


def cache_label_names(readers: list[CacheReader]) -> list[str] | None:
    """The label names the caches record (their manifests' ``label_names``), merged: caches
    that number their classes differently cannot be trained on together."""
    names = None
    for reader in readers:
        if reader.label_names is not None:
            try:
                names = merge_label_names(names, reader.label_names, str(reader.directory))
            except CacheError as exc:
                raise TrainError(f"{exc}; the caches cannot be trained on together") from None
    return names


def describe_views(meta: CacheMeta) -> str | None:
    """The views a cache's samples are trained on, in one line (None for a cache without views),
    escaped for a terminal: the policy's name and parameters come from the cache."""
    if not meta.has_views:
        return None
    return printable(
        f"views: {meta.views_per_id} per sample, policy {meta.augment_text}; "
        f"each epoch trains on one view of each sample, replayed from its seed"
    )


def default_workers(total_bytes: int) -> int:
    """DataLoader worker processes when ``--workers`` is not given, from the caches' size."""
    return 0 if total_bytes < AUTO_WORKERS_BYTES else 2


class IdTrace:
    """With ``KDCACHE_TRACE_IDS=DIR`` in the environment (for tests of the order), each rank
    appends to ``DIR/ids-rank<r>.jsonl`` one line per optimiser step: [epoch (0-based), the
    position in the epoch after the step (``Split.end``), the ids of the samples it trained on]."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_env(cls, rank: int) -> IdTrace | None:
        directory = os.environ.get(TRACE_ENV)
        return cls(Path(directory) / f"ids-rank{rank}.jsonl") if directory else None

    def record(self, epoch: int, position: int, ids: Sequence[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps([epoch, position, [str(i) for i in ids]]) + "\n")


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student on cached teacher outputs. Returns the summary written to metrics.json."""
    cfg.check()
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    except (EvalSetError, CheckpointError, SpecialistError, InitError) as exc:
        raise TrainError(str(exc)) from None
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


@dataclass
class Run:
    """Everything one run trains with, set up by ``open_run``."""

    cfg: TrainConfig
    dist: Dist
    readers: list[CacheReader]
    meta: CacheMeta
    recipe: Recipe
    label_names: list[str] | None
    eval_set: Any
    out: Path
    student: nn.Module
    model: nn.Module  # the student, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    stream: ShardStream
    workers: int
    start: Start  # what --specialist and --init change
    scheduler: Any = None
    loader: Any = None
    trace: IdTrace | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0  # optimiser steps taken
    total_steps: int = 0  # the schedule's length
    progress: outputs.Progress = field(default_factory=outputs.Progress)  # where the run resumed


def open_run(cfg: TrainConfig, dist: Dist, log: Any) -> Run:
    """Open the caches, settle the temperature and the recipe, build the student, its optimiser,
    the stream and the per-step schedule; resume from the checkpoint when asked."""
    readers, meta = open_caches(
        cfg.caches, allow_mixed_teachers=cfg.allow_mixed_teachers, skip_corrupt=cfg.skip_corrupt, verify_checksums=cfg.verify_checksums
    )
    cfg = cfg.for_caches([reader.meta for reader in readers])
    cfg, recipe = cfg.with_recipe(sum(reader.num_samples for reader in readers))
    for reader in readers:
        for name, problem in reader.skipped:
            log(f"warning: skipping corrupt shard {reader.storage.where(name)}: {problem}", file=sys.stderr)
    label_names = cache_label_names(readers)
    start = prepare(cfg, readers, meta)  # --specialist and --init (specialist.py); the student's arch
    cfg = replace(cfg, student=start.arch)
    eval_set = start.eval_set(load_eval_set(cfg.eval_path, meta, label_names=label_names)) if cfg.eval_path else None
    trace = IdTrace.from_env(dist.rank)
    # Before anything is written: a cache whose policy is code is refused here without --trust-code.
    window, window_note = shard_window_for([info for reader in readers for info in reader.shards])
    if window_note and dist.is_main:
        log(window_note)
    stream = ShardStream.from_readers(
        readers, meta, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, shuffle_bytes=cfg.shuffle_bytes,
        skip_corrupt=cfg.skip_corrupt, rank=dist.rank, world_size=dist.world_size,
        label_fraction=cfg.label_fraction, label_seed=cfg.label_seed, trust_code=cfg.trust_code,
        repeats=start.enrichment, transform=start.transform, with_ids=trace is not None, shard_window=window,
    )  # fmt: skip

    out = Path(cfg.out)
    if (out / CHECKPOINT_NAME).exists() and not cfg.resume:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    student = start.build_student().to(dist.device)  # start.meta: the head's classes
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    workers = cfg.workers if cfg.workers is not None else default_workers(sum(r.total_bytes for r in readers))
    model: nn.Module = student
    if dist.world_size > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    run = Run(cfg, dist, readers, start.meta, recipe, label_names, eval_set, out, student, model, optimizer, stream, workers, start)
    run.trace = trace
    # The schedule runs per step, over every step of the run: the global batches of its epochs.
    run.total_steps = stream.steps_until(cfg.epochs)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.schedule, step, run.total_steps))
    run.progress = outputs.resume(run, log, RESUME_FIXED + (("specialist_head",) if cfg.specialist else ()))
    if run.steps:  # what is left, on this run's world size
        run.total_steps = run.steps + stream.steps_until(cfg.epochs, run.progress.epochs, run.progress.sample)
        outputs.continue_schedule(run.scheduler, optimizer)
    run.loader = stream.loader(workers, pin_memory=dist.device.type == "cuda")
    return run


def announce(run: Run, log: Any) -> list[str]:
    """Say what the run trains, with what recipe, on what; return the warnings about the setup."""
    cfg, meta, stream = run.cfg, run.meta, run.stream
    log(
        f"training {cfg.student} ({models.count_parameters(run.student):,} parameters) on {stream.num_samples:,} samples "
        f"from {len(stream.shards)} shard(s), teacher {printable(meta.teacher_name)} {printable(meta.teacher_fingerprint[:12])}, "
        f"T={cfg.temperature} alpha={cfg.alpha}, device {run.dist.device}, {run.dist.world_size} process(es)"
    )
    log(run.recipe.describe())
    views = describe_views(meta)
    if views:
        log(views)
    if cfg.label_fraction < 1:
        log(f"labels: keeping those of a seeded {cfg.label_fraction:.0%} of the samples (--label-fraction, --label-seed {cfg.label_seed})")
    if run.label_names is not None:
        log(f"labels: {describe_label_names(run.label_names)}")
    for line in run.start.describe(run.label_names):
        log(line)
    # A bad setup (a teacher served without its input scale) shows in the soft targets at this T.
    setup_warnings = [
        (f"{reader.directory}: " if len(run.readers) > 1 else "") + warning
        for reader in run.readers
        for warning in soft_target_warnings(reader.soft_target_stats(cfg.temperature, skip_corrupt=cfg.skip_corrupt).stats())
    ]
    for warning in setup_warnings:
        log(printable(f"warning: {warning}"))
    if meta.temperature_rule == "serving" and cfg.temperature != meta.serving_temperature:
        # Such a cache stores T_s*log(q) for a combination q of the members' probabilities at T_s
        # (their mean, or the specialists' combination): exact only at T_s.
        kind = "a generalist with specialists" if meta.teacher_name.startswith("ensemble-specialists") else "an arithmetic-mean ensemble"
        log(
            f"warning: this cache holds {kind} served at T={meta.serving_temperature:g}; its soft targets "
            f"are exact only at that temperature, and --temperature is {cfg.temperature:g}"
        )
    return setup_warnings


def train_epoch(run: Run, epoch: int, objective: Objective) -> dict[str, Any]:
    """One pass over this rank's slices of the epoch's global batches (from where a resumed
    run stopped, when it stopped in this epoch), stepping the schedule per batch and checkpointing
    every ``--checkpoint-every`` steps; returns the epoch's record for metrics.jsonl (evaluated
    by rank 0)."""
    cfg, dist, stream = run.cfg, run.dist, run.stream
    resumed = run.progress if run.progress.epochs == epoch else outputs.Progress(epochs=epoch)
    stream.set_epoch(epoch, resumed.sample)
    split = stream.split()
    run.model.train()
    started = time.perf_counter() - resumed.seconds
    stats = EpochStats(dist.device)
    if resumed.totals and dist.is_main:  # the ranks' totals before the checkpoint, summed
        stats.totals += torch.tensor(resumed.totals, dtype=stats.totals.dtype, device=dist.device)
    bar = tqdm(
        total=len(run.loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
        disable=not (cfg.progress and dist.is_main), leave=True, file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    join = run.model.join() if isinstance(run.model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with join:
        for step, batch in enumerate(run.loader):
            train_step(run.model, run.optimizer, batch, meta=run.meta, objective=objective, device=dist.device, stats=stats)
            run.scheduler.step()
            run.steps += 1
            if run.trace is not None:
                run.trace.record(epoch, split.end(step), batch["ids"])
            if outputs.checkpoint_due(cfg.checkpoint_every, run.steps, step, split.num_batches):
                outputs.save_checkpoint(run, epoch, sample=split.end(step), stats=stats, seconds=time.perf_counter() - started)
            bar.update(1)
            if step % 20 == 0:
                so_far = stats.read()
                bar.set_postfix(loss=f"{so_far.loss:.4f}", acc=f"{so_far.accuracy or 0:.3f}")
    if dist.world_size > 1:
        stats.all_reduce()
    seconds = time.perf_counter() - started
    totals = stats.read()
    scored = run.eval_set is not None and dist.is_main
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": totals.loss,
        "train_accuracy": totals.accuracy,
        "eval_accuracy": evaluate(run.student, *run.eval_set, run.meta, dist.device) if scored else None,
        "eval_ece": evaluate_ece(run.student, *run.eval_set, run.meta, dist.device) if scored else None,
        "samples": totals.samples,
        "seconds": seconds,
        "samples_per_s": totals.samples / seconds if seconds else math.nan,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    bar.set_postfix(loss=f"{record['train_loss']:.4f}", eval_acc=record["eval_accuracy"])
    bar.close()
    return record


def _train(cfg: TrainConfig, dist: Dist) -> dict[str, Any]:
    log = print if dist.is_main else (lambda *a, **k: None)
    run = open_run(cfg, dist, log)
    cfg = run.cfg
    setup_warnings = announce(run, log)
    if dist.is_main:
        with open(run.out / "metrics.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(h) + "\n" for h in run.history)

    objective = cfg.objective(run.meta)
    for epoch in range(len(run.history), cfg.epochs):
        record = train_epoch(run, epoch, objective)
        run.history.append(record)
        outputs.save_checkpoint(run, epoch + 1)
        if dist.is_main:
            with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if dist.world_size > 1:
            torch.distributed.barrier()

    corrected = run.start.correct_prior(run.student)  # a specialist's enriched prior, undone before it is saved
    if corrected:
        log(corrected)
    summary = run_summary(cfg, run.student, run.meta, run.readers, run.history, dist, run.label_names)
    if corrected and run.eval_set is not None and dist.is_main:  # the saved head's accuracy, not the last epoch's
        summary["eval_accuracy_before_prior"] = summary["eval_accuracy"]
        summary["eval_accuracy"] = evaluate(run.student, *run.eval_set, run.meta, dist.device)
    summary["recipe"] = run.recipe.to_dict()
    summary["warnings"] = setup_warnings
    summary.update(run.start.summary())
    if dist.is_main:
        write_outputs(cfg, run.student, run.meta, run.out, run.history, summary, log, specialist=run.start.record())
    return summary


__all__ = [
    "CHECKPOINT_NAME", "Checkpoint", "EpochStats", "Objective", "TrainConfig", "TrainError", "default_workers", "export_program",
    "run_summary", "save_atomic", "step_on_inputs", "student_record", "train", "train_step", "write_outputs", "CacheError",
]  # fmt: skip
