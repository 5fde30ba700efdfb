"""The bundled digits data set (scikit-learn's load_digits) as the tests' transfer set: a teacher
trained here, its logits written through CacheWriter, and a held-out eval .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# The demo's split, teacher training and teacher forward are the tests' too.
from kdcache.demo.digits import load_split, teacher_logits, train_teacher  # noqa: F401
from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheWriter, Preprocessing

PREPROCESSING = Preprocessing(scale=1 / 16)


def fingerprint(model: torch.nn.Module) -> str:
    return models.weights_fingerprint(model.state_dict())


def write_cache(
    directory: Path, x: np.ndarray, logits: np.ndarray, labels: np.ndarray, *, teacher_fingerprint: str = "0" * 64,
    max_samples: int = 256, logits_dtype: str = "float32", teacher_name: str = "digits-teacher",
) -> Path:  # fmt: skip
    meta = CacheMeta(
        teacher_fingerprint=teacher_fingerprint, teacher_name=teacher_name, num_classes=logits.shape[1],
        input_shape=x.shape[1:], input_dtype=x.dtype.name, preprocessing=PREPROCESSING, serving_temperature=1.0,
        logits_dtype=logits_dtype,
    )  # fmt: skip
    with CacheWriter(directory, meta, max_samples=max_samples) as writer:
        for start in range(0, len(x), 100):
            stop = start + 100
            writer.append(np.arange(start, min(stop, len(x))), x[start:stop], logits[start:stop], labels[start:stop])
    return directory
