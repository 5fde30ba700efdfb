"""The teacher: load a model (or an ensemble) once, and turn input batches into the logits a cache stores.

A teacher is named by one or more ``--teacher SPEC``, each of four kinds:

    FILE.pt2          a ``torch.export`` program. One written by offline-distill (``student.pt2``)
                      carries its input contract in the extra file ``kd_input_spec.json``; any other
                      needs ``input_shape`` (input dtype float32 and identity preprocessing unless given).
    FILE.pt           a ``student.pt`` written by offline-distill: architecture, weights and contract.
    ARCH + weights    a built-in architecture of ``offline.models`` (``mlp-teacher``, ``resnet``, ...)
                      with a ``student.pt`` or a plain state_dict.
    module:factory    a zero-argument callable returning an ``nn.Module``, with a weights file: a
    + weights         plain state_dict, or a dict holding ``state_dict`` and optionally the contract.

Weights files are paired, in order, with the specs that need one (the last two kinds). Options
(``input_shape``, ``input_dtype``, ``normalize``, ``input_scale``) override what a file declares.

What is stored. The cache keeps one logit vector per sample, and offline-distill later turns it
into soft targets ``softmax(v / T)`` at a temperature T of its own choosing.

* One member: its raw logits ``z``.
* Geometric ensemble (the default): the mean of the members' logits, ``v = (1/M) Σ z_i``. Then
  ``softmax(v / T) ∝ Π softmax(z_i / T) ** (1/M)`` for EVERY T: the normalised geometric mean of
  the members' soft targets, at whatever temperature the student is trained. The stored values do
  not depend on the serving temperature, so neither does the fingerprint.
* Arithmetic ensemble: ``v = T_s · log((1/M) Σ softmax(z_i / T_s))`` with T_s the serving
  temperature, computed stably as ``logsumexp_i(log_softmax(z_i / T_s)) - log M``. Then
  ``softmax(v / T_s)`` is exactly the mean of the members' probabilities (Hinton et al.'s ensemble
  average) — but only at T = T_s: at any other T it is that mixture sharpened or flattened, not the
  mixture of the members' distributions at T. A mean of probabilities has no logit vector that
  is right at every temperature, so the serving temperature is part of what is stored: it enters the
  fingerprint and ``CacheMeta.temperature``, and the student should be distilled at T = T_s.

Threading: ``forward`` and ``warmup`` must be called from one thread (the service's worker), which
then owns the model; loading may happen on another. The per-call state (inference mode, autocast)
is entered inside ``forward`` because both are thread-local in torch.

This module imports neither FastAPI nor h5py, nor the training code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..offline import models
from ..offline.cache import CacheMeta, Preprocessing

ENSEMBLE_MODES = ("geometric", "arithmetic")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Written by offline.train (STUDENT_FORMAT, export_program); repeated here because the service does not
# import the training code. tests/test_teacher.py checks that the two agree.
STUDENT_FORMAT = "kd-student"
INPUT_SPEC_FILE = "kd_input_spec.json"
PROBE_BATCH = 2
WARMUP_PASSES = 3
SPEC_FORMS = (
    "a torch.export program (FILE.pt2), a student.pt written by offline-distill (FILE.pt), "
    "a built-in architecture ({archs}) with a weights file, or module:factory (a zero-argument callable "
    "returning an nn.Module) with a weights file"
)


class TeacherError(Exception):
    """A teacher that cannot be loaded or served; one line naming the file or spec and what was expected."""


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
class _Overrides:
    input_shape: tuple[int, ...] | None
    input_dtype: str | None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    input_scale: float | None
    num_classes: int | None

    def contract(self, where: str, declared: Mapping[str, Any]) -> InputContract:
        """The options laid over what the model file declares."""
        shape = self.input_shape or declared.get("input_shape")
        if shape is None:
            raise TeacherError(f"{where}: does not declare its input shape; pass input_shape (the shape of one sample)")
        preprocessing = declared.get("preprocessing") or Preprocessing()
        if self.normalize is not None:
            preprocessing = replace(preprocessing, mean=tuple(self.normalize[0]), std=tuple(self.normalize[1]))
        if self.input_scale is not None:
            preprocessing = replace(preprocessing, scale=float(self.input_scale))
        return _make_contract(where, shape, self.input_dtype or declared.get("input_dtype") or "float32", preprocessing)


@dataclass
class _Member:
    spec: str
    name: str
    module: nn.Module
    fingerprint: str
    contract: InputContract
    declared_classes: int | None  # what the file says, checked against a forward pass
    exported: bool  # a torch.export program: moved to a device with move_to_device_pass, never .eval()'d


# ---------------------------------------------------------------------------------------------
# Small helpers


def _brief(exc: BaseException) -> str:
    """An exception as one short line (torch's messages run over several)."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _names(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _torch_dtype(input_dtype: str) -> torch.dtype:
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
        _torch_dtype(input_dtype)
    except (TypeError, ValueError) as exc:
        raise TeacherError(f"{where}: input dtype {dtype!r} is not a numeric dtype torch supports ({_brief(exc)})") from None
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
    """input_shape / input_dtype / preprocessing / num_classes as a model file records them."""
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
        raise TeacherError(f"{where}: bad input contract ({_brief(exc)})") from None
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


# ---------------------------------------------------------------------------------------------
# Loading one member


def _torch_load(path: str, role: str) -> Any:
    if not Path(path).is_file():
        raise TeacherError(f"{path}: no such file ({role})")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise TeacherError(
            f"{path}: holds Python objects that torch.load(weights_only=True) refuses (a pickled nn.Module?); "
            f"save model.state_dict() instead ({_brief(exc)[:160]})"
        ) from None
    except Exception as exc:
        raise TeacherError(f"{path}: not readable by torch.load ({_brief(exc)})") from None


def _state_dict_of(where: str, payload: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A plain state_dict, or a dict holding one under ``state_dict`` beside an optional contract."""
    declared: dict[str, Any] = {}
    state = payload
    if isinstance(payload, Mapping) and "state_dict" in payload:
        state = payload["state_dict"]
        declared = _declared_contract(where, payload)
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise TeacherError(
            f"{where}: expected a state_dict (parameter names to tensors) or a dict with 'state_dict', got {type(payload).__name__}"
        )
    return dict(state), declared


def _load_weights(where: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load, with what does not fit said on one line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    for key in expected:
        if key in state and state[key].shape != expected[key].shape:
            problems.append(f"{key!r} is {list(state[key].shape)}, the model has {list(expected[key].shape)}")
            break
    if problems:
        raise TeacherError(f"{where}: weights do not fit the model: {'; '.join(problems)}")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise TeacherError(f"{where}: weights do not fit the model ({_brief(exc)})") from None


def _load_exported(spec: str, options: _Overrides) -> _Member:
    if not Path(spec).is_file():
        raise TeacherError(f"{spec}: no such file (torch.export program)")
    extra_files = {INPUT_SPEC_FILE: ""}
    try:
        program = torch.export.load(spec, extra_files=extra_files)
    except Exception as exc:
        raise TeacherError(f"{spec}: not a torch.export program ({_brief(exc)})") from None
    declared: dict[str, Any] = {}
    if extra_files.get(INPUT_SPEC_FILE):
        try:
            raw = json.loads(extra_files[INPUT_SPEC_FILE])
        except ValueError as exc:
            raise TeacherError(f"{spec}: {INPUT_SPEC_FILE} is not JSON ({_brief(exc)})") from None
        if not isinstance(raw, dict):
            raise TeacherError(f"{spec}: {INPUT_SPEC_FILE} is not a JSON object")
        declared = _declared_contract(f"{spec}: {INPUT_SPEC_FILE}", raw)
    contract = options.contract(spec, declared)
    # Parameters, buffers and lifted constants under their module names: the same names, hence the
    # same fingerprint, as the state_dict of the nn.Module that was exported.
    tensors = {k: v for k, v in {**program.state_dict, **program.constants}.items() if isinstance(v, torch.Tensor)}
    return _Member(spec, spec, program, models.weights_fingerprint(tensors), contract, declared.get("num_classes"), exported=True)  # type: ignore[arg-type]


def _load_student(spec: str, options: _Overrides) -> _Member:
    return _from_student_record(spec, _torch_load(spec, "student.pt"), options, arch=None)


def _from_student_record(where: str, record: Any, options: _Overrides, arch: str | None) -> _Member:
    if not isinstance(record, Mapping) or record.get("format") != STUDENT_FORMAT:
        raise TeacherError(
            f"{where}: not a student.pt written by offline-distill (no format {STUDENT_FORMAT!r}); "
            "to serve a plain state_dict give ARCH or module:factory as the teacher and this file as its weights"
        )
    for key in ("arch", "state_dict", "num_classes", "input_shape"):
        if key not in record:
            raise TeacherError(f"{where}: a {STUDENT_FORMAT} record without {key!r}")
    if arch is not None and record["arch"] != arch:
        raise TeacherError(f"{where}: holds a {record['arch']!r} model, but the teacher spec says {arch!r}")
    state, declared = _state_dict_of(where, record)
    contract = options.contract(where, declared)
    num_classes = declared["num_classes"]
    module = _build(where, str(record["arch"]), contract.input_shape, num_classes)
    _load_weights(where, module, state)
    return _Member(
        where, str(record["arch"]), module, models.weights_fingerprint(module.state_dict()), contract, num_classes, exported=False
    )


def _build(where: str, arch: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    try:
        return models.build(arch, input_shape, num_classes)
    except models.ModelSpecError as exc:
        raise TeacherError(f"{where}: {exc}") from None


def _load_arch(arch: str, weights: str, options: _Overrides) -> _Member:
    where = f"{arch} with {weights}"
    payload = _torch_load(weights, f"weights for {arch}")
    if isinstance(payload, Mapping) and "format" in payload:
        return _from_student_record(weights, payload, options, arch=arch)
    state, declared = _state_dict_of(weights, payload)
    contract = options.contract(where, declared)
    num_classes = options.num_classes or declared.get("num_classes")
    if num_classes is not None:
        module = _build(where, arch, contract.input_shape, num_classes)
        _load_weights(where, module, state)
    else:
        # The class count is the length of the classifier's bias, the last 1-D tensor in the usual
        # definition order; the strict load confirms the guess.
        last = next((k for k in reversed(state) if state[k].dim() == 1), None)
        if last is None:
            raise TeacherError(f"{where}: cannot tell the class count (no 1-D tensor in the state_dict); pass num_classes")
        guess = int(state[last].numel())
        module = _build(where, arch, contract.input_shape, guess)
        try:
            _load_weights(where, module, state)
        except TeacherError as exc:
            raise TeacherError(f"{exc}; guessed {guess} classes from {last!r}; pass num_classes") from None
        num_classes = guess
    return _Member(arch, arch, module, models.weights_fingerprint(module.state_dict()), contract, num_classes, exported=False)


def _load_factory(spec: str, weights: str, options: _Overrides) -> _Member:
    module_name, _, attr = spec.partition(":")
    try:
        factory: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise TeacherError(f"{spec}: cannot import {module_name} ({_brief(exc)})") from None
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise TeacherError(f"{spec}: {module_name} has no callable {attr!r}")
    try:
        module = factory()
    except Exception as exc:
        raise TeacherError(
            f"{spec}: calling {attr}() failed; expected a zero-argument callable returning an nn.Module ({_brief(exc)})"
        ) from None
    if not isinstance(module, nn.Module):
        raise TeacherError(f"{spec}: {attr}() returned {type(module).__name__}, expected torch.nn.Module")
    state, declared = _state_dict_of(weights, _torch_load(weights, f"weights for {spec}"))
    where = f"{spec} with {weights}"
    _load_weights(where, module, state)
    contract = options.contract(where, declared)
    return _Member(
        spec, spec, module, models.weights_fingerprint(module.state_dict()), contract, declared.get("num_classes"), exported=False
    )


def _kind(spec: str) -> str:
    if spec.endswith(".pt2"):
        return "exported"
    if spec.endswith(".pt"):
        return "student"
    if spec in models.REGISTRY:
        return "arch"
    module_name, sep, attr = spec.partition(":")
    if sep and module_name and attr and all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        return "factory"
    raise TeacherError(f"{spec}: not a teacher spec; give {SPEC_FORMS.format(archs=', '.join(sorted(models.REGISTRY)))}")


# ---------------------------------------------------------------------------------------------
# The teacher


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise TeacherError(f"device {device!r}: not a torch device ({_brief(exc)})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherError(f"device {device!r}: CUDA is not available (torch {torch.__version__}); use device 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TeacherError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except Exception as exc:
            raise TeacherError(f"device {device!r}: not usable ({_brief(exc)})") from None
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise TeacherError(f"dtype {dtype!r}: expected auto, {', '.join(COMPUTE_DTYPES)}")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TeacherError(f"dtype bfloat16: not supported by {torch.cuda.get_device_name(device)}; use float16")
    return COMPUTE_DTYPES[dtype]


def ensemble_fingerprint(mode: str, member_fingerprints: Sequence[str], temperature: float) -> str:
    """Order-independent; the arithmetic kind's stored values depend on the serving temperature, so it is included."""
    digest = hashlib.sha256(f"ensemble-{mode}".encode())
    if mode == "arithmetic":
        digest.update(f"temperature={float(temperature)!r}".encode())
    for fingerprint in sorted(member_fingerprints):
        digest.update(fingerprint.encode())
    return digest.hexdigest()


class Teacher:
    """One loaded teacher or ensemble on one device. Build it with ``load_teacher``."""

    def __init__(
        self, members: Sequence[_Member], *, ensemble: str, temperature: float, device: torch.device, compute_dtype: torch.dtype
    ) -> None:
        self._members = list(members)
        first = self._members[0]
        self.members = len(self._members)
        self.ensemble: str | None = ensemble if self.members > 1 else None
        self.serving_temperature = float(temperature)
        self.device = device
        self.compute_dtype = compute_dtype
        self.contract = first.contract
        self._input_dtype = _torch_dtype(self.contract.input_dtype)
        if self.ensemble is None:
            self.name, self.fingerprint = first.name, first.fingerprint
        else:
            self.name = f"ensemble-{ensemble}({','.join(m.name for m in self._members)})"
            self.fingerprint = ensemble_fingerprint(ensemble, [m.fingerprint for m in self._members], temperature)
        self.num_classes = 0
        self.num_classes = self._probe()

    # -- the forward pass -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        if self.device.type == "cuda":
            # Page-locked staging lets the host-to-device copy run asynchronously; the caching host
            # allocator keeps the buffer alive until the copy is done.
            staging = torch.empty(inputs.shape, dtype=self._input_dtype, pin_memory=True)
            np.copyto(staging.numpy(), inputs, casting="no")
            return staging.to(self.device, non_blocking=True)
        if not inputs.flags.writeable or not inputs.flags.c_contiguous:
            # from_numpy warns on read-only arrays (np.frombuffer over request bytes) and refuses
            # negative strides; one copy avoids both.
            inputs = np.array(inputs, order="C")
        return torch.from_numpy(inputs)

    def _member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        with self._autocast():
            for member in self._members:
                outputs.append(member.module(x))
        return outputs

    def _combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            return logits[0].float()
        stacked = torch.stack([z.float() for z in logits])  # [M, B, C], float32 whatever the autocast dtype
        if self.ensemble == "geometric":
            return stacked.mean(dim=0)
        t = self.serving_temperature
        log_probs = torch.log_softmax(stacked / t, dim=-1)
        return t * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """``[B, *input_shape]`` in the contract's dtype → float32 ``[B, C]``, the logits to store."""
        shape, dtype = self.contract.input_shape, self.contract.input_dtype
        if not isinstance(inputs, np.ndarray) or inputs.shape[1:] != shape or inputs.ndim != len(shape) + 1:
            got = list(inputs.shape) if isinstance(inputs, np.ndarray) else type(inputs).__name__
            raise ValueError(f"inputs are {got}, the teacher expects [B, {', '.join(map(str, shape))}]")
        if inputs.dtype != np.dtype(dtype):
            raise ValueError(f"inputs are {inputs.dtype}, the teacher expects {dtype}")
        if len(inputs) == 0:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        with torch.inference_mode():
            x = self.contract.preprocessing.apply(self._to_device(inputs))
            logits = self._member_logits(x)
            for member, z in zip(self._members, logits, strict=True):
                if z.shape != (len(inputs), self.num_classes):
                    raise TeacherError(
                        f"{member.spec}: returned {list(z.shape)} for a batch of {len(inputs)}, expected [{len(inputs)}, {self.num_classes}]"
                    )
            stored = self._combine(logits).cpu()
        return np.ascontiguousarray(stored.numpy(), dtype=np.float32)

    def _probe(self) -> int:
        """One forward of zeros per member: it must run on the contract's shape and return [B, C]."""
        zeros = torch.zeros(PROBE_BATCH, *self.contract.input_shape, dtype=self._input_dtype, device=self.device)
        classes: int | None = None
        with torch.inference_mode():
            x = self.contract.preprocessing.apply(zeros)
            for member in self._members:
                try:
                    with self._autocast():
                        out = member.module(x)
                except Exception as exc:
                    batch = f"[{PROBE_BATCH}, {', '.join(map(str, self.contract.input_shape))}]"
                    hint = " (exported with a fixed batch size? export with a dynamic batch dimension)" if member.exported else ""
                    raise TeacherError(f"{member.spec}: forward pass on inputs {batch} failed{hint} ({_brief(exc)})") from None
                if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != PROBE_BATCH:
                    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise TeacherError(f"{member.spec}: returns {got} for a batch of {PROBE_BATCH}, expected logits [{PROBE_BATCH}, C]")
                produced = int(out.shape[1])
                if member.declared_classes is not None and member.declared_classes != produced:
                    raise TeacherError(f"{member.spec}: declares {member.declared_classes} classes but returns {produced} logits")
                if classes is not None and produced != classes:
                    raise TeacherError(
                        f"{member.spec}: returns {produced} classes, but {self._members[0].spec} returns {classes}; "
                        "all members of an ensemble must predict the same classes"
                    )
                classes = produced
        assert classes is not None
        return classes

    def warmup(self, batch_size: int) -> None:
        """A few forwards of zeros at the serving batch size, so that the first request does not pay
        for CUDA context set-up, kernel selection and the caching allocator's first growth."""
        zeros = np.zeros((max(1, batch_size), *self.contract.input_shape), dtype=self.contract.input_dtype)
        for _ in range(WARMUP_PASSES):
            self.forward(zeros)

    # -- metadata ---------------------------------------------------------------------------
    def cache_meta(self, logits_dtype: str = "float32") -> CacheMeta:
        return CacheMeta(
            teacher_fingerprint=self.fingerprint, teacher_name=self.name, num_classes=self.num_classes,
            input_shape=self.contract.input_shape, input_dtype=self.contract.input_dtype,
            preprocessing=self.contract.preprocessing, temperature=self.serving_temperature, logits_dtype=logits_dtype,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "members": self.members,
            "member_details": [{"spec": m.spec, "name": m.name, "fingerprint": m.fingerprint} for m in self._members],
            "ensemble": self.ensemble,
            "device": str(self.device),
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "contract": self.contract.to_dict(),
            "temperature": self.serving_temperature,
        }

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, {self.fingerprint[:12]}, {self.num_classes} classes, {self.device}, {self.compute_dtype})"


def load_teacher(
    specs: Sequence[str], *, weights: Sequence[str] = (), ensemble: str = "geometric", temperature: float = 1.0,
    device: str = "auto", dtype: str = "auto", input_shape: Sequence[int] | None = None, input_dtype: str | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None, input_scale: float | None = None,
    num_classes: int | None = None,
) -> Teacher:  # fmt: skip
    """Load every member on the CPU, move it to ``device``, check it with one forward pass, and check
    that the members agree on the input contract and the classes."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise TeacherError(f"no teacher given; give {SPEC_FORMS.format(archs=', '.join(sorted(models.REGISTRY)))}")
    if ensemble not in ENSEMBLE_MODES:
        raise TeacherError(f"ensemble {ensemble!r}: expected one of {', '.join(ENSEMBLE_MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise TeacherError(f"temperature {temperature!r}: expected a number > 0")
    if num_classes is not None and num_classes < 1:
        raise TeacherError(f"num_classes {num_classes!r}: expected >= 1")
    resolved_device = _resolve_device(device)
    compute_dtype = _resolve_dtype(dtype, resolved_device)
    options = _Overrides(
        input_shape=tuple(int(d) for d in input_shape) if input_shape is not None else None, input_dtype=input_dtype,
        normalize=(tuple(normalize[0]), tuple(normalize[1])) if normalize is not None else None, input_scale=input_scale,
        num_classes=num_classes,
    )  # fmt: skip

    kinds = [_kind(spec) for spec in specs]
    needing = [spec for spec, kind in zip(specs, kinds, strict=True) if kind in ("arch", "factory")]
    if len(weights) < len(needing):
        raise TeacherError(f"{needing[len(weights)]}: needs a weights file; {len(needing)} teacher(s) need one, {len(weights)} given")
    if len(weights) > len(needing):
        raise TeacherError(
            f"{weights[len(needing)]}: {len(weights)} weights files given but only {len(needing)} teacher(s) take one ({', '.join(needing) or 'none'})"
        )
    pending_weights = iter(weights)

    members = []
    for spec, kind in zip(specs, kinds, strict=True):
        if kind == "exported":
            member = _load_exported(spec, options)
        elif kind == "student":
            member = _load_student(spec, options)
        elif kind == "arch":
            member = _load_arch(spec, next(pending_weights), options)
        else:
            member = _load_factory(spec, next(pending_weights), options)
        if options.num_classes is not None:
            if member.declared_classes not in (None, options.num_classes):
                raise TeacherError(f"{member.spec}: declares {member.declared_classes} classes, but num_classes is {options.num_classes}")
            member.declared_classes = options.num_classes
        if members and member.contract != members[0].contract:
            first = members[0]
            field = next(
                f for f in ("input_shape", "input_dtype", "preprocessing") if getattr(member.contract, f) != getattr(first.contract, f)
            )
            raise TeacherError(
                f"{member.spec}: {field} is {getattr(member.contract, field)!r}, but {first.spec} has {getattr(first.contract, field)!r}; "
                "all members of an ensemble must take the same inputs"
            )
        members.append(_to_device(member, resolved_device))
    return Teacher(members, ensemble=ensemble, temperature=temperature, device=resolved_device, compute_dtype=compute_dtype)


def _to_device(member: _Member, device: torch.device) -> _Member:
    try:
        if member.exported:
            program: Any = member.module
            if device.type != "cpu":
                program = torch.export.passes.move_to_device_pass(program, device)
            module = program.module()  # an exported module refuses .eval(); it was traced in the mode it runs in
        else:
            module = member.module.to(device).eval()
    except Exception as exc:
        raise TeacherError(f"{member.spec}: cannot be moved to {device} ({_brief(exc)})") from None
    return replace(member, module=module)


__all__ = ["InputContract", "Teacher", "TeacherError", "ensemble_fingerprint", "load_teacher", "parse_normalize"]
