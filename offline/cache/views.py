"""Views: the augmentation policies of a multi-view cache and the seeds that name each view.

A view is its seed. The service makes view ``v`` of sample ``id`` by applying the cache's policy
to the raw stored input with ``view_seeds(salt, [id], V)[0, v]``; the trainer replays the same
view from the same seed. Everything below is part of the cache format and must never change
for a given policy ``version``:

* ``view_seeds`` and the generator they feed (``philox``, ``uniform24``, ``uniform53``,
  ``below``) are defined in ``rng``, where the draws of sampled targets come from too.
* Which counter and word each policy draws from is written in the policy's class.

A policy maps raw stored inputs ``[B, *shape]`` and one int64 seed per sample ``[B]`` to views
of the same shape and dtype, on the inputs' device, before any preprocessing (``--input-scale``,
``--normalize``). ``parse_policy`` reads ``none``, ``random-crop:P``, ``random-crop-flip:P``,
``random-resized-crop`` and ``module:factory``.

The ``module:factory`` contract: ``factory()`` (no arguments) returns a callable
``(inputs, seeds) -> views``, or an ``AugmentPolicy``. It must be a deterministic function of a
batch of raw inputs and one integer seed per sample, computing each sample's view from that
sample and its seed alone (not from the batch around it, nor from a global RNG), run on
whatever device the inputs are on, and return the inputs' shape and dtype. Draw randomness from
``philox``. Give the callable a ``version`` attribute (default 1) and change it whenever its
views change: the manifest records it. ``check_policy`` tests the contract on a small batch.

A ``module:factory`` read from a cache's manifest is code named inside a file: ``parse_policy``
imports it only when its ``origin`` says the user passed ``--trust-code`` (``trust``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .rng import VIEW_SEED_PERSON, below, keyed_seeds, philox, philox4x32, uniform24, uniform53, view_seeds
from .trust import COMMAND_LINE, Origin, import_factory
from .trust import describe_error as _one_line

__all__ = [
    "VIEW_SEED_PERSON",
    "below",
    "keyed_seeds",
    "philox",
    "philox4x32",
    "uniform24",
    "uniform53",
    "view_seeds",
    "PolicyError",
    "AugmentPolicy",
    "parse_policy",
    "check_policy",
]


class PolicyError(ValueError):
    """An augmentation policy that cannot be parsed, or breaks the policy contract."""


# ---- policies ----


class AugmentPolicy:
    """A named, versioned, seeded augmentation. Subclasses implement ``apply``."""

    name: str = ""
    version: int = 1

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    def describe(self) -> dict[str, Any]:
        """What the manifest records; ``parse_policy`` takes it back."""
        return {"name": self.name, "params": dict(self.params), "version": int(self.version)}

    def __repr__(self) -> str:
        return f"AugmentPolicy({self.describe()})"

    def __call__(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        seeds = torch.as_tensor(seeds).to(device=inputs.device, dtype=torch.int64)
        if seeds.shape != inputs.shape[:1]:
            raise PolicyError(f"{self.name}: got {list(seeds.shape)} seeds for a batch of {len(inputs)} inputs, expected one per sample")
        return self.apply(inputs, seeds)

    def apply(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Identity(AugmentPolicy):
    """``none``: the stored input itself (V = 1 caches)."""

    name = "none"

    def apply(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return inputs


def _image_dims(policy: AugmentPolicy, inputs: torch.Tensor) -> tuple[int, int]:
    if inputs.dim() < 3:
        raise PolicyError(f"{policy.name} needs samples of shape [H, W] or [C, H, W], got {list(inputs.shape[1:])}")
    return inputs.shape[-2], inputs.shape[-1]


class RandomCrop(AugmentPolicy):
    """``random-crop:P``: pad H and W by P zeros, crop back at (dy, dx) in [0, 2P]^2; with
    ``flip``, mirror W when the flip bit is set. Counter 0: dy = below(w0, 2P+1), dx =
    below(w1, 2P+1), flip = top bit of w2. Exact for every dtype."""

    def __init__(self, padding: int, flip: bool = False) -> None:
        super().__init__(padding=padding)
        self.padding, self.flip = padding, flip
        self.name = "random-crop-flip" if flip else "random-crop"

    def apply(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        height, width = _image_dims(self, inputs)
        p = self.padding
        if p >= min(height, width):
            raise PolicyError(f"{self.name}:{p} pads more than inputs of {height}x{width} allow (P < {min(height, width)})")
        w0, w1, w2, _ = philox(seeds, 0)
        rows = below(w0, 2 * p + 1)[:, None] + torch.arange(height, device=inputs.device)
        cols_ahead = torch.arange(width, device=inputs.device)
        if self.flip:
            cols_ahead = torch.where((w2 >> 31).bool()[:, None], width - 1 - cols_ahead, cols_ahead)
        cols = below(w1, 2 * p + 1)[:, None] + cols_ahead
        batch = inputs.reshape(len(inputs), -1, height, width)
        padded = batch.new_zeros(batch.shape[0], batch.shape[1], height + 2 * p, width + 2 * p)
        padded[..., p : p + height, p : p + width] = batch
        samples = torch.arange(len(inputs), device=inputs.device)[:, None, None, None]
        channels = torch.arange(batch.shape[1], device=inputs.device)[None, :, None, None]
        return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]].reshape(inputs.shape)


class RandomResizedCrop(AugmentPolicy):
    """``random-resized-crop``: torchvision's RandomResizedCrop.get_params (scale (0.08, 1),
    ratio (3/4, 4/3), 10 attempts, then the central-crop fallback) with every draw from
    ``philox``, bilinear resize back to H x W (align_corners=False, no antialias, as
    F.interpolate), and a horizontal flip with p = 1/2.

    Draws: attempt k in 0..9 takes counter k (scale from w0, w1; log-ratio from w2, w3) and
    counter 10 + k (top offset below(w0, H - h + 1), left below(w1, W - w + 1)); the flip is the
    top bit of counter 20's w0. The box is computed in float64 on the CPU, so it is the same for
    every device; the resampling runs on the inputs' device in float32 (float64 for float64
    inputs). Integer inputs (uint8) are resampled in float32, rounded half to even and clamped
    to their dtype's range: the dtype is kept, the values are not exact."""

    name = "random-resized-crop"
    scale = (0.08, 1.0)
    ratio = (3.0 / 4.0, 4.0 / 3.0)

    def boxes(self, seeds: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, 5] int64 rows (top, left, h, w, flip) on the CPU."""
        seeds = seeds.cpu()[:, None]
        attempts = torch.arange(10)
        s0, s1, s2, s3 = philox(seeds, attempts)
        o0, o1, _, _ = philox(seeds, attempts + 10)
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * uniform53(s0, s1))
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * uniform53(s2, s3))
        w = torch.round(torch.sqrt(area * aspect)).long()
        h = torch.round(torch.sqrt(area / aspect)).long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)
        h, w, o0, o1 = (x.gather(1, first)[:, 0] for x in (h, w, o0, o1))
        top, left = below(o0, height - h + 1), below(o1, width - w + 1)
        # Fallback when no attempt fits: the central crop of the closest allowed ratio.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fall_w, fall_h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fall_w, fall_h = round(height * self.ratio[1]), height
        else:
            fall_w, fall_h = width, height
        fallback = torch.tensor([(height - fall_h) // 2, (width - fall_w) // 2, fall_h, fall_w])
        chosen = torch.stack([top, left, h, w], dim=1)
        chosen = torch.where(fits.any(dim=1, keepdim=True), chosen, fallback)
        flip = philox(seeds[:, 0], 20)[0] >> 31
        return torch.cat([chosen, flip[:, None]], dim=1)

    def apply(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        height, width = _image_dims(self, inputs)
        if inputs.dtype == torch.bool or inputs.is_complex():
            raise PolicyError(f"{self.name} resamples numbers; inputs of dtype {inputs.dtype} are not supported")
        device = inputs.device
        top, left, h, w, flip = self.boxes(seeds, height, width).to(device).unbind(1)
        work = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        rows = _source_index(top, h, height, work)
        cols_ahead = torch.arange(width, device=device)
        cols_ahead = torch.where(flip.bool()[:, None], width - 1 - cols_ahead, cols_ahead)
        cols = _source_index(left, w, width, work, cols_ahead)
        batch = inputs.reshape(len(inputs), -1, height, width).to(work)
        samples = torch.arange(len(inputs), device=device)[:, None, None, None]
        channels = torch.arange(batch.shape[1], device=device)[None, :, None, None]

        def pick(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return batch[samples, channels, r[:, None, :, None], c[:, None, None, :]]

        (r0, r1, ry), (c0, c1, cx) = rows, cols
        ry, cx = ry[:, None, :, None], cx[:, None, None, :]
        upper = (1 - cx) * pick(r0, c0) + cx * pick(r0, c1)
        lower = (1 - cx) * pick(r1, c0) + cx * pick(r1, c1)
        views = ((1 - ry) * upper + ry * lower).reshape(inputs.shape)
        if inputs.dtype.is_floating_point:
            return views.to(inputs.dtype)
        info = torch.iinfo(inputs.dtype)
        return views.round().clamp(info.min, info.max).to(inputs.dtype)


def _source_index(start: torch.Tensor, size: torch.Tensor, out_size: int, work: torch.dtype, out_index: torch.Tensor | None = None):
    """F.interpolate's bilinear source pixels (align_corners=False) for each sample's box
    [start, start + size) resized to ``out_size``: (index0, index1, weight of index1)."""
    if out_index is None:
        out_index = torch.arange(out_size, device=start.device).expand(len(start), out_size)
    scale = size.to(work)[:, None] / out_size
    source = (scale * (out_index.to(work) + 0.5) - 0.5).clamp(min=0)
    index0 = source.long()
    weight = source - index0.to(work)
    index1 = torch.minimum(index0 + 1, size[:, None] - 1)
    return start[:, None] + index0, start[:, None] + index1, weight


class FactoryPolicy(AugmentPolicy):
    """``module:factory``: a user's policy (the contract is in the module docstring)."""

    def __init__(self, spec: str, function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__(**dict(getattr(function, "params", None) or {}))
        self.name, self.function = spec, function
        self.version = int(getattr(function, "version", 1))

    def apply(self, inputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return self.function(inputs, seeds)


BUILT_IN = "none, random-crop:P, random-crop-flip:P, random-resized-crop"


def parse_policy(spec: str | Mapping[str, Any] | None, origin: Origin = COMMAND_LINE) -> AugmentPolicy:
    """A policy from its spec (``random-crop:3``, ``pkg.mod:factory``, ``none`` or None) or
    from a manifest's ``describe()`` record, which must name a version this code knows.
    ``origin``: where the spec was read; a ``module:factory`` from a file the user has not
    trusted raises UntrustedCode before anything is imported."""
    if isinstance(spec, Mapping):
        return _from_record(spec, origin)
    text = "none" if spec is None else str(spec).strip()
    name, sep, argument = text.partition(":")
    if name in ("", "none") and not sep:
        return Identity()
    if name in ("random-crop", "random-crop-flip"):
        if not argument.strip():
            raise PolicyError(f"{name} needs a padding in pixels: {name}:P, e.g. {name}:4")
        try:
            padding = int(argument)
        except ValueError:
            raise PolicyError(f"{text}: the padding must be a whole number of pixels, got {argument!r}") from None
        if padding < 0:
            raise PolicyError(f"{text}: the padding must be at least 0, got {padding}")
        return RandomCrop(padding, flip=name == "random-crop-flip")
    if name == "random-resized-crop":
        if sep:
            raise PolicyError(f"{text}: random-resized-crop takes no parameters")
        return RandomResizedCrop()
    if not (sep and name and argument) or "-" in name or name == "none":
        raise PolicyError(f"unknown augmentation policy {text!r}; built-in: {BUILT_IN}; or give module:factory")
    return _from_factory(text, argument, origin)


def _from_factory(spec: str, attr: str, origin: Origin) -> AugmentPolicy:
    factory = import_factory(spec, what="augment policy", origin=origin, error=PolicyError)
    try:
        function = factory()
    except Exception as exc:
        raise PolicyError(f"{spec}: calling {attr}() failed ({_one_line(exc)})") from None
    if not callable(function):
        raise PolicyError(f"{spec}: {attr}() returned {type(function).__name__}, expected a callable (inputs, seeds) -> views")
    return FactoryPolicy(spec, function)


def _from_record(record: Mapping[str, Any], origin: Origin) -> AugmentPolicy:
    params = dict(record.get("params") or {})
    name = str(record.get("name", ""))
    crop = name in ("random-crop", "random-crop-flip")
    policy = parse_policy(f"{name}:{params.get('padding', '')}" if crop else name, origin)
    if policy.describe() != {"name": name, "params": params, "version": int(record.get("version", 1))}:
        raise PolicyError(f"the cache's augmentation policy {dict(record)} does not match what {name!r} is here ({policy.describe()})")
    return policy


def check_policy(policy: AugmentPolicy, input_shape: Sequence[int], input_dtype: Any, device: str | torch.device = "cpu") -> None:
    """Run ``policy`` on a small random batch twice, and on one sample alone, and raise
    PolicyError unless it keeps the shape and dtype, is deterministic and batch-independent."""
    dtype = getattr(torch, np.dtype(input_dtype).name) if not isinstance(input_dtype, torch.dtype) else input_dtype
    shape = (3, *(int(d) for d in input_shape))
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        inputs = torch.rand(shape, generator=generator).to(dtype)
    else:
        high = 2 if dtype == torch.bool else min(int(torch.iinfo(dtype).max), 255) + 1
        inputs = torch.randint(0, high, shape, generator=generator).to(dtype)
    inputs = inputs.to(device)
    seeds = torch.tensor([0x1F2E3D4C5B6A7988, 12345, 0x7EDCBA9876543210], device=device)

    def run(batch: torch.Tensor, batch_seeds: torch.Tensor) -> torch.Tensor:
        try:
            views = policy(batch.clone(), batch_seeds.clone())
        except PolicyError:
            raise
        except Exception as exc:  # a user policy can fail in any way; say which and why
            raise PolicyError(
                f"augmentation policy {policy.name}: failed on inputs {list(batch.shape)} {dtype} ({_one_line(exc)})"
            ) from None
        if not isinstance(views, torch.Tensor):
            raise PolicyError(f"augmentation policy {policy.name} returned {type(views).__name__}, expected a tensor")
        if views.shape != batch.shape or views.dtype != batch.dtype:
            raise PolicyError(
                f"augmentation policy {policy.name} turns inputs {list(batch.shape)} {batch.dtype} into {list(views.shape)} {views.dtype};"
                " a view must keep the input's shape and dtype"
            )
        return views

    first = run(inputs, seeds)
    if not torch.equal(first, run(inputs, seeds)):
        raise PolicyError(f"augmentation policy {policy.name} is not deterministic: two calls with the same inputs and seeds differ")
    alone = run(inputs[1:2], seeds[1:2])
    same = torch.equal if not dtype.is_floating_point else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if not (same(alone, first[1:2]) and same(run(inputs.flip(0), seeds.flip(0)), first.flip(0))):
        raise PolicyError(f"augmentation policy {policy.name}: a sample's view depends on the other samples in its batch")
