"""What a training run writes to RUN_DIR: ``checkpoint.pt`` after each epoch, and every
``--checkpoint-every`` steps with the position in the epoch (``Checkpoint``, ``save_checkpoint``;
read back by ``resume``), and at the end ``student.pt``, ``student.pt2``, ``curves.png`` and
``metrics.json`` (``run_summary``, ``write_outputs``). Every file is written to a temporary name
and renamed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import models
from .cache import CacheMeta, CacheReader
from .evaluate import plot_curves

if TYPE_CHECKING:
    from .train import Dist, TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint.pt that cannot be read as data; one line naming the file."""


@dataclass
class Progress:
    """Where a run stands: ``steps`` optimiser steps taken, ``epochs`` epochs done, and of the
    next one the samples at positions [0, ``sample``) trained on (all ranks together), with the
    running totals of its statistics (``EpochStats`` or ``LMStats``, summed over the ranks) and
    the seconds they took."""

    steps: int = 0
    epochs: int = 0
    sample: int = 0
    totals: list[float] | None = None
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """``RUN_DIR/checkpoint.pt``, written after each epoch and, with ``--checkpoint-every N``,
    after every N-th optimiser step. The order of samples is a function of (seed, epoch, the
    caches) alone (``dataset.plan_epoch``), so a run resumed from it takes exactly the same
    steps as an uninterrupted one: the rest of epoch ``epoch`` (0-based: the epochs done) from
    position ``sample_in_epoch``, then the next epochs. ``order`` says what that order depends
    on (``ShardStream.order``), checked before a run continues mid-epoch. ``steps``,
    ``sample_in_epoch`` and what follows are None in a checkpoint from before they existed:
    it is at an epoch's end.

    It holds data only (tensors, and dicts, lists, strings and numbers) and is read with
    ``torch.load(weights_only=True)``. The student it records is compared with ``--student``,
    never built from: a resumed run imports only the code named on its command line."""

    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    epoch: int
    history: list[dict[str, Any]]
    config: dict[str, Any]
    steps: int | None = None
    sample_in_epoch: int | None = None
    epoch_totals: list[float] | None = None
    epoch_seconds: float | None = None
    order: dict[str, Any] | None = None
    world_size: int | None = None

    @classmethod
    def capture(
        cls, student: nn.Module, optimizer: Any, scheduler: Any, device: torch.device, epoch: int, history: list, cfg: Any,
        progress: Progress | None = None, order: dict[str, Any] | None = None, world_size: int = 1,
    ) -> Checkpoint:  # fmt: skip
        progress = progress or Progress(steps=scheduler.last_epoch, epochs=epoch)
        return cls(
            model=student.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None,
            epoch=epoch, history=history, config=asdict(cfg), steps=progress.steps, sample_in_epoch=progress.sample,
            epoch_totals=progress.totals, epoch_seconds=progress.seconds, order=order, world_size=world_size,
        )  # fmt: skip

    def save(self, path: Path) -> None:
        save_atomic({f.name: getattr(self, f.name) for f in fields(self)}, path)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> Checkpoint:
        try:
            state = models.load_data(path, device)
        except models.UnreadableFile as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a checkpoint written by offline-distill (holds {type(state).__name__})")
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})

    def restore(self, student: nn.Module, optimizer: Any, scheduler: Any, device: torch.device) -> None:
        student.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng_cpu)
        if device.type == "cuda" and self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda.cpu())

    def progress(self, scheduler: Any) -> Progress:
        """Where the run stood (the scheduler restored: it counts the steps of older checkpoints)."""
        steps = scheduler.last_epoch if self.steps is None else self.steps
        return Progress(steps, self.epoch, self.sample_in_epoch or 0, self.epoch_totals, self.epoch_seconds or 0.0)


def save_checkpoint(run: Any, epochs: int, *, sample: int = 0, stats: Any = None, seconds: float = 0.0) -> None:
    """``RUN_DIR/checkpoint.pt`` of ``run`` (either trainer's): ``epochs`` epochs done and, when
    ``sample`` > 0, the samples [0, sample) of the next with the running ``stats`` of them. Every
    rank calls it, for the sum of the ranks' statistics; rank 0 writes."""
    totals = None
    if stats is not None:
        summed = stats.totals.clone()
        if run.dist.world_size > 1:
            torch.distributed.all_reduce(summed)
        totals = summed.tolist()
    if run.dist.is_main:
        progress = Progress(run.steps, epochs, sample, totals, seconds)
        Checkpoint.capture(
            run.student, run.optimizer, run.scheduler, run.dist.device, epochs, run.history, run.cfg, progress,
            order=run.stream.order(), world_size=run.dist.world_size,
        ).save(run.out / CHECKPOINT_NAME)  # fmt: skip


def checkpoint_due(every: int | None, steps: int, batch: int, global_batches: int) -> bool:
    """Whether ``--checkpoint-every`` asks for a checkpoint after step ``steps``, global batch
    ``batch`` of the epoch's ``global_batches``: not after the last, which the epoch's own
    checkpoint follows (and which a rank with one batch fewer would not reach)."""
    return bool(every) and steps % every == 0 and batch + 1 < global_batches  # type: ignore[operator]


