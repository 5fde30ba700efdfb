"""Target layouts: how the teacher's outputs for a sample are stored, read back and trained on.

A layout owns the datasets that hold the teacher's outputs beside ``ids``, ``inputs`` and
``labels``: their row shapes and dtypes, the encoding of a batch of the teacher's float32 logits
into them, the decoding back into logits (what the service answers for a cache hit), the
training target that the loss takes, and the bytes a row costs. The writer, the reader, the
streaming dataset, the service's batcher and the trainer all ask the cache's layout
(``CacheMeta.layout``) rather than assume full logits, so a compressed layout is one more
implementation registered in ``LAYOUTS``. Numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

LOGITS_DTYPES = ("float32", "float16")


class TargetLayout(ABC):
    """One way of storing the teacher's outputs; instances are immutable and compare by value."""

    name: ClassVar[str]

    @abstractmethod
    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each dataset this layout stores: its row shape and dtype, in column order."""

    @abstractmethod
    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """The teacher's float32 logits [B, C] → the stored fields, B rows each."""

    @abstractmethod
    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """Stored fields → float32 logits [B, C]: what a cache hit is answered with."""

    @abstractmethod
    def target(self, batch: Mapping[str, Any]) -> Any:
        """A training batch's stored fields (torch tensors) → the teacher target the loss takes."""

    @abstractmethod
    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        """What no writer would have stored in these rows (damage), or None."""

    def served(self, logits: np.ndarray) -> np.ndarray:
        """The logits a reader of the cache will see for these, as float32."""
        return self.decode(self.encode(logits))

    def row_bytes(self, num_classes: int) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.fields(num_classes).values())

    def empty(self, num_classes: int) -> dict[str, np.ndarray]:
        return {name: np.empty((0, *shape), dtype=dtype) for name, (shape, dtype) in self.fields(num_classes).items()}


class FullLogits(TargetLayout):
    """``logits`` [N, C]: the teacher's raw logits, before temperature, in float32 or float16."""

    name = "full"

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {dtype!r}")
        self.dtype = np.dtype(dtype)

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"logits": ((num_classes,), self.dtype)}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.asarray(logits).astype(self.dtype, copy=False)}

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(fields["logits"], dtype=np.float32)

    def target(self, batch: Mapping[str, Any]) -> Any:
        return batch["logits"]

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        return None if np.isfinite(fields["logits"]).all() else "non-finite teacher logits"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FullLogits) and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash((self.name, self.dtype.name))

    def __repr__(self) -> str:
        return f"FullLogits({self.dtype.name!r})"


class PerView(TargetLayout):
    """V views per row: each of the inner layout's fields gets a view axis after the row axis
    (``logits`` [N, V, C] for full logits). The teacher's logits come as [B, V, C]; a training
    batch has had one view per sample selected (``ShardStream``), so its target is the inner
    layout's."""

    def __init__(self, inner: TargetLayout, views: int) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.inner, self.views = inner, int(views)
        self.name = inner.name  # type: ignore[misc]

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {name: ((self.views, *shape), dtype) for name, (shape, dtype) in self.inner.fields(num_classes).items()}

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        batch, views, classes = np.shape(logits)
        flat = self.inner.encode(np.reshape(logits, (batch * views, classes)))
        return {name: values.reshape(batch, views, *values.shape[1:]) for name, values in flat.items()}

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        batch = len(next(iter(fields.values())))
        flat = {name: np.reshape(values, (batch * self.views, *np.shape(values)[2:])) for name, values in fields.items()}
        decoded = self.inner.decode(flat)
        return decoded.reshape(batch, self.views, *decoded.shape[1:])

    def target(self, batch: Mapping[str, Any]) -> Any:
        return self.inner.target(batch)

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        return self.inner.problem(fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerView) and (other.inner, other.views) == (self.inner, self.views)

    def __hash__(self) -> int:
        return hash((self.inner, self.views))

    def __repr__(self) -> str:
        return f"PerView({self.inner!r}, {self.views})"


LAYOUTS: dict[str, type[TargetLayout]] = {FullLogits.name: FullLogits}


def make_layout(name: str, views: int = 1, **params: Any) -> TargetLayout:
    """The layout a cache's metadata names (``logits_layout``), with its parameters
    (``dtype`` for ``full``), per view when a row holds ``views`` > 1 views."""
    if name not in LAYOUTS:
        raise ValueError(f"logits layout {name!r} is not supported by this reader (known: {', '.join(LAYOUTS)})")
    layout = LAYOUTS[name](**params)
    return PerView(layout, views) if views > 1 else layout
