"""Held-out evaluation: the eval set a run reports accuracy on, checked against the cache's
input contract, the accuracy of a student on it, and the curves of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train (labelled samples)")
    if any(h.get("eval_accuracy") is not None for h in history):
        ax_acc.plot(epochs, [h.get("eval_accuracy") for h in history], marker="o", label="eval")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
