"""Held-out evaluation: the eval set a run reports accuracy on, checked against the cache's
input contract, and the accuracy of a student on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import CacheMeta, CacheReader, read_transfer_set


class EvalSetError(Exception):
    """An eval set that does not fit the cache, explained in one line."""


def load_eval_set(path: str, meta: CacheMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``.npz`` with ``inputs`` and ``labels``, or a cache directory, checked against ``meta``."""
    arrays = CacheReader(path).read(("inputs", "labels")) if Path(path).is_dir() else read_transfer_set(path)
    inputs = arrays["inputs"]
    if tuple(inputs.shape[1:]) != meta.input_shape:
        raise EvalSetError(f"{path}: inputs have sample shape {list(inputs.shape[1:])}, the cache's are {list(meta.input_shape)}")
    if inputs.dtype.kind not in "biuf":
        raise EvalSetError(f"{path}: inputs have dtype {inputs.dtype}, expected numbers")
    if "labels" not in arrays:
        raise EvalSetError(f"{path}: has no 'labels' array to evaluate against")
    labels = arrays["labels"]
    if len(labels) == 0 or (labels < 0).any() or (labels >= meta.num_classes).any():
        raise EvalSetError(f"{path}: labels must be known and lie in [0, {meta.num_classes - 1}]")
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels)


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, meta: CacheMeta, device: torch.device, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of ``model`` on raw ``inputs``, preprocessed as the teacher's were."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(inputs), batch_size):
        x = meta.preprocessing.apply(inputs[start : start + batch_size].to(device))
        correct += int((model(x).argmax(-1).cpu() == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(inputs)
