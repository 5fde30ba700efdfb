"""The offline training loop: a student learns from cached teacher outputs; no teacher is loaded.

Read it top to bottom: the step (``train_step``: preprocess, forward, ``Objective``, AdamW),
the set-up (device and process group, DataLoader workers, checkpoints), the outputs, and the
loop that ``train`` runs: open the caches, build the student, then for each epoch stream
batches through ``train_step``, evaluate, log, checkpoint. Under ``torchrun`` the same loop runs
with DDP (gloo on the CPU, nccl on CUDA); each rank streams its own part of the shards and only
rank 0 writes files. The benchmarks import ``train_step`` and ``EpochStats``, so that they
time exactly this step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import models
from .cache import CacheError, CacheMeta, CacheReader
from .cache.diagnostics import soft_target_warnings
from .cache.manifest import describe_label_names, merge_label_names
from .dataset import ShardStream, open_caches
from .evaluate import EvalSetError, evaluate, evaluate_ece, load_eval_set, plot_curves
from .losses import LOSS_KINDS, TOPK_TAILS, Objective
from .recipe import DEFAULT_RULE, SCHEDULES, Recipe, lr_factor
from .step import EpochStats, step_on_inputs, train_step

CHECKPOINT_NAME = "checkpoint.pt"
# Below this size the shards sit in the page cache and reading them in the training process is
# cheaper than shipping batches from worker processes (docs/benchmarks.md).
AUTO_WORKERS_BYTES = 256 << 20


DEFAULT_TEMPERATURE = 4.0


class TrainError(Exception):
    """A bad argument or input file, explained in one line."""


@dataclass
class TrainConfig:
    caches: list[str]
    student: str = "mlp"
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
    shuffle_buffer: int = 16384
    allow_mixed_teachers: bool = False
    skip_corrupt: bool = False
    verify_checksums: bool = False
    progress: bool = True
    export: bool = True
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
    """The views a cache's samples are trained on, in one line (None for a cache without views)."""
    if not meta.has_views:
        return None
    policy = meta.augment or {"name": "none", "params": {}}
    params = ", ".join(f"{key}={value}" for key, value in policy.get("params", {}).items())
    return (
        f"views: {meta.views_per_id} per sample, policy {policy.get('name')}{f' ({params})' if params else ''}; "
        f"each epoch trains on one view of each sample, replayed from its seed"
    )


def default_workers(total_bytes: int) -> int:
    """DataLoader worker processes when ``--workers`` is not given, from the caches' size."""
    return 0 if total_bytes < AUTO_WORKERS_BYTES else 2


@dataclass
class Checkpoint:
    """``RUN_DIR/checkpoint.pt``, written after each epoch. Because the data order is a function
    of (seed, epoch), a resumed run takes exactly the same steps as an uninterrupted one."""

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
        state = torch.load(path, map_location=device, weights_only=False)
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})

    def restore(self, student: nn.Module, optimizer: Any, scheduler: Any, device: torch.device) -> None:
        student.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng_cpu)
        if device.type == "cuda" and self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda.cpu())


# ---------------------------------------------------------------------------------------------
# Outputs


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def student_record(cfg: TrainConfig, model: nn.Module, meta: CacheMeta) -> dict[str, Any]:
    """What ``student.pt`` holds (``models.student_record``, where its readers find it too)."""
    return models.student_record(cfg.student, model, meta, temperature=cfg.temperature, alpha=cfg.alpha)