def resume(run: Any, log: Any, fixed: Sequence[str]) -> Progress:
    """With ``--resume``, continue ``run`` (either trainer's) from its checkpoint, made with the
    same ``fixed`` settings (and, stopped mid-epoch, in the same order of samples; the world
    size may differ: the order is global); CheckpointError, in one line, when it cannot be.
    Returns where the run stands, set in ``run.steps`` and ``run.history`` too."""
    cfg, path = run.cfg, run.out / CHECKPOINT_NAME
    if not cfg.resume:
        return Progress()
    if not path.exists():
        log(f"no checkpoint in {run.out}; starting from epoch 1")
        return Progress()
    checkpoint = Checkpoint.load(path, run.dist.device)
    recorded = {key: checkpoint.config.get(key, getattr(type(cfg), key)) for key in fixed}  # an older checkpoint's: the defaults
    if any(recorded[key] != getattr(cfg, key) for key in fixed):
        made = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in recorded.items() if value is not None)
        raise CheckpointError(f"{path}: was made with {made}; resume with the same")
    if checkpoint.sample_in_epoch:
        order, now = checkpoint.order or {}, run.stream.order()
        changed = [f"{key} {order.get(key)} (now {value})" for key, value in now.items() if order.get(key) != value]
        if changed:
            raise CheckpointError(
                f"{path}: stopped after {checkpoint.sample_in_epoch:,} samples of epoch {checkpoint.epoch + 1}, in an order of samples "
                f"that this run does not have: {', '.join(changed)}; resume with the same --seed, --shuffle-mb or --shuffle-buffer "
                "and caches"
            )
    checkpoint.restore(run.student, run.optimizer, run.scheduler, run.dist.device)
    progress = checkpoint.progress(run.scheduler)
    run.history, run.steps = checkpoint.history, progress.steps
    where = f"after epoch {progress.epochs}"
    if progress.sample:
        where = f"in epoch {progress.epochs + 1}, after {progress.sample:,} of its samples"
    log(f"resuming {run.out} {where} ({progress.steps:,} steps)")
    if progress.sample and checkpoint.world_size not in (None, run.dist.world_size):
        log(
            f"it ran on {checkpoint.world_size} process(es), this run on {run.dist.world_size}: the same order of samples "
            f"continues, in steps of {run.dist.world_size}×{cfg.batch_size} samples"
        )
    return progress


def continue_schedule(scheduler: Any, optimizer: Any) -> None:
    """Set the learning rate of the step a restored ``scheduler`` (LambdaLR) is at, as its own
    step would: the schedule's length may have changed (a run resumed on another world size
    takes another number of steps), and otherwise this sets the value it had."""
    for group, factor, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)


# ---------------------------------------------------------------------------------------------
# Outputs


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def student_record(cfg: TrainConfig, model: nn.Module, meta: CacheMeta, specialist: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``student.pt`` holds (``models.student_record``, where its readers find it too)."""
    return models.student_record(cfg.student, model, meta, temperature=cfg.temperature, alpha=cfg.alpha, specialist=specialist)


def export_program(model: nn.Module, meta: CacheMeta, path: Path) -> None:
    """``student.pt2``: the student exported with its input contract (``models.export_program``)."""
    models.export_program(model, meta, path)


def run_summary(
    cfg: TrainConfig, student: nn.Module, meta: CacheMeta, readers: list[CacheReader], history: list[dict[str, Any]], dist: Dist,
    label_names: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What metrics.json holds."""
    train_seconds = sum(h["seconds"] for h in history)
    train_samples = sum(h["samples"] for h in history)
    return {
        "eval_accuracy": history[-1]["eval_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        "train_loss": history[-1]["train_loss"],
        "student": cfg.student,
        "student_params": models.count_parameters(student),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "loss": cfg.loss,
        "train_samples": train_samples,
        "train_seconds": train_seconds,
        "train_samples_per_s": train_samples / train_seconds if train_seconds else None,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "teacher_name": meta.teacher_name,
        "temperature": cfg.temperature,
        "serving_temperature": meta.serving_temperature,
        "alpha": cfg.alpha,
        "schedule": cfg.schedule,
        "label_fraction": cfg.label_fraction,
        "label_seed": cfg.label_seed,
        "views": {"per_sample": meta.views_per_id, "policy": meta.augment} if meta.has_views else None,
        "caches": [str(r.directory) for r in readers],
        "label_names": label_names,
        "world_size": dist.world_size,
        "device": str(dist.device),
        **cfg.extra,
    }


def write_outputs(
    cfg: TrainConfig, student: nn.Module, meta: CacheMeta, out: Path, history: list[dict[str, Any]], summary: dict[str, Any], log: Any,
    specialist: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """student.pt, student.pt2, curves.png and metrics.json, by rank 0 at the end of a run;
    ``specialist``: the cluster that student.pt records (``models.student_record``)."""
    save_atomic(student_record(cfg, student, meta, specialist), out / "student.pt")
    if cfg.export:
        try:
            export_program(student, meta, out / "student.pt2")
        except Exception as exc:  # export support varies by model; the run itself succeeded
            summary["export_error"] = f"{type(exc).__name__}: {exc}"
            log(f"warning: torch.export of the student failed, no student.pt2 written ({exc})", file=sys.stderr)
    plot_curves(history, out / "curves.png", f"{cfg.student}, T={cfg.temperature}, alpha={cfg.alpha}")
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(f"done: eval accuracy {summary['eval_accuracy']}, {summary['train_samples_per_s'] or 0:,.0f} samples/s; wrote {out}")
