"""The teacher at run time: its members on one device, their forward pass, and what it tells the
cache (``cache_meta``) and the clients (``describe``). Build it with ``load_teacher``.

``load_teacher`` loads every member on the CPU (``service.loading``: the four spec kinds, the
weights and the input contract), moves it to the device, and picks the ``Combiner``
(``service.ensemble``) that turns the members' logits into the stored ones. ``Teacher.forward``
then takes a batch in the contract's dtype, preprocesses it on the device, runs every member
(under autocast when the compute dtype is not float32) and combines.

Threading: ``forward`` and ``warmup`` must be called from one thread (the service's worker), which
then owns the model; loading may happen on another. The per-call state (inference mode, autocast)
is entered inside ``forward`` because both are thread-local in torch.

This module imports neither FastAPI nor h5py, nor the training code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..offline.cache import CacheMeta, TargetLayout
from ..offline.models import describe_error
from . import lm
from .contract import Overrides, TeacherError, torch_dtype
from .ensemble import DEFAULT_TOP_N, ENSEMBLE_MODES, Combiner, CombinerError, combiner_for
from .loading import Member, load_members, spec_forms

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_BATCH = 2
WARMUP_PASSES = 3


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise TeacherError(f"device {device!r}: not a torch device ({describe_error(exc)})") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TeacherError(f"device {device!r}: CUDA is not available (torch {torch.__version__}); use device 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TeacherError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except Exception as exc:
            raise TeacherError(f"device {device!r}: not usable ({describe_error(exc)})") from None
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


class Teacher:
    """One loaded teacher or ensemble on one device."""

    def __init__(
        self, members: Sequence[Member], combiner: Combiner, *, serving_temperature: float, device: torch.device, compute_dtype: torch.dtype
    ) -> None:
        self.members = tuple(members)
        self.combiner = combiner
        self.serving_temperature = float(serving_temperature)
        self.device = device
        self.compute_dtype = compute_dtype
        self.contract = self.members[0].contract
        self._input_dtype = torch_dtype(self.contract.input_dtype)
        # A causal language model (hf:DIR, or int64 token ids in and [B, L, V] out): one row per
        # token sequence, with targets per token.
        self.task = "lm" if self.members[0].tokenizer is not None or self.contract.input_dtype == lm.TOKEN_DTYPE else "classify"
        self.tokenizer = self.members[0].tokenizer
        self.name = combiner.name([m.name for m in self.members])
        self.fingerprint = combiner.fingerprint([m.fingerprint for m in self.members])
        self.num_classes = self._probe()
        # Augmented views (teacher-serve --views V --augment POLICY): each sample is seen as V
        # views, made on the device from one seed per view (kdcache.offline.cache.views).
        self.views = 1
        self.augment: Any = None
        self.view_salt = 0

    def serve_views(self, views: int, augment: Any, view_salt: int = 0) -> None:
        """Answer and store V views per sample, made by ``augment`` (an ``AugmentPolicy``) from the
        seeds ``forward`` is given; ``augment`` None and ``views`` 1 serve the samples as they are."""
        if views < 1:
            raise TeacherError(f"views must be at least 1, got {views}")
        if views > 1 and augment is None:
            raise TeacherError(f"{views} views need an augmentation policy; without one every view is the sample itself")
        self.views, self.augment, self.view_salt = int(views), augment, int(view_salt)

    # -- the forward pass -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _inputs_on_device(self, inputs: np.ndarray) -> torch.Tensor:
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

    def forward(self, inputs: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> np.ndarray:
        """``[B, *input_shape]`` in the contract's dtype → float32 ``[B, C]``, the logits to store;
        when serving views, ``seeds`` [B, V] gives each sample's view seeds and the logits are
        ``[B, V, C]`` (``[B, C]`` for one view): the V·B views go through the teacher together.
        A language model's are ``[B, L', V]``, L' the longest of ``lengths``."""
        with torch.inference_mode():
            stored = self._stored(inputs, seeds, lengths)
            return np.ascontiguousarray(stored.float().cpu().numpy(), dtype=np.float32)

    def encode(
        self, inputs: np.ndarray, layout: TargetLayout, seeds: np.ndarray | None = None, draws: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """The stored fields of ``layout`` for a batch, encoded on the teacher's device right after
        the forward pass (``TargetLayout.encode_tensor``): only they cross to the host. ``draws``
        are the rows' draw seeds, for a randomized layout; ``lengths`` the token counts of a
        language model's sequences."""
        with torch.inference_mode():
            stored = self._stored(inputs, seeds, lengths)
            return layout.encode_tensor(stored, draws, lengths)

    def _check_inputs(self, inputs: np.ndarray, seeds: np.ndarray | None) -> None:
        shape, dtype = self.contract.input_shape, self.contract.input_dtype
        if not isinstance(inputs, np.ndarray) or inputs.shape[1:] != shape or inputs.ndim != len(shape) + 1:
            got = list(inputs.shape) if isinstance(inputs, np.ndarray) else type(inputs).__name__
            raise ValueError(f"inputs are {got}, the teacher expects [B, {', '.join(map(str, shape))}]")
        if inputs.dtype != np.dtype(dtype):
            raise ValueError(f"inputs are {inputs.dtype}, the teacher expects {dtype}")
        if self.augment is not None and (seeds is None or np.shape(seeds) != (len(inputs), self.views)):
            raise ValueError(f"this teacher serves {self.views} view(s) per sample: give seeds [{len(inputs)}, {self.views}]")

    def _stored(self, inputs: np.ndarray, seeds: np.ndarray | None, lengths: np.ndarray | None) -> torch.Tensor:
        """The logits to store, on the device (in inference mode)."""
        self._check_inputs(inputs, seeds)
        if self.task == "lm":
            longest = self.contract.input_shape[0] if lengths is None or not len(inputs) else int(np.max(lengths))
            inputs = inputs[:, :longest]  # right padding: the positions after the longest sequence change nothing
            out_shape: tuple[int, ...] = (longest, self.num_classes)
        else:
            out_shape = (self.views, self.num_classes) if self.views > 1 else (self.num_classes,)
        if len(inputs) == 0:
            return torch.zeros((0, *out_shape), dtype=torch.float32, device=self.device)
        x = self._inputs_on_device(inputs)
        if self.augment is not None:
            view_seeds = torch.from_numpy(np.ascontiguousarray(seeds, dtype=np.int64)).to(self.device)
            x = torch.cat([self.augment(x, view_seeds[:, v]) for v in range(self.views)])  # view-major, [V·B, ...]
        stored = self.combiner.forward(self._run, len(self.members), self._prepare(x))
        if self.augment is not None:
            stored = stored.reshape(self.views, len(inputs), self.num_classes).transpose(0, 1).reshape(len(inputs), *out_shape)
        return stored

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A language model takes its token ids as they are; other teachers the contract's preprocessing."""
        return x if self.task == "lm" else self.contract.preprocessing.apply(x)

    def member_labels(self) -> list[str]:
        """Each member as messages name it: its spec, with its position where two specs are the same."""
        specs = [m.spec for m in self.members]
        return [spec if specs.count(spec) == 1 else f"{spec} (--teacher {i + 1})" for i, spec in enumerate(specs)]

    def _run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's logits on preprocessed inputs ``x`` (the combiner decides which members run on which samples)."""
        member = self.members[i]
        with self._autocast():
            z = member.module(x)
        expected = (len(x), *x.shape[1:2], self.widths[i]) if self.task == "lm" else (len(x), self.widths[i])
        if z.shape != expected:
            raise TeacherError(f"{member.spec}: returned {list(z.shape)} for inputs {list(x.shape)}, expected {list(expected)}")
        return z

    def _probe(self) -> int:
        """One forward of zeros per member: it must run on the contract's shape and return [B, C]
        ([B, L, V] for a language model)."""
        zeros = torch.zeros(PROBE_BATCH, *self.contract.input_shape, dtype=self._input_dtype, device=self.device)
        rank = 3 if self.task == "lm" else 2
        widths: list[int] = []
        with torch.inference_mode():
            x = self._prepare(zeros)
            for member in self.members:
                try:
                    with self._autocast():
                        out = member.module(x)
                except Exception as exc:
                    batch = f"[{PROBE_BATCH}, {', '.join(map(str, self.contract.input_shape))}]"
                    hint = " (exported with a fixed batch size? export with a dynamic batch dimension)" if member.exported else ""
                    raise TeacherError(f"{member.spec}: forward pass on inputs {batch} failed{hint} ({describe_error(exc)})") from None
                if not isinstance(out, torch.Tensor) or out.dim() != rank or out.shape[0] != PROBE_BATCH:
                    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    form = f"[{PROBE_BATCH}, L, V] per token" if rank == 3 else f"[{PROBE_BATCH}, C]"
                    raise TeacherError(f"{member.spec}: returns {got} for a batch of {PROBE_BATCH}, expected logits {form}")
                produced = int(out.shape[-1])
                if member.declared_classes is not None and member.declared_classes != produced:
                    raise TeacherError(f"{member.spec}: declares {member.declared_classes} classes but returns {produced} logits")
                widths.append(produced)
        self.widths = widths
        try:
            return self.combiner.classes(self.member_labels(), widths)
        except CombinerError as exc:
            raise TeacherError(str(exc)) from None

    def warmup(self, batch_size: int) -> None:
        """A few forwards of zeros at the serving batch size, so that the first request does not pay
        for CUDA context set-up, kernel selection and the caching allocator's first growth."""
        rows = max(1, batch_size // self.contract.input_shape[0]) if self.task == "lm" else max(1, batch_size)
        zeros = np.zeros((rows, *self.contract.input_shape), dtype=self.contract.input_dtype)
        seeds = np.arange(len(zeros) * self.views, dtype=np.int64).reshape(len(zeros), self.views) if self.augment is not None else None
        for _ in range(WARMUP_PASSES):
            self.forward(zeros, seeds)

    # -- metadata ---------------------------------------------------------------------------
    def cache_meta(self, logits_dtype: str = "float32", targets: str = "full", target_seed: int = 0) -> CacheMeta:
        """The metadata of the cache this teacher fills; ValueError for targets it cannot hold."""
        return CacheMeta(
            teacher_fingerprint=self.fingerprint, teacher_name=self.name, num_classes=self.num_classes,
            input_shape=self.contract.input_shape, input_dtype=self.contract.input_dtype, preprocessing=self.contract.preprocessing,
            serving_temperature=self.serving_temperature, temperature_rule=self.combiner.temperature_rule, logits_dtype=logits_dtype,
            views_per_id=self.views, augment=self.augment.describe() if self.augment is not None else None, view_salt=self.view_salt,
            logits_layout=targets, target_seed=target_seed, task=self.task, tokenizer_fingerprint=self.tokenizer,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "members": len(self.members),
            # Clients see the members' file names, not the directories they were loaded from on this host.
            "member_details": [{"spec": Path(m.spec).name, "name": m.name, "fingerprint": m.fingerprint} for m in self.members],
            "ensemble": self.combiner.ensemble,
            "device": str(self.device),
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "contract": self.contract.to_dict(),
            "temperature": self.serving_temperature,
            "task": self.task,
            **({"vocab_size": self.num_classes, "tokenizer_fingerprint": self.tokenizer} if self.task == "lm" else {}),
        }

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, {self.fingerprint[:12]}, {self.num_classes} classes, {self.device}, {self.compute_dtype})"


def load_teacher(
    specs: Sequence[str], *, weights: Sequence[str] = (), ensemble: str = "geometric", temperature: float = 1.0,
    device: str = "auto", dtype: str = "auto", input_shape: Sequence[int] | None = None, input_dtype: str | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None, input_scale: float | None = None,
    num_classes: int | None = None, trust_code: bool = False, specialist_top_n: int = DEFAULT_TOP_N,
) -> Teacher:  # fmt: skip
    """Load every member on the CPU, move it to ``device``, check it with one forward pass, and check
    that the members agree on the input contract and the classes. ``temperature`` is the serving
    temperature; ``input_shape`` is the shape of one sample, needed where no file fixes it (a
    TeacherError asking for it has ``setting == "input_shape"``). ``trust_code``: import the
    module:factory arch that a student.pt names (``--trust-code``); without it UntrustedCode.
    ``ensemble="specialists"``: the first spec is the generalist and every other a specialist with
    its cluster (its student.pt's, or ``SPEC#CLASSES``); ``specialist_top_n`` picks the active ones."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise TeacherError(f"no teacher given; give {spec_forms()}")
    if ensemble not in ENSEMBLE_MODES:
        raise TeacherError(f"ensemble {ensemble!r}: expected one of {', '.join(ENSEMBLE_MODES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise TeacherError(f"temperature {temperature!r}: expected a number > 0")
    if num_classes is not None and num_classes < 1:
        raise TeacherError(f"num_classes {num_classes!r}: expected >= 1")
    resolved_device = _resolve_device(device)
    compute_dtype = _resolve_dtype(dtype, resolved_device)
    options = Overrides(
        input_shape=tuple(int(d) for d in input_shape) if input_shape is not None else None, input_dtype=input_dtype,
        normalize=(tuple(normalize[0]), tuple(normalize[1])) if normalize is not None else None, input_scale=input_scale,
        num_classes=num_classes,
    )  # fmt: skip
    members = [member.on_device(resolved_device) for member in load_members(specs, weights, options, trust_code)]
    check_roles(members, ensemble)
    try:
        combiner = combiner_for(
            len(members), ensemble, temperature, [m.cluster for m in members], specialist_top_n, [m.cluster_head for m in members]
        )
    except CombinerError as exc:
        raise TeacherError(str(exc)) from None
    teacher = Teacher(members, combiner, serving_temperature=temperature, device=resolved_device, compute_dtype=compute_dtype)
    for member in members:
        if member.cluster_total is not None and member.cluster_total != teacher.num_classes:
            raise TeacherError(
                f"{member.spec}: a specialist trained on a cache of {member.cluster_total} classes, but the generalist "
                f"{members[0].spec} predicts {teacher.num_classes}"
            )
    return teacher


def check_roles(members: Sequence[Member], ensemble: str) -> None:
    """Specialists only under ``--ensemble specialists``, where the first member is the
    generalist and every other one has its cluster."""
    if ensemble == "specialists":
        if len(members) < 2:
            raise TeacherError("--ensemble specialists needs a generalist (the first --teacher) and at least one specialist")
        if members[0].cluster is not None:
            raise TeacherError(
                f"{members[0].spec}: the generalist (the first --teacher) is a specialist, on classes {_classes(members[0].cluster)}"
            )
        for member in members[1:]:
            if member.cluster is None:
                raise TeacherError(
                    f"{member.spec}: a specialist needs its cluster: a student.pt written by offline-distill --specialist records it, "
                    "or give it with the spec as SPEC#3,5,8 or SPEC#@clusters.json:K"
                )
        return
    for member in members:
        if member.cluster is not None:
            raise TeacherError(
                f"{member.spec}: a specialist (on classes {_classes(member.cluster)}) predicts its cluster and a dustbin, not the "
                "classes; serve it after its generalist with --ensemble specialists"
            )


def _classes(cluster: Sequence[int]) -> str:
    return ",".join(map(str, cluster))


__all__ = ["Teacher", "TeacherError", "load_teacher"]
