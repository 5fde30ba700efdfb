"""What a training run writes to RUN_DIR: ``checkpoint.pt`` after each epoch (``Checkpoint``; read
back by ``resume``), and at the end ``student.pt``, ``student.pt2``, ``curves.png`` and ``metrics.json``
(``run_summary``, ``write_outputs``). Every file is written to a temporary name and renamed."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import models
from .cache import CacheMeta, CacheReader
from .evaluate import plot_curves

if TYPE_CHECKING:
    from .train import Dist, Run, TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(Exception):
    """A checkpoint.pt that cannot be read as data; one line naming the file."""


@dataclass
class Checkpoint:
    """``RUN_DIR/checkpoint.pt``, written after each epoch. Because the data order is a function
    of (seed, epoch), a resumed run takes exactly the same steps as an uninterrupted one.

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

    @classmethod
    def capture(
        cls, student: nn.Module, optimizer: Any, scheduler: Any, device: torch.device, epoch: int, history: list, cfg: TrainConfig
    ) -> Checkpoint:
        return cls(
            model=student.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None,
            epoch=epoch, history=history, config=asdict(cfg),
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


def resume(run: Run, log: Any) -> None:
    """With ``--resume``, continue from the run's checkpoint, made with the same recipe (and the
    same specialist); CheckpointError, in one line, when it cannot be."""
    cfg, path = run.cfg, run.checkpoint_path
    if not cfg.resume:
        return
    if not path.exists():
        log(f"no checkpoint in {run.out}; starting from epoch 1")
        return
    checkpoint = Checkpoint.load(path, run.dist.device)
    fixed = ("student", "epochs", "batch_size", "schedule", "specialist") + (("specialist_head",) if cfg.specialist else ())
    recorded = {key: checkpoint.config.get(key, getattr(type(cfg), key)) for key in fixed}  # an older checkpoint's: the defaults
    if any(recorded[key] != getattr(cfg, key) for key in fixed):
        made = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in recorded.items() if value is not None)
        raise CheckpointError(f"{path}: was made with {made}; resume with the same")
    checkpoint.restore(run.student, run.optimizer, run.scheduler, run.dist.device)
    run.history = checkpoint.history
    log(f"resuming {run.out} after epoch {checkpoint.epoch}")


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
