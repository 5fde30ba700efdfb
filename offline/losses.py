"""Distillation losses (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network").

``z`` are the student's logits, ``v`` the teacher's, ``T`` the temperature, ``alpha`` the weight
of the soft term. Both are chosen at training time, independently of the serving temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    kind: str = "kl",
) -> torch.Tensor:
    """Mean over the batch of

        alpha * T**2 * KL(softmax(v/T) || softmax(z/T)) + (1 - alpha) * CE(z, label)   (kind="kl")
        alpha * mean_i (z_i - v_i)**2                  + (1 - alpha) * CE(z, label)   (kind="mse")

    The T**2 factor keeps the soft term's gradient, T * (q_i - p_i), on the same scale as the
    hard term's when T changes (paper, section 2). Samples labelled -1 get only the soft term.
    Computed in float32 (or wider) from log-softmax.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z, v = student_logits.to(dtype), teacher_logits.to(dtype)
    if kind == "kl":
        log_q = F.log_softmax(z / temperature, dim=-1)  # student
        log_p = F.log_softmax(v / temperature, dim=-1)  # teacher
        soft = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2
    elif kind == "mse":
        soft = (z - v).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected 'kl' or 'mse'")
    labelled = labels >= 0
    hard = F.cross_entropy(z, labels.clamp(min=0), reduction="none") * labelled
    return (alpha * soft + (1.0 - alpha) * hard).mean()


LOSS_KINDS = ("kl", "mse")


@dataclass(frozen=True)
class Objective:
    """What a run distils with: ``distillation_loss`` at one temperature, weight and kind."""

    temperature: float
    alpha: float
    kind: str = "kl"

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.kind)
