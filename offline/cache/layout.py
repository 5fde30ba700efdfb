"""Target layouts: how the teacher's outputs for a sample are stored, read back and trained on.

A layout owns the datasets that hold the teacher's outputs beside ``ids``, ``inputs`` and
``labels``: their row shapes and dtypes, the encoding of a batch of the teacher's float32 logits
into them, the decoding back into logits (what the service answers for a cache hit), the
training target that the loss takes (its loss is ``offline.losses.SOFT_TERMS[layout.name]``),
and the bytes a row costs. The writer, the reader, the streaming dataset, the service's batcher
and the trainer all ask the cache's layout (``CacheMeta.layout``) rather than assume full
logits. A cache's metadata names its layout with a spec (``logits_layout``): ``full``,
``topk:K`` or ``sampled:N``; ``make_layout`` parses it. Numpy only.

* ``full``: the teacher's raw logits, valid at any distillation temperature.
* ``topk:K``: the K largest logits in the cache's logits dtype, their class indices in the
  narrowest unsigned integer type that holds C-1 (never a float: float16 is exact only up to
  2048), and the log of the probability mass outside them at the serving temperature T_s.
* ``sampled:N``: N classes drawn with replacement from softmax(v / T_s) (Anshumann et al.,
  ACL 2025), stored as their distinct indices and counts, fixed width min(N, C) (unused slots
  have count 0). Draw ``n`` of view ``v`` of sample ``id`` is the inverse CDF of
  ``uniform53(philox(draw_seeds(seed, [id], V)[0, v], n)[:2])``, so an encoding is a function
  of the logits, the id and the cache's ``target_seed`` alone: reproducible, whatever the batch.

The sparse layouts are defined at T_s and cannot be re-tempered (``fixed_temperature``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .rng import philox, uniform53

LOGITS_DTYPES = ("float32", "float16")
_TINY = float(np.finfo(np.float32).tiny)


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every class index 0..C-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{num_classes} classes do not fit uint32 indices")


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(x - top).sum(axis=axis)) + np.squeeze(top, axis=axis)


class TargetLayout(ABC):
    """One way of storing the teacher's outputs; instances are immutable and compare by value."""

    name: ClassVar[str]
    # Whether the stored targets are the teacher's soft targets only at the serving temperature.
    fixed_temperature: ClassVar[bool] = False
    # Whether encoding draws randomness: then ``encode`` takes one int64 seed per row.
    randomized: ClassVar[bool] = False

    @property
    def spec(self) -> str:
        """The name the cache's metadata records (``logits_layout``)."""
        return self.name

    def check(self, num_classes: int) -> None:
        """Raise ValueError when this layout cannot hold targets over ``num_classes`` classes."""
        return None

    @abstractmethod
    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each dataset this layout stores: its row shape and dtype, in column order."""

    @abstractmethod
    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The teacher's float32 logits [B, C] → the stored fields, B rows each. ``seeds``
        ([B] int64) are the rows' draw seeds, for a randomized layout; ``lengths`` ([B]) the
        rows' token counts, for a per-token layout (``tokens.PerToken``); others ignore it."""

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``encode`` of a torch tensor of logits on the teacher's device: the layouts below
        encode there, so that only the encoded fields cross to the host (top-k of 50,000
        classes: 16 of them). The fields come back as numpy arrays, as ``encode`` gives them.
        This default copies the logits to the host and encodes there."""
        host_seeds = None if seeds is None else np.asarray(seeds)
        return self.encode(logits.float().cpu().numpy(), host_seeds, lengths)

    @abstractmethod
    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """Stored fields → float32 logits [B, C] whose softmax at the serving temperature is the
        stored distribution: what a cache hit is answered with."""

    @abstractmethod
    def target(self, batch: Mapping[str, Any]) -> Any:
        """A training batch's stored fields (torch tensors) → the teacher target the loss takes."""

    @abstractmethod
    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        """What no writer would have stored in these rows (damage), or None."""

    def served(self, logits: np.ndarray) -> np.ndarray:
        """The float32 logits the service answers for freshly computed ones: what a later cache
        hit answers, where the layout can keep that promise (full logits, rounded to the
        cache's dtype); the teacher's own logits where it cannot (a sparse layout)."""
        return self.decode(self.encode(logits))

    def row_bytes(self, num_classes: int) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.fields(num_classes).values())

    def empty(self, num_classes: int) -> dict[str, np.ndarray]:
        return {name: np.empty((0, *shape), dtype=dtype) for name, (shape, dtype) in self.fields(num_classes).items()}

    def _key(self) -> tuple[Any, ...]:
        return (self.spec,)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._key()!r}"