def export_program(model: nn.Module, meta: CacheMeta, path: Path) -> None:
    """``student.pt2``: the student exported with its input contract (``models.export_program``)."""
    models.export_program(model, meta, path)


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student on cached teacher outputs. Returns the summary written to metrics.json."""
    cfg.check()
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    except EvalSetError as exc:
        raise TrainError(str(exc)) from None
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist) -> dict[str, Any]:
    log = print if dist.is_main else (lambda *a, **k: None)
    readers, meta = open_caches(
        cfg.caches, allow_mixed_teachers=cfg.allow_mixed_teachers, skip_corrupt=cfg.skip_corrupt, verify_checksums=cfg.verify_checksums
    )
    cfg = cfg.for_caches([reader.meta for reader in readers])
    cfg, recipe = cfg.with_recipe(sum(reader.num_samples for reader in readers))
    for reader in readers:
        for name, problem in reader.skipped:
            log(f"warning: skipping corrupt shard {reader.directory / name}: {problem}", file=sys.stderr)
    label_names = cache_label_names(readers)
    eval_set = load_eval_set(cfg.eval_path, meta, label_names=label_names) if cfg.eval_path else None

    out = Path(cfg.out)
    checkpoint_path = out / CHECKPOINT_NAME
    if checkpoint_path.exists() and not cfg.resume:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    try:
        student = models.build(cfg.student, meta.input_shape, meta.num_classes)
    except models.ModelSpecError as exc:
        raise TrainError(str(exc)) from None
    student.to(dist.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    workers = cfg.workers if cfg.workers is not None else default_workers(sum(r.total_bytes for r in readers))
    model: nn.Module = student
    if dist.world_size > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    stream = ShardStream.from_readers(
        readers, meta, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
        skip_corrupt=cfg.skip_corrupt, rank=dist.rank, world_size=dist.world_size,
        label_fraction=cfg.label_fraction, label_seed=cfg.label_seed,
    )  # fmt: skip
    # The schedule runs per step, over every step of the run (an epoch's steps as this rank takes them).
    total_steps = cfg.epochs * stream.num_batches(workers)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.schedule, step, total_steps))
    history: list[dict[str, Any]] = []
    if cfg.resume and checkpoint_path.exists():
        checkpoint = Checkpoint.load(checkpoint_path, dist.device)
        fixed = ("student", "epochs", "batch_size", "schedule")
        if any(checkpoint.config.get(key) != getattr(cfg, key) for key in fixed):
            made = " ".join(f"--{key.replace('_', '-')} {checkpoint.config.get(key)}" for key in fixed)
            raise TrainError(f"{checkpoint_path}: was made with {made}; resume with the same")
        checkpoint.restore(student, optimizer, scheduler, dist.device)
        history = checkpoint.history
        log(f"resuming {out} after epoch {checkpoint.epoch}")
    elif cfg.resume:
        log(f"no checkpoint in {out}; starting from epoch 1")

    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=dist.device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
    )  # fmt: skip
    log(
        f"training {cfg.student} ({models.count_parameters(student):,} parameters) on {stream.num_samples:,} samples "
        f"from {len(stream.shards)} shard(s), teacher {meta.teacher_name} {meta.teacher_fingerprint[:12]}, "
        f"T={cfg.temperature} alpha={cfg.alpha}, device {dist.device}, {dist.world_size} process(es)"
    )
    log(recipe.describe())
    views = describe_views(meta)
    if views:
        log(views)
    if cfg.label_fraction < 1:
        log(f"labels: keeping those of a seeded {cfg.label_fraction:.0%} of the samples (--label-fraction, --label-seed {cfg.label_seed})")
    if label_names is not None:
        log(f"labels: {describe_label_names(label_names)}")
    # A bad setup (a teacher served without its input scale) shows in the soft targets at this T.
    setup_warnings = [
        (f"{reader.directory}: " if len(readers) > 1 else "") + warning
        for reader in readers
        for warning in soft_target_warnings(reader.soft_target_stats(cfg.temperature, skip_corrupt=cfg.skip_corrupt).stats())
    ]
    for warning in setup_warnings:
        log(f"warning: {warning}")
    if meta.temperature_rule == "serving" and cfg.temperature != meta.serving_temperature:
        # Such a cache stores T_s*log(mean of the members' probabilities at T_s): exact only at T_s.
        log(
            f"warning: this cache holds an arithmetic-mean ensemble served at T={meta.serving_temperature:g}; its soft targets "
            f"are exact only at that temperature, and --temperature is {cfg.temperature:g}"
        )
    if dist.is_main:
        with open(out / "metrics.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(h) + "\n" for h in history)

    objective = cfg.objective(meta)
    for epoch in range(len(history), cfg.epochs):
        stream.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        stats = EpochStats(dist.device)
        bar = tqdm(
            total=stream.num_batches(workers), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
            disable=not (cfg.progress and dist.is_main), leave=True, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip
        join = model.join() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
        with join:
            for step, batch in enumerate(loader):
                train_step(model, optimizer, batch, meta=meta, objective=objective, device=dist.device, stats=stats)
                scheduler.step()
                bar.update(1)
                if step % 20 == 0:
                    so_far = stats.read()
                    bar.set_postfix(loss=f"{so_far.loss:.4f}", acc=f"{so_far.accuracy or 0:.3f}")
        if dist.world_size > 1:
            stats.all_reduce()
        seconds = time.perf_counter() - started
        totals = stats.read()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": totals.loss,
            "train_accuracy": totals.accuracy,
            "eval_accuracy": evaluate(student, *eval_set, meta, dist.device) if eval_set and dist.is_main else None,
            "eval_ece": evaluate_ece(student, *eval_set, meta, dist.device) if eval_set and dist.is_main else None,
            "samples": totals.samples,
            "seconds": seconds,
            "samples_per_s": totals.samples / seconds if seconds else math.nan,
            "lr": optimizer.param_groups[0]["lr"],
        }
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", eval_acc=record["eval_accuracy"])
        bar.close()
        history.append(record)
        if dist.is_main:
            Checkpoint.capture(student, optimizer, scheduler, dist.device, epoch + 1, history, cfg).save(checkpoint_path)
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if dist.world_size > 1:
            torch.distributed.barrier()

    summary = run_summary(cfg, student, meta, readers, history, dist, label_names)
    summary["recipe"] = recipe.to_dict()
    summary["warnings"] = setup_warnings
    if dist.is_main:
        write_outputs(cfg, student, meta, out, history, summary, log)
    return summary


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
    cfg: TrainConfig, student: nn.Module, meta: CacheMeta, out: Path, history: list[dict[str, Any]], summary: dict[str, Any], log: Any
) -> None:
    """student.pt, student.pt2, curves.png and metrics.json, by rank 0 at the end of a run."""
    save_atomic(student_record(cfg, student, meta), out / "student.pt")
    if cfg.export:
        try:
            export_program(student, meta, out / "student.pt2")
        except Exception as exc:  # export support varies by model; the run itself succeeded
            summary["export_error"] = f"{type(exc).__name__}: {exc}"
            log(f"warning: torch.export of the student failed, no student.pt2 written ({exc})", file=sys.stderr)
    plot_curves(history, out / "curves.png", f"{cfg.student}, T={cfg.temperature}, alpha={cfg.alpha}")
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log(f"done: eval accuracy {summary['eval_accuracy']}, {summary['train_samples_per_s'] or 0:,.0f} samples/s; wrote {out}")


__all__ = [
    "Checkpoint", "EpochStats", "Objective", "TrainConfig", "TrainError",
    "default_workers", "step_on_inputs", "train", "train_step", "CacheError",
]  # fmt: skip
