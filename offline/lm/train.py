"""``offline-distill --task lm``: a language-model student learns from a token cache; no teacher
is loaded.

The same shape as the classification trainer (``offline.train``), whose pieces it takes: the
device and process group (``setup_distributed``), the stream of shard batches (``ShardStream``,
its shuffle window bounded in bytes), the recipe rule (``offline.recipe``, with the values of
``defaults.LM_RULE``), the per-step schedule (``lr_factor``), the DataLoader worker default and
the checkpoint (``outputs.Checkpoint``, after each epoch and every ``--checkpoint-every`` steps,
so ``--resume`` continues a run from the same sample). What differs:
the student (``student.py``), the per-token loss (``loss.py``: the layout's soft term per token
plus the next-token cross-entropy), gradients clipped at ``GRAD_CLIP``, ``--max-steps``, the
vocabulary check (``vocab.py``), and evaluation by perplexity (``evaluate.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import models, outputs
from ..cache import CacheMeta, CacheReader
from ..cache.label_names import printable
from ..cache.tokens import valid_mask
from ..dataset import DEFAULT_SHUFFLE_BYTES, ShardStream, open_caches, shard_window_for
from ..outputs import CHECKPOINT_NAME, CheckpointError, save_atomic
from ..recipe import Recipe, lr_factor
from ..step import to_device
from ..train import Dist, TrainConfig, TrainError, default_workers, setup_distributed
from .defaults import DEFAULT_STUDENT, LM_RULE
from .evaluate import LMEvalError, LMEvalSet, evaluate_lm, load_lm_eval, plot_lm_curves
from .loss import LMObjective, LMStats
from .student import StudentError, StudentSpec, build_student, parse_student, save_student
from .vocab import VocabularyError, check_vocabulary

GRAD_CLIP = 1.0  # the global gradient norm, as language models are trained
RESUME_FIXED = ("student", "epochs", "batch_size", "schedule", "max_steps")


@dataclass
class LMConfig:
    caches: list[str]
    student: str | None = None  # None: defaults.DEFAULT_STUDENT
    # None: the recipe's (defaults.LM_RULE, settled by ``settle``).
    epochs: int | None = None
    batch_size: int | None = None  # sequences per step
    lr: float | None = None
    alpha: float | None = None
    schedule: str | None = None
    temperature: float | None = None  # None: the cache's serving temperature (the only one a sparse layout takes)
    topk_tail: str = "bucket"
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop after this many optimiser steps in all
    checkpoint_every: int | None = None  # also write checkpoint.pt after every N-th optimiser step
    eval_path: str | None = None
    out: str = "runs/distill"
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    workers: int | None = None  # None: default_workers(the caches' bytes)
    shuffle_buffer: int | None = None  # rows; None: shuffle_bytes decides
    shuffle_bytes: int = DEFAULT_SHUFFLE_BYTES
    allow_vocab_padding: bool = False
    allow_mixed_teachers: bool = False
    skip_corrupt: bool = False
    verify_checksums: bool = False
    progress: bool = True

    def train_config(self) -> TrainConfig:
        """The classification config of the settings both tasks share: its checks are theirs."""
        return TrainConfig(
            caches=list(self.caches), epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, alpha=self.alpha,
            schedule=self.schedule, temperature=self.temperature, topk_tail=self.topk_tail, weight_decay=self.weight_decay,
            workers=self.workers, shuffle_buffer=self.shuffle_buffer, shuffle_bytes=self.shuffle_bytes, device=self.device,
            checkpoint_every=self.checkpoint_every,
        )  # fmt: skip

    def check(self) -> None:
        self.train_config().check()
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainError(f"--max-steps must be >= 1, got {self.max_steps}")

    def settle(self, metas: list[CacheMeta], sequences: int) -> tuple[LMConfig, Recipe]:
        """This config with the temperature (default: the serving one; a sparse cache refuses
        another, as for classification) and what the user left out taken from ``LM_RULE``."""
        temperature = self.temperature if self.temperature is not None else metas[0].serving_temperature
        settled = replace(self.train_config(), temperature=temperature).for_caches(metas)
        recipe = LM_RULE.recipe(
            sequences, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size, schedule=self.schedule, alpha=self.alpha
        )
        cfg = replace(
            self, student=self.student or DEFAULT_STUDENT, temperature=settled.temperature, lr=recipe.lr, epochs=recipe.epochs,
            batch_size=recipe.batch_size, schedule=recipe.schedule, alpha=recipe.alpha,
        )  # fmt: skip
        return cfg, recipe


@dataclass
class LMRun:
    """Everything one run trains with, set up by ``open_run``."""

    cfg: LMConfig
    dist: Dist
    readers: list[CacheReader]
    meta: CacheMeta
    recipe: Recipe
    spec: StudentSpec
    student: nn.Module
    vocab_note: str | None
    eval_set: LMEvalSet | None
    out: Path
    stream: ShardStream
    workers: int
    objective: LMObjective
    model: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: Any = field(init=False)
    loader: Any = field(init=False)
    total_steps: int = field(init=False)
    steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: outputs.Progress = field(default_factory=outputs.Progress)  # where the run resumed

    @property
    def vocab(self) -> int:
        return int(self.student.vocab_size)


def train_lm(cfg: LMConfig) -> dict[str, Any]:
    """Train a language-model student on token caches. Returns the summary written to metrics.json."""
    cfg.check()
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    except (LMEvalError, CheckpointError, StudentError, VocabularyError) as exc:
        raise TrainError(str(exc)) from None
    finally:
        if dist.world_size > 1:
            torch.distributed.destroy_process_group()


def open_run(cfg: LMConfig, dist: Dist, log: Any) -> LMRun:
    """Open the caches, settle the recipe, build the student and check its vocabulary, load the
    eval set, then (nothing is written before) the run directory, optimiser, schedule and loader."""
    readers, meta = open_caches(
        cfg.caches, allow_mixed_teachers=cfg.allow_mixed_teachers, skip_corrupt=cfg.skip_corrupt, verify_checksums=cfg.verify_checksums
    )
    if meta.task != "lm":
        raise TrainError(
            f"{readers[0].directory}: a cache of task {meta.task}, not a token cache; --task lm trains on a language model's cache"
        )
    cfg, recipe = cfg.settle([reader.meta for reader in readers], sum(reader.num_samples for reader in readers))
    for reader in readers:
        for name, problem in reader.skipped:
            log(f"warning: skipping corrupt shard {reader.storage.where(name)}: {problem}", file=sys.stderr)
    spec = parse_student(cfg.student or DEFAULT_STUDENT)
    context = meta.input_shape[0]
    torch.manual_seed(cfg.seed)
    student = build_student(spec, meta.num_classes, context)
    progress = cfg.progress and dist.is_main
    vocab_note = check_vocabulary(student.vocab_size, meta, readers, allow_padding=cfg.allow_vocab_padding, progress=progress)
    eval_set = load_lm_eval(cfg.eval_path, meta, student.vocab_size, student.context or context) if cfg.eval_path else None
    window, window_note = shard_window_for([info for reader in readers for info in reader.shards])
    if window_note and dist.is_main:
        log(window_note)
    stream = ShardStream.from_readers(
        readers, meta, batch_size=cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, shuffle_bytes=cfg.shuffle_bytes,
        skip_corrupt=cfg.skip_corrupt, rank=dist.rank, world_size=dist.world_size, shard_window=window,
    )  # fmt: skip
    out = Path(cfg.out)
    if (out / CHECKPOINT_NAME).exists() and not cfg.resume:
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers if cfg.workers is not None else default_workers(sum(r.total_bytes for r in readers))
    objective = LMObjective(cfg.temperature, cfg.alpha, meta.layout.name, cfg.topk_tail)  # type: ignore[arg-type]
    run = LMRun(cfg, dist, readers, meta, recipe, spec, student.to(dist.device), vocab_note, eval_set, out, stream, workers, objective)
    run.model = run.student
    if dist.world_size > 1:
        run.model = nn.parallel.DistributedDataParallel(run.student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    run.optimizer = torch.optim.AdamW(run.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # type: ignore[arg-type]
    run.total_steps = steps_left(run, 0, 0)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: lr_factor(cfg.schedule, step, run.total_steps))  # type: ignore[arg-type]
    run.progress = outputs.resume(run, log, RESUME_FIXED)
    if run.steps:  # what is left, on this run's world size
        run.total_steps = run.steps + steps_left(run, run.progress.epochs, run.progress.sample)
        outputs.continue_schedule(run.scheduler, run.optimizer)
    run.loader = stream.loader(workers, pin_memory=dist.device.type == "cuda")
    return run


def steps_left(run: LMRun, epoch: int, start: int) -> int:
    """The optimiser steps from position ``start`` of epoch ``epoch`` to the end of the run: the
    global batches of the epochs left, or what is left of ``--max-steps``."""
    left = run.stream.steps_until(run.cfg.epochs, epoch, start)  # type: ignore[arg-type]
    return left if run.cfg.max_steps is None else min(left, run.cfg.max_steps - run.steps)


def announce(run: LMRun, log: Any) -> None:
    cfg, meta, stream = run.cfg, run.meta, run.stream
    log(
        f"training {cfg.student} ({models.count_parameters(run.student):,} parameters, vocabulary {run.vocab:,}) on "
        f"{stream.num_samples:,} sequences of up to {meta.input_shape[0]} tokens from {len(stream.shards)} shard(s), teacher "
        f"{printable(meta.teacher_name)} {printable(meta.teacher_fingerprint[:12])}, {meta.logits_layout} targets, "
        f"T={cfg.temperature:g} alpha={cfg.alpha:g}, device {run.dist.device}, {run.dist.world_size} process(es)"
    )
    log(run.recipe.describe() + (f"; stopping after {cfg.max_steps:,} steps (--max-steps)" if cfg.max_steps else ""))
    if run.vocab_note:
        log(run.vocab_note)


def train_step(run: LMRun, batch: dict[str, Any], stats: LMStats) -> None:
    """One optimiser step on a batch as ``ShardStream`` yields it, trimmed to its longest sequence."""
    ids, lengths = batch["inputs"], batch["lengths"].long()
    if int(ids.max()) >= run.vocab or int(ids.min()) < 0:
        raise TrainError(
            f"a token id of the cache ({int(ids.max())}) is outside the student's vocabulary of {run.vocab:,} (a damaged cache?)"
        )
    width, device = int(lengths.max()), run.dist.device
    if run.objective.alpha > 0:
        target = run.meta.layout.target(batch)
        target = {"mask": target["mask"][:, :width], "inner": to_device(target["inner"], device)}
    else:  # cross-entropy only: no soft targets to prepare
        target = {"mask": torch.from_numpy(valid_mask(lengths.numpy(), width))}
    target["mask"] = target["mask"].to(device, non_blocking=True)
    ids = ids[:, :width].to(device, non_blocking=True).long()
    result = run.objective(run.model(ids), target, ids)
    run.optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    nn.utils.clip_grad_norm_(run.student.parameters(), GRAD_CLIP)
    run.optimizer.step()
    run.scheduler.step()
    run.steps += 1
    stats.update(result)


def train_epoch(run: LMRun, epoch: int) -> dict[str, Any]:
    """One pass over this rank's slices of the epoch's global batches (from where a resumed
    run stopped, when it stopped in this epoch; or what is left of ``--max-steps``), checkpointing
    every ``--checkpoint-every`` steps, then the evaluation (rank 0); the epoch's record for
    metrics.jsonl."""
    cfg, dist, stream = run.cfg, run.dist, run.stream
    resumed = run.progress if run.progress.epochs == epoch else outputs.Progress(epochs=epoch)
    stream.set_epoch(epoch, resumed.sample)
    split = stream.split()
    run.model.train()
    stats = LMStats(dist.device)
    if resumed.totals and dist.is_main:  # the ranks' totals before the checkpoint, summed
        stats.totals += torch.tensor(resumed.totals, dtype=stats.totals.dtype, device=dist.device)
    batches = min(len(run.loader), run.total_steps - run.steps)
    bar = tqdm(
        total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not (cfg.progress and dist.is_main),
        leave=True, file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    started = time.perf_counter() - resumed.seconds
    join = run.model.join() if isinstance(run.model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with join:
        for index, batch in enumerate(run.loader):
            if run.steps >= run.total_steps:
                break
            train_step(run, batch, stats)
            last = run.steps >= run.total_steps  # the epoch's own checkpoint follows
            if not last and outputs.checkpoint_due(cfg.checkpoint_every, run.steps, index, split.num_batches):
                outputs.save_checkpoint(run, epoch, sample=split.end(index), stats=stats, seconds=time.perf_counter() - started)
            bar.update(1)
            if index % 20 == 0:
                bar.set_postfix(loss=f"{stats.read()['train_loss']:.4f}")
    if dist.world_size > 1:
        stats.all_reduce()
    seconds = time.perf_counter() - started
    totals = stats.read()
    record: dict[str, Any] = {"epoch": epoch + 1, "steps": run.steps, **totals, "seconds": seconds,
                              "tokens_per_s": totals["tokens"] / seconds if seconds else math.nan, "lr": run.optimizer.param_groups[0]["lr"]}  # fmt: skip
    if run.eval_set is not None and dist.is_main:
        record.update(evaluate_lm(run.student, run.eval_set, dist.device, run.vocab))
    bar.set_postfix(loss=f"{record['train_loss']:.4f}", eval_ppl=record.get("eval_perplexity"))
    bar.close()
    return record


def describe_epoch(record: dict[str, Any], epochs: int) -> str:
    line = f"epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.4f}, train ce {record['train_ce']:.4f}, {record['tokens_per_s']:,.0f} tokens/s"
    if record.get("eval_perplexity") is not None:
        line += f", eval perplexity {record['eval_perplexity']:.3f}"
    if record.get("eval_agreement") is not None:
        line += f", agreement with the teacher {record['eval_agreement']:.3f}"
    return line


def _train(cfg: LMConfig, dist: Dist) -> dict[str, Any]:
    log = print if dist.is_main else (lambda *a, **k: None)
    run = open_run(cfg, dist, log)
    announce(run, log)
    jsonl = run.out / "metrics.jsonl"
    if dist.is_main:
        jsonl.write_text("".join(json.dumps(h) + "\n" for h in run.history), encoding="utf-8")
    for epoch in range(len(run.history), run.cfg.epochs):  # type: ignore[arg-type]
        if run.steps >= run.total_steps:
            break
        record = train_epoch(run, epoch)
        run.history.append(record)
        log(describe_epoch(record, run.cfg.epochs))  # type: ignore[arg-type]
        outputs.save_checkpoint(run, epoch + 1)
        if dist.is_main:
            with open(jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if dist.world_size > 1:
            torch.distributed.barrier()
    summary = run_summary(run)
    if dist.is_main:
        write_outputs(run, summary, log)
    return summary


def run_summary(run: LMRun) -> dict[str, Any]:
    """What metrics.json holds."""
    cfg, meta, history = run.cfg, run.meta, run.history
    last = history[-1] if history else {}
    seconds, tokens = sum(h["seconds"] for h in history), sum(h["tokens"] for h in history)
    return {
        "task": "lm",
        "eval_perplexity": last.get("eval_perplexity"),
        "eval_ce": last.get("eval_ce"),
        "eval_agreement": last.get("eval_agreement"),
        "eval": cfg.eval_path,
        "eval_tokens": run.eval_set.tokens if run.eval_set is not None else None,
        "train_loss": last.get("train_loss"),
        "train_ce": last.get("train_ce"),
        "train_tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "steps": run.steps,
        "student": cfg.student,
        "student_params": models.count_parameters(run.student),
        "student_vocab_size": run.vocab,
        "context": meta.input_shape[0],
        "vocab_size": meta.num_classes,
        "epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "weight_decay": cfg.weight_decay,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        "serving_temperature": meta.serving_temperature,
        "logits_layout": meta.logits_layout,
        "topk_tail": cfg.topk_tail if meta.layout.name == "topk" else None,
        "seed": cfg.seed,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "teacher_name": meta.teacher_name,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "caches": [str(r.directory) for r in run.readers],
        "recipe": run.recipe.to_dict(),
        "world_size": run.dist.world_size,
        "device": str(run.dist.device),
    }


def student_record(run: LMRun) -> dict[str, Any]:
    """``student.pt`` of a gpt: student: ``models.student_record``'s fields (its ``num_classes``
    the student's vocabulary) and the language model's: ``task``, ``vocab_size``, ``context``,
    the cache's ``tokenizer_fingerprint`` and the ``recipe``. ``student_from_record`` rebuilds it."""
    cfg, meta = run.cfg, run.meta
    record = models.student_record(cfg.student, run.student, meta, temperature=cfg.temperature, alpha=cfg.alpha)  # type: ignore[arg-type]
    record.update(
        num_classes=run.vocab, task="lm", vocab_size=run.vocab, cache_vocab_size=meta.num_classes, context=int(run.student.context),
        tokenizer_fingerprint=meta.tokenizer_fingerprint, recipe=run.recipe.to_dict(),
    )  # fmt: skip
    return record