class FullLogits(TargetLayout):
    """``logits`` [N, C]: the teacher's raw logits, before temperature, in float32 or float16."""

    name = "full"

    def __init__(self, dtype: str = "float32", **_: Any) -> None:
        if dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {dtype!r}")
        self.dtype = np.dtype(dtype)

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"logits": ((num_classes,), self.dtype)}

    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {"logits": np.asarray(logits).astype(self.dtype, copy=False)}

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        from .device import encode_full  # float16 rounds on the device: half the copy

        return encode_full(self, logits)

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(fields["logits"], dtype=np.float32)

    def target(self, batch: Mapping[str, Any]) -> Any:
        return batch["logits"]

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        return None if np.isfinite(fields["logits"]).all() else "non-finite teacher logits"

    def _key(self) -> tuple[Any, ...]:
        return (self.dtype.name,)


class _Sparse(TargetLayout):
    """A layout of the serving temperature's distribution over a few classes per row."""

    fixed_temperature = True
    parameter: ClassVar[str]  # what the number after the colon is called: K or N

    def __init__(self, size: int, dtype: str = "float32", temperature: float = 1.0, classes: int | None = None, **_: Any) -> None:
        if dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {dtype!r}")
        if not temperature > 0:
            raise ValueError(f"the serving temperature must be > 0, got {temperature}")
        self.size, self.dtype, self.temperature = int(size), np.dtype(dtype), float(temperature)
        self.classes = None if classes is None else int(classes)  # C, which decoding and checks need

    def _num_classes(self, indices: np.ndarray) -> int:
        if self.classes is None:
            raise ValueError(f"decoding {self.spec} targets needs the number of classes")
        return self.classes

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.size}"

    def served(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float32)

    def _key(self) -> tuple[Any, ...]:
        return (self.spec, self.dtype.name, self.temperature)


