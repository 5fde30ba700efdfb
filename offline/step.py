"""The training step: one optimiser step of a student on a batch of cached teacher outputs, and
the running totals of an epoch. ``offline-distill``'s loop and the benchmarks both call
``train_step``, so that the benchmarks time exactly what the trainer runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .cache import CacheMeta
from .losses import Objective


@dataclass
class EpochStats:
    """Running totals of one epoch (loss·n, samples, correct, labelled), kept on the device so
    that a step costs no host sync; read once at the end of the epoch."""

    device: torch.device
    totals: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        labelled = labels >= 0
        n = torch.tensor(len(labels), dtype=torch.float64, device=self.totals.device)
        correct = ((student_logits.argmax(-1) == labels) & labelled).sum().double()
        self.totals += torch.stack([loss.detach().double() * n, n, correct, labelled.sum().double()])

    def all_reduce(self) -> None:
        torch.distributed.all_reduce(self.totals)

    def read(self) -> EpochTotals:
        """The totals so far, with one device-to-host copy."""
        loss_sum, samples, correct, labelled = self.totals.tolist()
        return EpochTotals(loss_sum / max(samples, 1), int(samples), correct / labelled if labelled else None)


class EpochTotals(NamedTuple):
    loss: float  # mean over the samples
    samples: int
    accuracy: float | None  # on the labelled samples; None when there were none


def step_on_inputs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    teacher_target: Any,
    labels: torch.Tensor,
    *,
    objective: Objective,
    stats: EpochStats | None = None,
) -> torch.Tensor:
    """One optimiser step on preprocessed ``inputs`` already on the model's device, against the
    teacher's target as the cache's layout gives it (full logits: a tensor [B, C])."""
    student_logits = model(inputs)
    loss = objective(student_logits, teacher_target, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if stats is not None:
        stats.update(loss, student_logits, labels)
    return loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    meta: CacheMeta,
    objective: Objective,
    device: torch.device,
    stats: EpochStats | None = None,
) -> torch.Tensor:
    """One step on a batch as ``ShardStream`` yields it: raw stored inputs (for a cache with
    views, the chosen view, replayed), the layout's target fields and labels; the inputs are
    preprocessed on ``device`` as the teacher's were."""
    inputs = meta.preprocessing.apply(batch["inputs"].to(device, non_blocking=True))
    target = to_device(meta.target_layout.target(batch), device)
    labels = batch["labels"].to(device, non_blocking=True)
    return step_on_inputs(model, optimizer, inputs, target, labels, objective=objective, stats=stats)


def to_device(target: Any, device: torch.device) -> Any:
    """A layout's training target (a tensor, or a dict of tensors or numpy arrays) on ``device``."""
    if isinstance(target, dict):
        return {name: torch.as_tensor(value).to(device, non_blocking=True) for name, value in target.items()}
    return target.to(device, non_blocking=True)
