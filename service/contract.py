"""A teacher's input contract: what clients send (the shape and dtype of one sample) and what
the teacher does to it on the device (``Preprocessing``), as a model file declares it and as
the loading options (``Overrides``: ``input_shape``, ``input_dtype``, ``normalize``,
``input_scale``, ``num_classes``) override it. ``TeacherError`` is the one-line error of
everything that loads a teacher (``loading``, ``teacher``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..offline.cache import Preprocessing
from ..offline.models import describe_error


class TeacherError(Exception):
    """A teacher that cannot be loaded or served; one line naming the file or spec and what was expected.

    ``setting``: the ``load_teacher`` keyword (``input_shape``) that the message ends by asking
    for, so that a front end can name its own spelling of it instead (``spelled``)."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting

    def spelled(self, name: Callable[[str], str]) -> str:
        """The message, its closing setting named by ``name`` (teacher-serve: ``--input-shape``)."""
        message = str(self)
        if self.setting is None or not message.endswith(self.setting):
            return message
        return message[: -len(self.setting)] + name(self.setting)


@dataclass(frozen=True)
class InputContract:
    """What a client sends (``input_shape`` per sample, ``input_dtype``) and what the teacher does to
    it on the device before the forward pass (``preprocessing``)."""

    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: Preprocessing

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "input_dtype": self.input_dtype, "preprocessing": self.preprocessing.to_dict()}


@dataclass(frozen=True)
class Overrides:
    """The loading options, laid over what each model file declares."""

    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    input_scale: float | None = None
    num_classes: int | None = None

    def contract(self, where: str, declared: Mapping[str, Any], unknown_shape: str = "does not declare its input shape") -> InputContract:
        """The contract of a file that declares ``declared``; ``unknown_shape`` says why the file
        does not tell the sample shape, for the error that asks for ``input_shape``."""
        shape = self.input_shape or declared.get("input_shape")
        if shape is None:
            raise TeacherError(f"{where}: {unknown_shape}; give the shape of one sample as input_shape", setting="input_shape")
        preprocessing = declared.get("preprocessing") or Preprocessing()
        if self.normalize is not None:
            preprocessing = replace(preprocessing, mean=tuple(self.normalize[0]), std=tuple(self.normalize[1]))
        if self.input_scale is not None:
            preprocessing = replace(preprocessing, scale=float(self.input_scale))
        return _make_contract(where, shape, self.input_dtype or declared.get("input_dtype") or "float32", preprocessing)


def torch_dtype(input_dtype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=input_dtype)).dtype


def _make_contract(where: str, shape: Sequence[int], dtype: Any, preprocessing: Preprocessing) -> InputContract:
    try:
        input_shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TeacherError(f"{where}: input shape {shape!r} is not a list of integers") from None
    if not input_shape or any(d < 1 for d in input_shape):
        raise TeacherError(f"{where}: input shape {list(input_shape)} must have at least one dimension, all >= 1")
    try:
        input_dtype = np.dtype(dtype).name
        if np.dtype(dtype).kind not in "uifb":
            raise TypeError(f"{input_dtype} is not numeric")
        torch_dtype(input_dtype)
    except (TypeError, ValueError) as exc:
        raise TeacherError(f"{where}: input dtype {dtype!r} is not a numeric dtype torch supports ({describe_error(exc)})") from None
    for label, values in (("mean", preprocessing.mean), ("std", preprocessing.std)):
        if len(values) not in (1, input_shape[0]):
            raise TeacherError(
                f"{where}: preprocessing {label} has {len(values)} values; expected 1 or one per channel "
                f"({input_shape[0]}, axis 0 of the sample shape {list(input_shape)})"
            )
    if any(s == 0 for s in preprocessing.std):
        raise TeacherError(f"{where}: preprocessing std must not contain 0")
    return InputContract(input_shape, input_dtype, preprocessing)


def _declared_contract(where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """input_shape / input_dtype / preprocessing / num_classes as a model file records them
    (``offline.models.input_contract`` writes them)."""
    declared: dict[str, Any] = {}
    try:
        if raw.get("input_shape") is not None:
            declared["input_shape"] = tuple(int(d) for d in raw["input_shape"])
        if raw.get("input_dtype") is not None:
            declared["input_dtype"] = np.dtype(str(raw["input_dtype"])).name
        if raw.get("preprocessing") is not None:
            declared["preprocessing"] = Preprocessing.from_dict(dict(raw["preprocessing"]))
        if raw.get("num_classes") is not None:
            declared["num_classes"] = int(raw["num_classes"])
    except (TypeError, ValueError) as exc:
        raise TeacherError(f"{where}: bad input contract ({describe_error(exc)})") from None
    return declared


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"MEAN,STD"``: two scalars, or per-channel values joined by ``/``
    (``"0.485/0.456/0.406,0.229/0.224/0.225"``)."""
    form = "expected MEAN,STD: two numbers, or per-channel numbers joined by '/' as in 0.485/0.456/0.406,0.229/0.224/0.225"
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"normalize {text!r}: {form}")
    try:
        mean, std = (tuple(float(v) for v in part.split("/")) for part in parts)
    except ValueError:
        raise ValueError(f"normalize {text!r}: {form}") from None
    if not all(math.isfinite(v) for v in mean + std):
        raise ValueError(f"normalize {text!r}: values must be finite")
    if any(s == 0 for s in std):
        raise ValueError(f"normalize {text!r}: std must not contain 0")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(f"normalize {text!r}: {len(mean)} means but {len(std)} stds; give as many of each, or one")
    return mean, std