class TopK(_Sparse):
    """``topk_values`` [N, K] (the K largest logits, largest first, in the logits dtype),
    ``topk_indices`` [N, K] (their classes) and ``tail_logmass`` [N] (float32: the log of the
    probability mass outside them at the serving temperature)."""

    name = "topk"
    parameter = "K"
    # The trainer's rules for the tail (``offline.losses``): one bucket, or spread evenly.
    tails: ClassVar[tuple[str, ...]] = ("bucket", "uniform")

    def __init__(self, size: int, **params: Any) -> None:
        super().__init__(size, **params)
        if self.size < 1:
            raise ValueError(f"topk:K needs K >= 1, got {self.size}")

    def check(self, num_classes: int) -> None:
        if self.size >= num_classes:
            raise ValueError(f"topk:{self.size} needs K < C, the teacher's {num_classes} classes (a tail must remain); use full")

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {
            "topk_values": ((self.size,), self.dtype),
            "topk_indices": ((self.size,), index_dtype(num_classes)),
            "tail_logmass": ((), np.dtype(np.float32)),
        }

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """On the logits' device: ``torch.topk``, and the tail's log-mass summed directly (``device.encode_topk``)."""
        from .device import encode_topk

        return encode_topk(self, logits)

    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        logits = np.asarray(logits, dtype=np.float32)
        rows, classes = logits.shape
        k = self.size
        top = np.argpartition(logits, classes - k, axis=1)[:, classes - k :]
        values = np.take_along_axis(logits, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        top, values = np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)
        # The tail's mass is summed directly (not 1 - the head's), so a tiny tail keeps its digits.
        weights = np.exp((logits - values[:, :1]) / np.float32(self.temperature))
        total = weights.sum(axis=1, dtype=np.float64)
        np.put_along_axis(weights, top, 0.0, axis=1)
        rest = weights.sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore"):
            tail = np.log(rest) - np.log(total)
        underflow = ~np.isfinite(tail)
        if underflow.any():  # a tail below float32's range: the same in float64
            scaled = logits[underflow].astype(np.float64) / self.temperature
            masked = scaled.copy()
            np.put_along_axis(masked, top[underflow], -np.inf, axis=1)
            tail[underflow] = _logsumexp(masked) - _logsumexp(scaled)
        return {
            "topk_values": values.astype(self.dtype),
            "topk_indices": top.astype(index_dtype(classes)),
            "tail_logmass": np.maximum(tail, np.finfo(np.float32).min).astype(np.float32),
        }

    def log_probs(self, fields: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """log p of the K stored classes [N, K] and of the tail [N], at the serving temperature."""
        scaled = np.asarray(fields["topk_values"], dtype=np.float64) / self.temperature
        tail = np.minimum(np.asarray(fields["tail_logmass"], dtype=np.float64), -1e-12)
        head = scaled - _logsumexp(scaled)[:, None] + np.log(-np.expm1(tail))[:, None]
        return head, tail

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """The K classes' probabilities, and the tail spread evenly over the other classes."""
        indices = np.asarray(fields["topk_indices"], dtype=np.int64)
        rows, k = indices.shape
        classes = self._num_classes(indices)
        head, tail = self.log_probs(fields)
        out = np.repeat((tail - np.log(classes - k))[:, None], classes, axis=1)
        np.put_along_axis(out, indices, head, axis=1)
        return (out * self.temperature).astype(np.float32)

    def target(self, batch: Mapping[str, Any]) -> Any:
        """The K classes and the teacher's log-probabilities of them and of the tail at T_s
        (``topk_indices``, ``log_p_top`` [B, K], ``log_p_tail`` [B]), as numpy arrays: worked out
        here, on the host, so that a training step spends no device operations on them."""
        head, tail = self.log_probs({name: np.asarray(batch[name]) for name in ("topk_values", "tail_logmass")})
        return {
            "topk_indices": np.asarray(batch["topk_indices"]).astype(np.int64),
            "log_p_top": head.astype(np.float32),
            "log_p_tail": tail.astype(np.float32),
        }

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        values, tail = np.asarray(fields["topk_values"]), np.asarray(fields["tail_logmass"])
        if not (np.isfinite(values).all() and np.isfinite(tail).all()):
            return "non-finite top-k values or tail mass"
        if (tail > 1e-6).any():
            return "a tail mass above 1"
        if self.classes is not None and (np.asarray(fields["topk_indices"]).astype(np.int64) >= self.classes).any():
            return f"a top-k class index out of range [0, {self.classes})"
        return None


class Sampled(_Sparse):
    """``sample_indices`` [N, W] and ``sample_counts`` [N, W], W = min(N_draws, C): the distinct
    classes of N draws with replacement from softmax(v / T_s) and how often each was drawn,
    most drawn first; unused slots hold index 0 and count 0. Counts are in the narrowest
    unsigned type that holds N."""

    name = "sampled"
    parameter = "N"
    randomized = True

    def __init__(self, size: int, seed: int = 0, **params: Any) -> None:
        super().__init__(size, **params)
        if self.size < 1:
            raise ValueError(f"sampled:N needs N >= 1 draws, got {self.size}")
        if self.size > 65535:
            raise ValueError(f"sampled:N takes at most 65535 draws, got {self.size}")
        self.seed = int(seed)

    def width(self, num_classes: int) -> int:
        return min(self.size, num_classes)

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        width = self.width(num_classes)
        return {
            "sample_indices": ((width,), index_dtype(num_classes)),
            "sample_counts": ((width,), index_dtype(self.size + 1)),
        }

    def draws(self, logits: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """The N drawn classes [B, N] of each row."""
        logits = np.asarray(logits, dtype=np.float32)
        rows, classes = logits.shape
        weights = np.exp((logits - logits.max(axis=1, keepdims=True)) / np.float32(self.temperature))
        # One CDF through all rows, unnormalised: row r covers [start_r, start_r + total_r), and a
        # draw u of row r lands where start_r + u * total_r falls: one search for the batch.
        cdf = np.cumsum(weights.ravel(), dtype=np.float64)
        ends = cdf[classes - 1 :: classes]
        starts = np.concatenate(([0.0], ends[:-1]))
        seeds = np.asarray(seeds, dtype=np.int64).reshape(rows, 1)
        words = philox(seeds, np.arange(self.size, dtype=np.int64)[None, :])
        targets = starts[:, None] + uniform53(words[0], words[1]) * (ends - starts)[:, None]  # [B, N]
        first = np.arange(rows, dtype=np.int64)[:, None] * classes
        return np.clip(np.searchsorted(cdf, targets, side="right") - first, 0, classes - 1)

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """On the logits' device: the same Philox draws as ``encode`` (``device.encode_sampled``)."""
        from .device import encode_sampled

        return encode_sampled(self, logits, seeds)

    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if seeds is None:
            raise ValueError("sampled targets need one draw seed per row")
        logits = np.asarray(logits)
        rows, classes = logits.shape
        drawn = self.draws(logits, seeds)
        # Distinct (row, class) pairs and their counts, then each row's most drawn first.
        keys, counts = np.unique((np.arange(rows, dtype=np.int64)[:, None] * classes + drawn).ravel(), return_counts=True)
        row_of = keys // classes
        order = np.lexsort((keys, -counts, row_of))
        keys, counts, row_of = keys[order], counts[order], row_of[order]
        slot = np.arange(len(keys)) - np.searchsorted(row_of, row_of)  # position within its row
        fields = self.fields(classes)
        width = self.width(classes)
        indices = np.zeros((rows, width), dtype=fields["sample_indices"][1])
        kept = np.zeros((rows, width), dtype=fields["sample_counts"][1])
        indices[row_of, slot] = keys - row_of * classes
        kept[row_of, slot] = counts
        return {"sample_indices": indices, "sample_counts": kept}

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """The sample frequencies counts / N; classes never drawn get probability ~1e-38."""
        indices = np.asarray(fields["sample_indices"], dtype=np.int64)
        counts = np.asarray(fields["sample_counts"], dtype=np.float64)
        classes = self._num_classes(indices)
        probs = np.zeros((len(indices), classes))
        rows = np.broadcast_to(np.arange(len(indices))[:, None], indices.shape)
        np.add.at(probs, (rows, indices), counts / self.size)  # unused slots (index 0, count 0) add nothing
        return (np.log(np.maximum(probs, _TINY)) * self.temperature).astype(np.float32)

    def target(self, batch: Mapping[str, Any]) -> Any:
        return {name: batch[name] for name in ("sample_indices", "sample_counts")}

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        counts = np.asarray(fields["sample_counts"], dtype=np.int64)
        if (counts.sum(axis=1) != self.size).any():
            return f"sample counts that do not add up to {self.size} draws"
        if self.classes is not None and (np.asarray(fields["sample_indices"]).astype(np.int64) >= self.classes).any():
            return f"a sampled class index out of range [0, {self.classes})"
        return None

    def _key(self) -> tuple[Any, ...]:
        return (*super()._key(), self.seed)


class PerView(TargetLayout):
    """V views per row: each of the inner layout's fields gets a view axis after the row axis
    (``logits`` [N, V, C] for full logits, ``topk_values`` [N, V, K] for top-k). The teacher's
    logits come as [B, V, C] (and draw seeds as [B, V]); a training batch has had one view per
    sample selected (``ShardStream``), so its target is the inner layout's."""

    def __init__(self, inner: TargetLayout, views: int) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.inner, self.views = inner, int(views)
        self.name = inner.name  # type: ignore[misc]
        self.fixed_temperature = inner.fixed_temperature  # type: ignore[misc]
        self.randomized = inner.randomized  # type: ignore[misc]

    @property
    def spec(self) -> str:
        return self.inner.spec

    def check(self, num_classes: int) -> None:
        self.inner.check(num_classes)

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {name: ((self.views, *shape), dtype) for name, (shape, dtype) in self.inner.fields(num_classes).items()}

    def _rows(self, fields: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = len(next(iter(fields.values())))
        return {name: np.reshape(values, (batch * self.views, *np.shape(values)[2:])) for name, values in fields.items()}

    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        batch, views, classes = np.shape(logits)
        flat_seeds = None if seeds is None else np.reshape(seeds, batch * views)
        flat = self.inner.encode(np.reshape(logits, (batch * views, classes)), flat_seeds)
        return {name: values.reshape(batch, views, *values.shape[1:]) for name, values in flat.items()}

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        batch, views, classes = logits.shape
        flat_seeds = None if seeds is None else np.reshape(seeds, batch * views)
        flat = self.inner.encode_tensor(logits.reshape(batch * views, classes), flat_seeds)
        return {name: values.reshape(batch, views, *values.shape[1:]) for name, values in flat.items()}

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = len(next(iter(fields.values())))
        decoded = self.inner.decode(self._rows(fields))
        return decoded.reshape(batch, self.views, *decoded.shape[1:])

    def served(self, logits: np.ndarray) -> np.ndarray:
        batch, views, classes = np.shape(logits)
        return self.inner.served(np.reshape(logits, (batch * views, classes))).reshape(batch, views, classes)

    def target(self, batch: Mapping[str, Any]) -> Any:
        return self.inner.target(batch)

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        return self.inner.problem(self._rows(fields))

    def _key(self) -> tuple[Any, ...]:
        return (self.inner, self.views)


LAYOUTS: dict[str, type[TargetLayout]] = {layout.name: layout for layout in (FullLogits, TopK, Sampled)}


def parse_targets(spec: str) -> tuple[str, int | None]:
    """``full``, ``topk:K`` or ``sampled:N`` → (name, number); ValueError naming the forms."""
    name, colon, number = str(spec).strip().partition(":")
    forms = "full, topk:K or sampled:N"
    if name not in LAYOUTS:
        raise ValueError(f"unknown target layout {spec!r}; expected {forms}")
    if name == FullLogits.name:
        if colon:
            raise ValueError(f"target layout {spec!r}: full takes no number")
        return name, None
    try:
        size = int(number)
    except ValueError:
        raise ValueError(f"target layout {spec!r}: {name}:{LAYOUTS[name].parameter} needs an integer {LAYOUTS[name].parameter}") from None  # type: ignore[attr-defined]
    return name, size


def make_layout(spec: str, views: int = 1, num_classes: int | None = None, **params: Any) -> TargetLayout:
    """The layout a cache's metadata names (``logits_layout``: ``full``, ``topk:K`` or
    ``sampled:N``) with its parameters (``dtype``; ``temperature``, the serving one, and
    ``seed``, the draws' salt, for the sparse layouts), per view when a row holds ``views`` > 1
    views. Raises ValueError for a spec this reader does not know or ``num_classes`` it cannot
    hold."""
    name, size = parse_targets(spec)
    layout = (
        LAYOUTS[name](dtype=params.pop("dtype", "float32"), **params)
        if size is None
        else LAYOUTS[name](size, classes=num_classes, **params)
    )  # type: ignore[call-arg]
    if num_classes is not None:
        layout.check(num_classes)
    return PerView(layout, views) if views > 1 else layout
