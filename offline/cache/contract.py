"""The cache's contract: what a cache holds and how to feed a student what the teacher saw.

``CacheMeta`` is what every shard of one cache shares (teacher, classes, input contract,
serving temperature, target layout); ``Preprocessing`` is the transform the teacher applied to
the stored inputs. Numpy only: no h5py, and torch only inside ``Preprocessing.apply``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .layout import TargetLayout, make_layout, parse_targets
from .rng import draw_seeds
from .tokens import PerToken

# 2: token caches (task "lm"), whose rows an older reader would misread as samples.
SCHEMA_VERSION = 2
# What a row is: one sample of a classifier (``classify``), or one token sequence of a causal
# language model (``lm``: inputs [L] token ids, targets per token, ``tokens.PerToken``).
TASKS = ("classify", "lm")
FORMAT_NAME = "kd-cache"
# How a cache's soft targets depend on the distillation temperature T: "any" when
# softmax(stored / T) is the teacher's soft target at every T (one teacher, or the geometric
# ensemble), "serving" when it is exact only at the serving temperature (the arithmetic ensemble,
# a generalist with specialists).
TEMPERATURE_RULES = ("any", "serving")
TARGET_CHUNK_BYTES = 1 << 20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 16384


class CacheError(Exception):
    """A cache directory or shard that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """``x = (x.astype(float32) * scale - mean) / std``, with mean/std per channel (axis 0 of a
    sample) or scalars. The default is the identity."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> Preprocessing:
        raw = raw or {}
        unknown = set(raw) - {"scale", "mean", "std"}
        if unknown:
            raise ValueError(f"preprocessing has unknown keys {sorted(unknown)}")
        mean = tuple(float(v) for v in np.atleast_1d(raw.get("mean", 0.0)))
        std = tuple(float(v) for v in np.atleast_1d(raw.get("std", 1.0)))
        if any(s == 0 for s in std):
            raise ValueError("preprocessing std must not contain 0")
        return cls(scale=float(raw.get("scale", 1.0)), mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    def apply(self, inputs: Any) -> Any:
        """Preprocess a torch tensor batch [B, *shape] on its own device; returns float32."""
        import torch

        x = inputs.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean != (0.0,) or self.std != (1.0,):
            view = (1, -1) + (1,) * (x.dim() - 2) if len(self.mean) > 1 or len(self.std) > 1 else ()
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
            if view:
                mean, std = mean.view(view), std.view(view)
            x = (x - mean) / std
        return x


@dataclass(frozen=True)
class CacheMeta:
    """What every shard of one cache shares. Two caches can be trained on together only if
    their ``num_classes`` and inputs agree (and, unless allowed, their teacher).

    ``serving_temperature`` is stored under the attribute name ``temperature``."""

    teacher_fingerprint: str
    teacher_name: str
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    serving_temperature: float = 1.0
    temperature_rule: str = "any"
    logits_dtype: str = "float32"
    logits_layout: str = "full"
    views_per_id: int = 1
    # The augmentation policy the views were made with, as ``views.AugmentPolicy.describe()``
    # records it ({"name", "params", "version"}), and the salt of the view seeds; None and 0 for
    # a cache of plain samples.
    augment: dict[str, Any] | None = field(default=None, hash=False)
    view_salt: int = 0
    # The salt of a sampled layout's draws (``rng.draw_seeds``); recorded only for such a cache.
    target_seed: int = 0
    task: str = "classify"
    # A language model's tokenizer (sha256 of its files), which the token ids mean something in.
    tokenizer_fingerprint: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "input_dtype", np.dtype(self.input_dtype).name)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.views_per_id < 1:
            raise ValueError(f"views_per_id must be >= 1, got {self.views_per_id}")
        if self.augment is not None:
            augment = dict(self.augment)
            if set(augment) != {"name", "params", "version"} or not isinstance(augment["params"], dict):
                raise ValueError(f"augment must be a policy record {{name, params, version}}, got {self.augment!r}")
            object.__setattr__(self, "augment", augment)
        if not 0 <= int(self.view_salt) < 1 << 64:
            raise ValueError(f"view_salt must be in [0, 2**64), got {self.view_salt}")
        if not 0 <= int(self.target_seed) < 1 << 64:
            raise ValueError(f"target_seed must be in [0, 2**64), got {self.target_seed}")
        if not self.serving_temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.serving_temperature}")
        layout = make_layout(
            self.logits_layout,
            views=self.views_per_id,
            num_classes=self.num_classes,
            dtype=self.logits_dtype,
            temperature=self.serving_temperature,
            seed=self.target_seed,
        )
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "lm":
            if len(self.input_shape) != 1 or np.dtype(self.input_dtype).kind not in "iu" or self.has_views:
                raise ValueError(
                    f"a token cache holds [L] integer token ids per row and no views, got {list(self.input_shape)} {self.input_dtype}"
                )
            layout = PerToken(layout, self.input_shape[0])
            layout.check(self.num_classes)
        object.__setattr__(self, "logits_layout", layout.spec)
        object.__setattr__(self, "layout", layout)
        if self.temperature_rule not in TEMPERATURE_RULES:
            raise ValueError(f"temperature_rule must be one of {TEMPERATURE_RULES}, got {self.temperature_rule!r}")

    # Set in __post_init__ from logits_layout and logits_dtype; not a field of its own.
    layout: TargetLayout = field(init=False, repr=False, compare=False)

    @property
    def has_views(self) -> bool:
        """Whether rows hold augmented views (with their seeds) rather than plain samples."""
        return self.views_per_id > 1 or self.augment is not None

    @property
    def augment_text(self) -> str:
        """The views' policy in a few words, ``random-crop (padding=1)`` (``none`` without one);
        raw from the manifest: escape it before printing."""
        policy = self.augment or {"name": "none", "params": {}}
        params = ", ".join(f"{key}={value}" for key, value in policy["params"].items())
        return f"{policy['name']}{f' ({params})' if params else ''}"

    @property
    def target_layout(self) -> TargetLayout:
        """The layout of one view's targets: what a training batch holds once a view is chosen."""
        return getattr(self.layout, "inner", self.layout)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["layout"]
        if not self.has_views:  # a cache of plain samples records what it always did
            del out["augment"], out["view_salt"]
        if not self.layout.randomized:
            del out["target_seed"]
        if self.task == "classify":  # a classifier's cache records what it always did
            del out["task"]
        if self.tokenizer_fingerprint is None:
            del out["tokenizer_fingerprint"]
        out["temperature"] = out.pop("serving_temperature")
        out["input_shape"] = list(self.input_shape)
        out["preprocessing"] = self.preprocessing.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> CacheMeta:
        try:
            version = int(raw.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise CacheError(
                    f"{where}: schema version {version} is newer than this reader supports ({SCHEMA_VERSION}); upgrade the package"
                )
            layout = str(raw.get("logits_layout", "full"))
            try:
                parse_targets(layout)
            except ValueError:
                raise CacheError(f"{where}: logits layout {layout!r} is not supported by this reader") from None
            teacher_name = str(raw["teacher_name"])
            # Caches written before the rule was recorded: only the arithmetic ensemble has the
            # "serving" rule, and its name says so.
            legacy_rule = "serving" if teacher_name.startswith("ensemble-arithmetic") else "any"
            return cls(
                teacher_fingerprint=str(raw["teacher_fingerprint"]),
                teacher_name=teacher_name,
                num_classes=int(raw["num_classes"]),
                input_shape=tuple(raw["input_shape"]),
                input_dtype=str(raw["input_dtype"]),
                preprocessing=Preprocessing.from_dict(raw.get("preprocessing")),
                serving_temperature=float(raw.get("temperature", 1.0)),
                temperature_rule=str(raw.get("temperature_rule", legacy_rule)),
                logits_dtype=str(raw.get("logits_dtype", "float32")),
                logits_layout=layout,
                views_per_id=int(raw.get("views_per_id", 1)),
                augment=raw.get("augment"),
                view_salt=int(raw.get("view_salt", 0)),
                target_seed=int(raw.get("target_seed", 0)),
                task=str(raw.get("task", "classify")),
                tokenizer_fingerprint=None if raw.get("tokenizer_fingerprint") is None else str(raw["tokenizer_fingerprint"]),
                schema_version=version,
            )
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{where}: bad cache metadata ({type(exc).__name__}: {exc})") from None

    def mismatch(self, other: CacheMeta, fields: Sequence[str]) -> str | None:
        """The first of ``fields`` that differs, described, or None."""
        for name in fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {theirs!r}, expected {mine!r}"
        return None

    def draw_seeds(self, ids: Sequence[str]) -> np.ndarray | None:
        """The draw seeds of a randomized layout for ``ids`` ([B], [B, V] with views); None for another layout."""
        if not self.layout.randomized:
            return None
        seeds = draw_seeds(self.target_seed, ids, self.views_per_id)
        return seeds if self.views_per_id > 1 else seeds[:, 0]

    def input_row_bytes(self) -> int:
        return int(np.prod(self.input_shape, dtype=np.int64)) * np.dtype(self.input_dtype).itemsize

    def row_bytes(self) -> int:
        """Bytes of one stored sample, without its id."""
        seeds = 8 * self.views_per_id if self.has_views else 0
        return self.input_row_bytes() + 8 + seeds + self.layout.row_bytes(self.num_classes)

    def teacher_output_shape(self) -> tuple[int, ...]:
        """One sample's teacher logits as the writer takes them: [V, C] with views, [L, C] for a
        token sequence, else [C]."""
        if self.task == "lm":
            return (self.input_shape[0], self.num_classes)
        return (self.views_per_id, self.num_classes) if self.views_per_id > 1 else (self.num_classes,)

    def chunk_rows(self) -> int:
        return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, TARGET_CHUNK_BYTES // max(1, self.input_row_bytes()))))

    def columns(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every dataset of a shard, in the one column order used everywhere: ids, inputs, labels,
        the view seeds of a cache with views, then the layout's fields. Row shape and dtype of
        each (ids: variable-length strings)."""
        views = {"view_seeds": ((self.views_per_id,), np.dtype(np.int64))} if self.has_views else {}
        return {
            "ids": ((), np.dtype(object)),
            "inputs": (self.input_shape, np.dtype(self.input_dtype)),
            "labels": ((), np.dtype(np.int64)),
            **views,
            **self.layout.fields(self.num_classes),
        }


# The fields that must agree between a cache's manifest and each of its shards, and between a
# writer and the cache it appends to; one definition for the reader, the writer and open_caches.
SHARD_FIELDS = (
    "teacher_fingerprint", "num_classes", "input_shape", "input_dtype", "logits_dtype", "logits_layout",
    "views_per_id", "augment", "view_salt", "layout", "task", "tokenizer_fingerprint",
)  # fmt: skip
WRITER_FIELDS = SHARD_FIELDS + ("preprocessing",)
# Samples of caches that differ in these cannot share a batch, each for its own reason (open_caches
# names only those that apply). Full logits of either dtype mix (the batch widens); sparse layouts mix
# only with their own spec.
MIX_REASONS = {
    "num_classes": "soft targets over different class counts cannot share a batch",
    "input_shape": "inputs of different shapes cannot share a batch",
    "input_dtype": "inputs of different dtypes cannot share a batch",
    "views_per_id": "a batch replays one of each sample's views, so the caches must hold as many per sample",
    "augment": "a batch's views are replayed with one augmentation policy",
    "task": "token sequences and samples cannot share a batch",
    "logits_layout": "each target layout has its own soft term; cache-convert re-encodes a cache of full logits into another layout",
}
