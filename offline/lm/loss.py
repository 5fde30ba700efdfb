"""The loss of ``offline-distill --task lm``: per token, the classification soft term of the cache's
layout, and the next-token cross-entropy.

For a batch of sequences with the student's logits ``z`` [B, l, V'] and the cache's per-token
target (``PerToken.target``: the valid tokens' ``mask`` [B, l] and the inner layout's target of
those tokens, in row-major order)::

    loss = alpha * T**2 * mean_{valid t} soft(z_t, target_t, T)               (offline.losses.soft_term)
         + (1 - alpha) * mean_{t < length - 1} CE(z_t, input_ids[t + 1])

the soft term exactly as ``offline.losses.distillation_loss`` takes it for the layout (a sparse
layout at T = T_s, the only T it holds). ``alpha`` 0 computes no soft term at all; ``alpha`` 1 no
cross-entropy. Each mean is over its own tokens (the last token of a sequence has a soft target but
no next token).

A student vocabulary V' larger than the cache's V (``--allow-vocab-padding``): its extra classes
are part of its softmax. Top-k's bucket tail and the sampled cross-entropy take them as they are
(mass the teacher gives them none of); full logits are padded with a very low logit, so that the
teacher's probability of them is 0. (Top-k's ``uniform`` tail spreads the tail over all V' - K
classes, the extra ones included.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..losses import soft_term

# The logit that padding classes of a full-logits target get: exp((PAD - max) / T) is 0 in float32
# at any sensible T, and finite, so that 0 * (log p - log q) stays 0.
PAD_LOGIT = -1e9


class LMLoss(NamedTuple):
    loss: torch.Tensor  # what is minimised
    ce_sum: torch.Tensor  # next-token cross-entropy summed over the predicted tokens (no gradient)
    predicted: torch.Tensor  # tokens with a next token in the batch
    tokens: torch.Tensor  # valid tokens in the batch


@dataclass(frozen=True)
class LMObjective:
    """``alpha`` and ``temperature`` of a run, on the cache's target layout (``TargetLayout.name``)
    with, for top-k, its tail rule."""

    temperature: float
    alpha: float
    targets: str = "topk"
    tail: str = "bucket"
    term: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "term", soft_term(self.targets, self.tail))

    def __call__(self, logits: torch.Tensor, target: dict[str, Any], ids: torch.Tensor) -> LMLoss:
        """``logits`` [B, l, V'], ``target`` {"mask": [B, l] bool, "inner": ...} on the logits'
        device, ``ids`` [B, l] the input token ids (0 beyond each length)."""
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        mask = target["mask"]
        predicted = mask[:, 1:]  # t + 1 < length: t has a next token
        ce_sum = F.cross_entropy(z[:, :-1][predicted], ids[:, 1:][predicted], reduction="sum")
        n_predicted, n_tokens = predicted.sum(), mask.sum()
        loss = z.new_zeros(())
        if self.alpha < 1:
            loss = loss + (1.0 - self.alpha) * ce_sum / n_predicted.clamp(min=1)
        if self.alpha > 0:
            inner = pad_target(target["inner"], self.targets, z.shape[-1])
            soft = self.term(z[mask], inner, self.temperature)
            loss = loss + self.alpha * self.temperature**2 * soft.sum() / n_tokens.clamp(min=1)
        return LMLoss(loss, ce_sum.detach(), n_predicted, n_tokens)


def pad_target(inner: Any, targets: str, vocab: int) -> Any:
    """A full-logits target [T, V] widened to a student's ``vocab`` > V with ``PAD_LOGIT``; any
    other target as it is (its indices are below V already)."""
    if targets != "full" or inner.shape[-1] == vocab:
        return inner
    if inner.shape[-1] > vocab:
        raise ValueError(f"full teacher logits over {inner.shape[-1]} classes cannot train a student of {vocab}")
    return F.pad(inner.float(), (0, vocab - inner.shape[-1]), value=PAD_LOGIT)


@dataclass
class LMStats:
    """Running totals of an epoch on the device (loss·tokens, CE sum, predicted, tokens), read once."""

    device: torch.device
    totals: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.totals = torch.zeros(4, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, result: LMLoss) -> None:
        tokens = result.tokens.double()
        self.totals += torch.stack([result.loss.detach().double() * tokens, result.ce_sum.double(), result.predicted.double(), tokens])

    def all_reduce(self) -> None:
        torch.distributed.all_reduce(self.totals)

    def read(self) -> dict[str, float | int]:
        loss_sum, ce_sum, predicted, tokens = self.totals.tolist()
        return {"train_loss": loss_sum / max(tokens, 1), "train_ce": ce_sum / max(predicted, 1), "tokens": int(tokens)}