def student_from_record(record: dict[str, Any]) -> nn.Module:
    """The gpt: student a ``student.pt`` of ``--task lm`` holds, with its weights, in eval mode."""
    model = build_student(parse_student(record["arch"]), int(record["vocab_size"]), int(record["context"]))
    model.load_state_dict(record["state_dict"])
    return model.eval()


def write_outputs(run: LMRun, summary: dict[str, Any], log: Any) -> None:
    """student.pt (gpt:) or student/ (hf:, save_pretrained), curves.png and metrics.json."""
    if run.spec.kind == "hf":
        save_student(run.student, run.out / "student")
        summary["student_files"] = "student"
    else:
        save_atomic(student_record(run), run.out / "student.pt")
        summary["student_files"] = "student.pt"
    if run.history:
        plot_lm_curves(run.history, run.out / "curves.png", f"{run.cfg.student}, T={run.cfg.temperature:g}, alpha={run.cfg.alpha:g}")
    (run.out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    ppl = summary["eval_perplexity"]
    log(f"done: eval perplexity {'-' if ppl is None else f'{ppl:.3f}'}, {summary['tokens_per_s'] or 0:,.0f} tokens/s; wrote {run.out}")


__all__ = ["GRAD_CLIP", "LMConfig", "LMRun", "student_from_record", "train_lm"]
