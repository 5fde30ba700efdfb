"""The problems the defaults are chosen and measured on, all built from scikit-learn's bundled
digits (1,797 real 8×8 images), so that nothing is downloaded:

* ``digits``: the images themselves, C = 10, uint8 0..16.
* ``digit-pairs``: two images side by side (8×16), labelled 10·left + right, C = 100.
* ``digits-28``: each image upsampled, rotated, scaled, sheared and placed at random on a 28×28
  canvas, with stroke contrast and noise varied, uint8 0..255 (the shape of MNIST-like data).

Every problem has the same three splits, drawn from disjoint images: ``train`` (the transfer
set, from the demo's train split less a stratified validation share), ``validation`` (the rest
of the demo's train split: every default is chosen on it) and ``test`` (the demo's test split:
only for the final figures, never for a choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from . import digits as demo

VALIDATION_SHARE = 0.2  # of the demo's train split, stratified, seed demo.SPLIT_SEED
PAIR_SEEDS = {"train": 1, "validation": 2, "test": 3}  # the draws of each split's pairs
PLACED_SEEDS = {"train": 11, "validation": 12, "test": 13}  # the distortions of each split's 28×28 images
PROBLEMS = ("digits", "digit-pairs", "digits-28")


@dataclass
class Problem:
    name: str
    classes: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # train, validation, test: (uint8 inputs, int64 labels)
    input_scale: float  # what the teacher is served with (--input-scale): pixels to 0..1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"][0].shape[1:])

    def describe(self) -> str:
        sizes = ", ".join(f"{split} {len(y):,}" for split, (_, y) in self.splits.items())
        return f"{self.name}: {list(self.input_shape)} uint8, C={self.classes}; {sizes}"


@cache
def digit_images() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The demo's stratified 70/30 split of the digits, with a stratified validation share of its train part."""
    from sklearn.model_selection import train_test_split

    split = demo.load_split()
    x_train, x_val, y_train, y_val = train_test_split(
        split["x_train"], split["y_train"], test_size=VALIDATION_SHARE, random_state=demo.SPLIT_SEED, stratify=split["y_train"]
    )
    return {"train": (x_train, y_train), "validation": (x_val, y_val), "test": (split["x_test"], split["y_test"])}


def digit_pairs(images: tuple[np.ndarray, np.ndarray], samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` pairs of images drawn uniformly with replacement from one split, side by
    side (8×16), labelled 10·left + right: no image is in two splits."""
    x, y = images
    left, right = np.random.default_rng(seed).integers(0, len(x), (2, samples))
    return np.ascontiguousarray(np.concatenate([x[left], x[right]], axis=2)), (10 * y[left] + y[right]).astype(np.int64)


def placed_digits(images: tuple[np.ndarray, np.ndarray], samples: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` images drawn with replacement from one split, each upsampled (bilinear) by an
    affine map onto a ``size``×``size`` canvas: rotated ±20°, the digit 15–22 pixels tall,
    sheared up to 0.25, moved up to 4 pixels off centre; then contrast 0.6–1 and Gaussian noise
    (σ 0.04), as uint8 0..255."""
    import torch
    import torch.nn.functional as F

    x, y = images
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(x), samples)
    angle = np.deg2rad(rng.uniform(-20, 20, samples))
    height = rng.uniform(15, 22, samples)  # pixels the 8 source rows cover
    shear = rng.uniform(-0.25, 0.25, samples)
    shift = rng.uniform(-4, 4, (samples, 2)) * 2 / size  # in the grid's [-1, 1] units
    # theta maps output coordinates to input ones: the inverse of scale · rotate · shear.
    zoom = size / height
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((samples, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = zoom * cos, zoom * (-sin + shear * cos)
    theta[:, 1, 0], theta[:, 1, 1] = zoom * sin, zoom * (cos + shear * sin)
    theta[:, :, 2] = -shift * zoom[:, None]
    source = torch.from_numpy(x[pick].astype(np.float32) / 16.0)[:, None]
    grid = F.affine_grid(torch.from_numpy(theta), [samples, 1, size, size], align_corners=False)
    canvas = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()
    canvas = canvas * rng.uniform(0.6, 1.0, (samples, 1, 1)) + rng.normal(0, 0.04, canvas.shape)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8), y[pick].astype(np.int64)


# Samples per split of the generated problems: the digit pairs as bench.targets has always drawn
# them; the 28×28 set the size of a small user's transfer set (4,000, as in issue 19's trial).
SIZES = {
    "digit-pairs": {"train": 20000, "validation": 4000, "test": 4000},
    "digits-28": {"train": 4000, "validation": 1000, "test": 1000},
}


def make_problem(name: str, scale: float = 1.0) -> Problem:
    """One problem by name; ``scale`` shrinks the generated ones (quick runs and tests)."""
    images = digit_images()
    if name == "digits":
        return Problem(name, 10, dict(images), demo.INPUT_SCALE)
    sizes = {split: max(10, math.ceil(count * scale)) for split, count in SIZES[name].items()}
    if name == "digit-pairs":
        splits = {split: digit_pairs(images[split], sizes[split], PAIR_SEEDS[split]) for split in sizes}
        return Problem(name, 100, splits, demo.INPUT_SCALE)
    if name == "digits-28":
        splits = {split: placed_digits(images[split], sizes[split], PLACED_SEEDS[split]) for split in sizes}
        return Problem(name, 10, splits, 1 / 255)
    raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
