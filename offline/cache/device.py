"""Encoding on the teacher's device: each layout's ``encode_tensor`` (``layout``), in torch.

The service's teacher calls these right after its forward pass, so that only the encoded fields
cross to the host, and the journal and the shard hold them as they are: top-k of a 50,000-token
vocabulary copies 16 values per token, not 50,000. They give what the numpy ``encode`` gives
(tests/test_device_encode.py): the same top-k (float32 rounding in the tail's log-mass), the same
Philox draws of a sampled layout (up to rounding at a CDF boundary: a row's CDF is summed on its
own here, across the batch there). Indices cross as int32 where they fit, and are narrowed to the
layout's index dtype on the host (torch has no uint16 arithmetic on every device).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .layout import FullLogits, Sampled, TopK, index_dtype
from .rng import philox, uniform53


def _narrow(indices: torch.Tensor, bound: int) -> torch.Tensor:
    """Integer indices below ``bound`` in int32 where they fit: half the device-to-host copy."""
    return indices.to(torch.int32) if bound <= np.iinfo(np.int32).max else indices


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return getattr(torch, np.dtype(dtype).name)


def encode_full(layout: FullLogits, logits: torch.Tensor) -> dict[str, np.ndarray]:
    """The logits in the cache's dtype, rounded on the device (float16: half the copy)."""
    return {"logits": logits.to(_torch_dtype(layout.dtype)).cpu().numpy()}


def encode_topk(layout: TopK, logits: torch.Tensor) -> dict[str, np.ndarray]:
    """``torch.topk`` (largest first), and the tail's log-mass at T_s, summed directly (so a tiny
    tail keeps its digits): one pass of exp((v - max) / T_s) over the classes, the top K zeroed,
    the rest summed. Rows whose tail underflows float32 take the log-sum-exp in float64."""
    z = logits.float()
    values, top = torch.topk(z, layout.size, dim=-1)
    weights = (z - values[..., :1]).mul_(1.0 / layout.temperature).exp_()
    head = weights.gather(-1, top).sum(dim=-1)
    rest = weights.scatter_(-1, top, 0.0).sum(dim=-1)
    tail = torch.log(rest) - torch.log(rest + head)
    underflow = rest == 0
    if bool(underflow.any()):
        scaled = z[underflow].double() / layout.temperature
        total = torch.logsumexp(scaled, dim=-1)
        tail[underflow] = (torch.logsumexp(scaled.scatter_(-1, top[underflow], -torch.inf), dim=-1) - total).float()
    classes = z.shape[-1]
    return {
        "topk_values": values.to(_torch_dtype(layout.dtype)).cpu().numpy(),
        "topk_indices": _narrow(top, classes).cpu().numpy().astype(index_dtype(classes)),
        "tail_logmass": tail.clamp(min=float(np.finfo(np.float32).min), max=0.0).cpu().numpy(),
    }


def encode_sampled(layout: Sampled, logits: torch.Tensor, seeds: Any) -> dict[str, np.ndarray]:
    """Each row's CDF, N Philox draws per row from its seed, then the distinct classes and their
    counts, most drawn first (ties: the smaller class), by one sort per row."""
    if seeds is None:
        raise ValueError("sampled targets need one draw seed per row")
    z = logits.float()
    rows, classes = z.shape
    n, device = layout.size, z.device
    cdf = torch.exp((z - z.max(dim=-1, keepdim=True).values) / layout.temperature).double().cumsum_(dim=-1)
    seed = torch.as_tensor(np.asarray(seeds, dtype=np.int64).reshape(rows, 1), device=device)
    words = philox(seed, torch.arange(n, dtype=torch.int64, device=device)[None, :])
    targets = uniform53(words[0], words[1]) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, targets, right=True).clamp_(max=classes - 1).sort(dim=-1).values
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    run = starts.long().cumsum_(dim=-1) - 1  # each draw's run of equal classes: [B, N]
    counts = torch.zeros_like(drawn).scatter_add_(1, run, torch.ones_like(drawn))
    values = torch.zeros_like(drawn).scatter_(1, run, drawn)
    order = torch.where(counts > 0, (n + 1 - counts) * classes + values, (n + 2) * classes).argsort(dim=-1)[:, : layout.width(classes)]
    fields = layout.fields(classes)
    return {
        "sample_indices": _narrow(values.gather(1, order), classes).cpu().numpy().astype(fields["sample_indices"][1]),
        "sample_counts": _narrow(counts.gather(1, order), n + 1).cpu().numpy().astype(fields["sample_counts"][1]),
    }
