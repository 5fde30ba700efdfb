"""Held-out evaluation: the eval set a run reports accuracy on, checked against the cache's
input contract, the accuracy and calibration of a student on it, and the curves of a run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cache import CacheMeta, CacheReader, read_transfer_set
from .sources import SampleSpec, detect_kind, fit_shape, open_source


class EvalSetError(Exception):
    """An eval set that does not fit the cache, explained in one line."""


def load_eval_set(path: str, meta: CacheMeta, label_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``.npz`` with ``inputs`` and ``labels``, a cache directory, or any other transfer set
    ``open_source`` reads (an image folder, Parquet, a saved Hugging Face dataset, ...) made to
    fit the cache's input contract, checked against ``meta``. ``label_names``: the cache's class
    names, through which a source that names its classes maps its labels."""
    if Path(path).is_dir() and detect_kind(path) is None:  # a cache, or a directory CacheReader explains
        arrays = CacheReader(path).read(("inputs", "labels"))
    elif Path(path).suffix.lower() == ".npz":
        arrays = read_transfer_set(path)
        # shaped as every other source is ([N, 28, 28] for [1, 28, 28]); its dtype is taken as it is
        arrays["inputs"] = fit_shape(arrays["inputs"], SampleSpec(meta.input_shape, meta.input_dtype), path)
    else:
        arrays = _read_source(path, meta, label_names)
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


def _read_source(path: str, meta: CacheMeta, label_names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """The whole of a transfer set in memory (eval sets are small), without labels when it has none."""
    spec = SampleSpec(meta.input_shape, meta.input_dtype, meta.num_classes)
    batches = list(open_source(path, spec, label_names=label_names).batches(1024))
    if not batches:
        raise EvalSetError(f"{path}: holds no samples")
    labels = np.concatenate([batch.labels for batch in batches])
    inputs = np.concatenate([batch.inputs for batch in batches])
    return {"inputs": inputs, "labels": labels} if (labels >= 0).any() else {"inputs": inputs}


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, meta: CacheMeta, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """The logits [N, C] (float32, on the CPU) of ``model`` in eval mode on raw ``inputs``,
    preprocessed as the teacher's were."""
    was_training = model.training
    model.eval()
    logits = [
        model(meta.preprocessing.apply(inputs[start : start + batch_size].to(device))).float().cpu()
        for start in range(0, len(inputs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(logits)


def evaluate(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, meta: CacheMeta, device: torch.device, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of ``model`` on raw ``inputs``, preprocessed as the teacher's were."""
    return float((predict(model, inputs, meta, device, batch_size).argmax(-1) == labels).double().mean())


def evaluate_ece(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, meta: CacheMeta, device: torch.device, batch_size: int = 1024
) -> float:
    """``expected_calibration_error`` of ``model``'s softmax on raw ``inputs``."""
    return expected_calibration_error(predict(model, inputs, meta, device, batch_size), labels)


def expected_calibration_error(probs_or_logits: Any, labels: Any, bins: int = 15) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017, eq. 3): the predictions' top-1 confidences in
    ``bins`` equal-width bins ((0, 1/M], (1/M, 2/M], ... (1 - 1/M, 1]), and the mean over samples
    of |accuracy - mean confidence| of each sample's bin, i.e. sum_b |B_b| / n * |acc(B_b) - conf(B_b)|.

    ``probs_or_logits`` [N, C] (numpy or torch) are probabilities when every row is
    non-negative and sums to 1 (within 1e-4), else logits, which are softmaxed. ``labels`` [N].
    """
    scores, labels = _cpu_tensor(probs_or_logits).to(torch.float64), _cpu_tensor(labels).long()
    if scores.dim() != 2 or len(scores) != len(labels) or len(labels) == 0:
        raise ValueError(f"ECE needs predictions [N, C] and labels [N] with N >= 1, got {list(scores.shape)} and {list(labels.shape)}")
    if bins < 1:
        raise ValueError(f"ECE needs bins >= 1, got {bins}")
    is_probs = bool((scores >= 0).all() and torch.allclose(scores.sum(-1), torch.ones(len(scores), dtype=torch.float64), atol=1e-4))
    probs = scores if is_probs else torch.softmax(scores, dim=-1)
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).double()
    # bin b holds confidences in (b/M, (b+1)/M]; a confidence is at least 1/C > 0
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def _cpu_tensor(values: Any) -> torch.Tensor:
    return values.detach().cpu() if torch.is_tensor(values) else torch.as_tensor(np.asarray(values))


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
