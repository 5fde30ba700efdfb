"""Held-out evaluation of a language-model student: perplexity, and agreement with the teacher.

``--eval`` is an ``.npz`` with ``input_ids`` [N, L'] (int64, L' at most the student's context)
and optionally ``lengths`` [N] (each 1..L'; without them every row is L' tokens), or a token cache
directory (task lm, the training cache's vocabulary). Perplexity is exp of the mean next-token
cross-entropy over the predicted tokens (position t of a sequence predicts token t + 1, for
t < length - 1). On a cache, ``eval_agreement`` is the share of its valid tokens where the
student's argmax is the teacher's top-1: the first top-k index, the most drawn sample, or the
argmax of full logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import CacheError, CacheMeta, CacheReader
from ..cache.transfer_set import read_npz_members

EVAL_LOGIT_BYTES = 64 << 20  # a batch of the student's float32 logits, at most about this


class LMEvalError(ValueError):
    """An eval set that does not fit the student or the cache, in one line."""


@dataclass
class LMEvalSet:
    path: str
    ids: torch.Tensor  # [N, L'] int64, 0 beyond each length
    lengths: torch.Tensor  # [N] int64
    teacher_top1: torch.Tensor | None = None  # [N, L'] int64, for a cache

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def load_lm_eval(path: str, meta: CacheMeta, vocab: int, context: int) -> LMEvalSet:
    """The eval set at ``path`` checked against the training cache (``meta``) and a student of
    ``vocab`` classes and ``context`` tokens."""
    if Path(path).is_dir():
        ids, lengths, top1 = _read_cache(path, meta)
    elif Path(path).suffix.lower() == ".npz":
        (ids, lengths), top1 = _read_npz(path), None
    else:
        raise LMEvalError(f"{path}: --task lm evaluates on an .npz of input_ids (and lengths) or a token cache directory")
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or len(ids) == 0 or ids.shape[1] < 1:
        raise LMEvalError(f"{path}: input_ids must be integer token ids [N, L'] with N, L' >= 1, got {list(ids.shape)} of {ids.dtype}")
    if ids.shape[1] > context:
        raise LMEvalError(f"{path}: sequences of {ids.shape[1]} tokens are longer than the student's context of {context}")
    valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    bound = min(vocab, meta.num_classes)
    outside = valid & ((ids < 0) | (ids >= bound))
    if outside.any():
        row, position = (int(i) for i in np.argwhere(outside)[0])
        raise LMEvalError(f"{path}: row {row}, position {position} holds token {ids[row, position]}, outside the vocabulary [0, {bound:,})")
    ids = np.where(valid, ids, 0).astype(np.int64)
    return LMEvalSet(
        path, torch.from_numpy(ids), torch.from_numpy(lengths.astype(np.int64)), None if top1 is None else torch.from_numpy(top1)
    )


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        arrays = read_npz_members(path, ("input_ids", "lengths"), required="input_ids")
    except CacheError as exc:
        raise LMEvalError(str(exc)) from None
    ids, lengths = arrays["input_ids"], arrays.get("lengths")
    width = ids.shape[1] if ids.ndim == 2 else 0
    if lengths is None:
        return ids, np.full(len(ids), width, dtype=np.int64)
    if lengths.shape != (len(ids),) or lengths.dtype.kind not in "iu" or (len(lengths) and (lengths.min() < 1 or lengths.max() > width)):
        raise LMEvalError(f"{path}: lengths must be {len(ids)} integers in [1, {width}] (the width of input_ids)")
    return ids, lengths.astype(np.int64)


def _read_cache(path: str, meta: CacheMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    reader = CacheReader(path)
    other = reader.meta
    if other.task != "lm":
        raise LMEvalError(f"{path}: a cache of task {other.task}, not a token cache (task lm)")
    if other.num_classes != meta.num_classes:
        raise LMEvalError(f"{path}: a cache over {other.num_classes:,} tokens, the training cache's are {meta.num_classes:,}")
    if None not in (other.tokenizer_fingerprint, meta.tokenizer_fingerprint) and other.tokenizer_fingerprint != meta.tokenizer_fingerprint:
        raise LMEvalError(
            f"{path}: its token ids are of tokenizer {other.tokenizer_fingerprint[:12]}…, the training cache's of "  # type: ignore[index]
            f"{meta.tokenizer_fingerprint[:12]}…"  # type: ignore[index]
        )
    inner = other.target_layout
    fields = {"topk": ("topk_indices",), "sampled": ("sample_indices",), "full": ("logits",)}[inner.name]
    arrays = reader.read(("inputs", "lengths", *fields))
    values = arrays[fields[0]]
    top1 = values.argmax(-1) if inner.name == "full" else values[..., 0]  # sampled: most drawn first
    return arrays["inputs"], arrays["lengths"].astype(np.int64), top1.astype(np.int64)


@torch.no_grad()
def evaluate_lm(model: nn.Module, eval_set: LMEvalSet, device: torch.device, vocab: int) -> dict[str, Any]:
    """``eval_perplexity`` (and ``eval_ce``, nats per predicted token) on the eval set, and
    ``eval_agreement`` when it came from a cache; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    ce_sum, predicted, agree, valid_tokens = 0.0, 0, 0, 0
    width = eval_set.ids.shape[1]
    rows = max(1, EVAL_LOGIT_BYTES // (4 * width * vocab))
    try:
        for start in range(0, len(eval_set.ids), rows):
            lengths = eval_set.lengths[start : start + rows]
            used = int(lengths.max())
            ids = eval_set.ids[start : start + rows, :used].to(device)
            logits = model(ids).float()
            valid = (torch.arange(used)[None, :] < lengths[:, None]).to(device)
            target = valid[:, 1:]
            ce_sum += float(F.cross_entropy(logits[:, :-1][target], ids[:, 1:][target], reduction="sum"))
            predicted += int(target.sum())
            if eval_set.teacher_top1 is not None:
                teacher = eval_set.teacher_top1[start : start + rows, :used].to(device)
                agree += int((logits.argmax(-1) == teacher)[valid].sum())
                valid_tokens += int(valid.sum())
    finally:
        model.train(was_training)
    ce = ce_sum / predicted if predicted else math.nan
    out: dict[str, Any] = {"eval_perplexity": math.exp(ce) if predicted else None, "eval_ce": ce if predicted else None}
    if eval_set.teacher_top1 is not None:
        out["eval_agreement"] = agree / valid_tokens if valid_tokens else None
    return out


def plot_lm_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """curves.png: the training loss and the eval perplexity per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="loss")
    ax_loss.plot(epochs, [h["train_ce"] for h in history], marker="o", label="next-token cross-entropy")
    ax_loss.set(xlabel="epoch", ylabel="nats per token", title="training")
    ax_loss.legend()
    if any(h.get("eval_perplexity") is not None for h in history):
        ax_ppl.plot(epochs, [h.get("eval_perplexity") for h in history], marker="o")
    ax_ppl.set(xlabel="epoch", ylabel="perplexity", title="eval perplexity")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
