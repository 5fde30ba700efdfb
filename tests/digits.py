"""The bundled digits data set (scikit-learn's load_digits) as the tests' transfer set: a teacher
trained here, its logits written through CacheWriter, and a held-out eval .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from kdcache.demo.digits import load_split  # noqa: F401 - the demo's split, the tests' too
from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheWriter, Preprocessing

PREPROCESSING = Preprocessing(scale=1 / 16)


def train_teacher(x: np.ndarray, y: np.ndarray, arch: str = "cnn-large", epochs: int = 30, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(arch, x.shape[1:], 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    inputs = PREPROCESSING.apply(torch.from_numpy(x))
    labels = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def fingerprint(model: torch.nn.Module) -> str:
    return models.weights_fingerprint(model.state_dict())


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    return model(PREPROCESSING.apply(torch.from_numpy(x))).numpy().astype(np.float32)


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
