"""Starting a run from another run's student (``offline-distill --init student.pt``): the file
read as data (``torch.load(weights_only=True)``, never unpickling code), checked to take the
cache's inputs (its input contract) and classes, and the model it holds rebuilt with its weights.
The student's arch is the record's, unless ``--student`` names another (an error); a
``module:factory`` arch read from the file is imported only with ``--trust-code`` (``Origin``).
A specialist starts from a generalist this way (``specialist.py`` makes its dustbin head)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import models
from .cache import CacheMeta, Preprocessing
from .cache.trust import COMMAND_LINE, Origin, describe_error


class InitError(Exception):
    """An --init student.pt that cannot be used, explained in one line."""


def _contract(where: str, record: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return {
            "input_shape": [int(d) for d in record["input_shape"]],
            "input_dtype": np.dtype(record.get("input_dtype") or "float32").name,
            "preprocessing": Preprocessing.from_dict(record.get("preprocessing")).to_dict(),
        }
    except (TypeError, ValueError) as exc:
        raise InitError(f"--init {where}: its input contract cannot be read ({describe_error(exc)})") from None


def _describe_contract(contract: Mapping[str, Any]) -> str:
    return f"{contract['input_shape']} {contract['input_dtype']}, preprocessing {contract['preprocessing']}"


def read_init(path: str, meta: CacheMeta) -> Mapping[str, Any]:
    """The student record at ``path``, read as data and checked to take the cache's inputs and
    to have its C classes."""
    if not Path(path).is_file():
        raise InitError(f"--init {path}: no such file")
    try:
        payload = models.load_data(path)
    except models.UnreadableFile as exc:
        raise InitError(f"--init {path}: {exc}") from None
    if not isinstance(payload, Mapping) or payload.get("format") != models.STUDENT_FORMAT:
        raise InitError(f"--init {path}: not a student.pt written by offline-distill (no format {models.STUDENT_FORMAT!r})")
    try:
        record = models.read_student_record(path, payload)
    except models.ModelSpecError as exc:
        raise InitError(f"--init {exc}") from None
    theirs, ours = _contract(path, record), models.input_contract(meta)
    if theirs != ours:
        raise InitError(
            f"--init {path}: a student from another input contract: it takes {_describe_contract(theirs)}; "
            f"the cache holds {_describe_contract(ours)}"
        )
    classes = record["num_classes"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes != meta.num_classes:
        specialist = " (a specialist's; --init takes a generalist's)" if record.get("specialist") else ""
        raise InitError(f"--init {path}: a student of {classes!r} classes{specialist}, but the cache has {meta.num_classes}")
    return record


def settle_arch(student: str | None, record: Mapping[str, Any] | None, path: str | None, trust_code: bool) -> tuple[str, Origin]:
    """The student's arch and where it is trusted from: ``--student`` (default mlp), or, with
    ``--init``, the record's arch, which ``--student`` may only repeat."""
    if record is None:
        return student or "mlp", COMMAND_LINE
    arch = str(record["arch"])
    if student is not None and student != arch:
        raise InitError(f"--init {path} holds a {arch!r} student, but --student says {student!r}; leave --student out to train its arch")
    return arch, COMMAND_LINE if student is not None else Origin(path, trust_code)


def load_generalist(where: str, record: Mapping[str, Any], arch: str, origin: Origin, meta: CacheMeta) -> nn.Module:
    """The record's model, built as ``arch`` for the cache's inputs and classes, with its weights."""
    try:
        model = models.build(arch, meta.input_shape, meta.num_classes, origin)
    except models.ModelSpecError as exc:
        raise InitError(f"--init {where}: {exc}") from None
    state = record["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InitError(f"--init {where}: its state_dict is not parameter names to tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InitError(f"--init {where}: its weights do not fit {arch} ({describe_error(exc)})") from None
    return model


__all__ = ["InitError", "load_generalist", "read_init", "settle_arch"]
