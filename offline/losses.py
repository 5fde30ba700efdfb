"""Distillation losses (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network").

``z`` are the student's logits, ``v`` the teacher's, ``T`` the temperature, ``alpha`` the weight
of the soft term. With full logits both are chosen at training time, independently of the
serving temperature; a sparse target layout is defined at the serving temperature T_s, and the
trainer runs it at T = T_s.

The soft term has one implementation per target layout (``SOFT_TERMS``, keyed by
``TargetLayout.name``), each taking the layout's training target (``TargetLayout.target``):

* ``full``: T**2 * KL(softmax(v/T) || softmax(z/T)).
* ``topk`` (``tail="bucket"``, the default; Megatron-LM's "ghost token"): T**2 * KL over K+1
  buckets, the K stored classes and one tail bucket. The teacher's bucket probabilities are
  p_k = softmax(top-k values / T)_k * (1 - m) and m = exp(tail_logmass), worked out by
  ``TopK.target`` on the host; the student's tail is the mass of its softmax outside the K
  classes, 1 - sum_k q_k.
* ``topk`` with ``tail="uniform"`` (TinyViT, FKD): T**2 * KL(p' || softmax(z/T)) with p' the K
  classes' p_k and the tail mass m spread evenly over the other C - K classes.
* ``sampled`` (Anshumann et al., ACL 2025): T**2 * CE(counts/N, softmax(z/T)), the
  cross-entropy of the student's full softmax against the frequencies of N draws from the
  teacher's. E[counts/N] = p, so its gradient T * (q - counts/N) is an unbiased estimate of the
  full term's, T * (q - p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .cache.layout import TopK


def _kl_full(z: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(z / temperature, dim=-1)  # student
    log_p = F.log_softmax(v.to(z.dtype) / temperature, dim=-1)  # teacher
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _kl_topk_bucket(z: torch.Tensor, target: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(z / temperature, dim=-1)
    indices = target["topk_indices"]
    log_p_top, log_p_tail = target["log_p_top"].to(z.dtype), target["log_p_tail"].to(z.dtype)
    log_q_top = log_q.gather(-1, indices)
    log_q_tail = log_q.scatter(-1, indices, float("-inf")).logsumexp(dim=-1)  # the student's mass off the K classes
    head = (log_p_top.exp() * (log_p_top - log_q_top)).sum(dim=-1)
    return head + log_p_tail.exp() * (log_p_tail - log_q_tail)


def _kl_topk_uniform(z: torch.Tensor, target: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(z / temperature, dim=-1)
    indices = target["topk_indices"]
    log_p_top, log_p_tail = target["log_p_top"].to(z.dtype), target["log_p_tail"].to(z.dtype)
    rest = z.shape[-1] - indices.shape[-1]
    log_p = (log_p_tail - math.log(rest)).unsqueeze(-1).expand_as(log_q).scatter(-1, indices, log_p_top)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _ce_sampled(z: torch.Tensor, target: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(z / temperature, dim=-1)
    counts = target["sample_counts"].to(z.dtype)
    frequencies = counts / counts.sum(dim=-1, keepdim=True)
    return -(frequencies * log_q.gather(-1, target["sample_indices"].long())).sum(dim=-1)


SoftTerm = Callable[[torch.Tensor, Any, float], torch.Tensor]
# The soft term per target layout and, for top-k, per tail rule: per-sample values, before T**2.
SOFT_TERMS: dict[str, dict[str, SoftTerm]] = {
    "full": {"": _kl_full},
    "topk": {"bucket": _kl_topk_bucket, "uniform": _kl_topk_uniform},
    "sampled": {"": _ce_sampled},
}
TOPK_TAILS = TopK.tails


def soft_term(targets: str, tail: str = "bucket") -> SoftTerm:
    """The soft term of a target layout (``TargetLayout.name``); ``tail`` picks top-k's rule."""
    rules = SOFT_TERMS[targets]
    if "" in rules:  # one rule: the tail does not apply
        return rules[""]
    if tail not in rules:
        raise ValueError(f"unknown {targets} tail rule {tail!r}; expected one of {', '.join(rules)}")
    return rules[tail]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Any,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    kind: str = "kl",
    targets: str = "full",
    tail: str = "bucket",
) -> torch.Tensor:
    """Mean over the batch of

        alpha * T**2 * soft(z, target, T)              + (1 - alpha) * CE(z, label)   (kind="kl")
        alpha * mean_i (z_i - v_i)**2                  + (1 - alpha) * CE(z, label)   (kind="mse", full logits only)

    where ``soft`` is the layout's term (``SOFT_TERMS``; full logits: KL(softmax(v/T) ||
    softmax(z/T))). The T**2 factor keeps the soft term's gradient, T * (q_i - p_i), on the
    same scale as the hard term's when T changes (paper, section 2). Samples labelled -1 get
    only the soft term. Computed in float32 (or wider) from log-softmax.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(dtype)
    if kind == "kl":
        soft = soft_term(targets, tail)(z, teacher_logits, temperature) * temperature**2
    elif kind == "mse":
        if targets != "full":
            raise ValueError(f"the mse loss needs full logits, not {targets} targets")
        soft = (z - teacher_logits.to(dtype)).pow(2).mean(dim=-1)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected 'kl' or 'mse'")
    labelled = labels >= 0
    hard = F.cross_entropy(z, labels.clamp(min=0), reduction="none") * labelled
    return (alpha * soft + (1.0 - alpha) * hard).mean()


LOSS_KINDS = ("kl", "mse")


@dataclass(frozen=True)
class Objective:
    """What a run distils with: ``distillation_loss`` at one temperature, weight and kind, on
    one target layout (``TargetLayout.name``) with, for top-k, one tail rule."""

    temperature: float
    alpha: float
    kind: str = "kl"
    targets: str = "full"
    tail: str = "bucket"

    def __call__(self, student_logits: torch.Tensor, teacher_target: Any, labels: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_target, labels, self.temperature, self.alpha, self.kind, self.targets, self.tail)
