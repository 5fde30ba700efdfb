"""Loading a teacher's members: the four spec kinds, their weights, their input contract, and the
options that override what a file declares. Everything here happens on the CPU; ``teacher``
moves the members to the serving device.

A teacher is named by one or more ``--teacher SPEC``, each of five kinds:

    FILE.pt2          a ``torch.export`` program, exported with a dynamic batch dimension. One
                      written by offline-distill (``student.pt2``) carries its input contract in the
                      extra file ``kd_input_spec.json``; any other takes the shape of one sample from
                      the program when only its batch dimension is dynamic, and needs ``input_shape``
                      when others are too (input dtype float32 and identity preprocessing unless given).
    hf:DIR            a ``transformers`` causal language model directory (``service.lm``): token
                      ids [B, L] in, logits [B, L, V] out; the cache keeps per-token targets.
    FILE.pt           a ``student.pt`` written by offline-distill: architecture, weights and contract.
    ARCH + weights    a built-in architecture of ``offline.models`` (``mlp-teacher``, ``resnet``, ...)
                      with a ``student.pt`` or a plain state_dict.
    module:factory    a factory as ``offline.models`` defines it, with a weights file: one taking
    + weights         ``(input_shape, num_classes)`` is loaded as an ARCH is; one taking no arguments
                      returns its model as is. The weights are a plain state_dict, or a dict holding
                      ``state_dict`` and optionally the contract (or a student.pt).

Any spec may end in ``#CLASSES`` (``#3,5,8`` or ``#@clusters.json:K``): the cluster of a
specialist, for ``--ensemble specialists``, where a student.pt written by ``offline-distill
--specialist`` records its own. Weights files are paired, in order, with the specs that need one (the last two kinds). Options
(``input_shape``, ``input_dtype``, ``normalize``, ``input_scale``, ``num_classes``) override what a
file declares. A member's ``name``, which the cache and the model metadata record, is its file
name without the directories it was loaded from.

A spec is named on the command line and trusted as given. A ``student.pt`` given as a FILE.pt
names its architecture itself: a ``module:factory`` there is code named inside a file, imported
only with ``trust_code`` (``--trust-code``); a built-in ARCH needs no consent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..offline import models
from ..offline.cache.clusters import ClusterError, check_cluster, parse_classes
from ..offline.cache.trust import COMMAND_LINE, Origin
from ..offline.models import describe_error
from . import lm
from .contract import InputContract, Overrides, TeacherError, _declared_contract

SPEC_FORMS = (
    "a torch.export program (FILE.pt2), a student.pt written by offline-distill (FILE.pt), a transformers causal LM directory (hf:DIR), "
    "a built-in architecture ({archs}) with a weights file, or module:factory (a callable taking (input_shape, num_classes) "
    "or no arguments, returning an nn.Module) with a weights file"
)


def spec_forms() -> str:
    return SPEC_FORMS.format(archs=", ".join(sorted(models.REGISTRY)))


@dataclass(frozen=True)
class Member:
    """One loaded model of a teacher."""

    spec: str
    name: str
    module: nn.Module
    fingerprint: str
    contract: InputContract
    declared_classes: int | None  # what the file (or num_classes) says, checked against a forward pass
    exported: bool  # a torch.export program: moved to a device with move_to_device_pass, never .eval()'d
    cluster: tuple[int, ...] | None = None  # a specialist's classes (its student.pt's, or SPEC#CLASSES)
    cluster_total: int | None = None  # the classes C of the cache it was trained on, where its student.pt says
    cluster_head: str | None = None  # dustbin or full, where its student.pt says (else told by its width)
    tokenizer: str | None = None  # a language model's tokenizer fingerprint (hf:DIR with a tokenizer)

    def on_device(self, device: torch.device) -> Member:
        """This member with its module on ``device``, in inference mode."""
        try:
            if self.exported:
                program: Any = self.module
                if device.type != "cpu":
                    program = torch.export.passes.move_to_device_pass(program, device)
                module = program.module()  # an exported module refuses .eval(); it was traced in the mode it runs in
            else:
                module = self.module.to(device).eval()
        except Exception as exc:
            raise TeacherError(f"{self.spec}: cannot be moved to {device} ({describe_error(exc)})") from None
        return replace(self, module=module)


# ---------------------------------------------------------------------------------------------
# Weights


def _names(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _torch_load(path: str, role: str) -> Any:
    if not Path(path).is_file():
        raise TeacherError(f"{path}: no such file ({role})")
    try:
        return models.load_data(path, hint=" (a pickled nn.Module?); save model.state_dict() instead")
    except models.UnreadableFile as exc:
        raise TeacherError(f"{path}: {exc}") from None


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
        raise TeacherError(f"{where}: weights do not fit the model ({describe_error(exc)})") from None


def _member(spec: str, name: str, module: nn.Module, contract: InputContract, declared_classes: int | None) -> Member:
    """A member built from an ``nn.Module``, fingerprinted by its weights."""
    fingerprint = models.weights_fingerprint(module.state_dict())
    return Member(
        spec=spec, name=name, module=module, fingerprint=fingerprint, contract=contract, declared_classes=declared_classes, exported=False
    )


# ---------------------------------------------------------------------------------------------
# The four kinds


def _program_input(program: Any) -> tuple[int | None, ...] | None:
    """The dimensions of an exported program's input, None where dynamic; None when it takes
    other than one tensor (the forward pass on the device then says what fails)."""
    try:
        names = set(program.graph_signature.user_inputs)
        values = [node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder" and node.name in names]
    except Exception:  # a program this torch describes differently: nothing to read the shape from
        return None
    if len(values) != 1 or not isinstance(values[0], torch.Tensor) or values[0].dim() < 2:
        return None
    return tuple(d if isinstance(d, int) else None for d in values[0].shape)


def _dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("dynamic" if d is None else str(d) for d in dims) + "]"


def _program_sample(spec: str, dims: tuple[int | None, ...]) -> tuple[tuple[int, ...] | None, str]:
    """The sample shape an exported program's input dimensions fix, or None and why they do not.
    A static batch dimension is refused: the program checks every call against the size it was
    exported with, and the service runs batches of any size. A static batch of 1 is the usual way
    to get one (torch.export specialises size-1 dimensions even when marked dynamic); such a
    program could serve one sample at a time at best, and it is refused like any other."""
    batch, sample = dims[0], dims[1:]
    if batch is not None:
        raise TeacherError(
            f"{spec}: exported with a static batch of {batch} (its input is {_dims(dims)}), so it takes no other batch size; "
            "export it with a dynamic batch dimension: torch.export.export(model, (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)) with x holding 2 or more samples"
        )
    if None in sample:
        return None, f"its input is {_dims(dims)}: dimensions besides the batch are dynamic, so it does not fix the shape of one sample"
    return tuple(int(d) for d in sample if d is not None), ""


def _check_fits(spec: str, dims: tuple[int | None, ...], contract: InputContract, options: Overrides, spec_file: str) -> None:
    sample, shape = dims[1:], contract.input_shape
    if len(shape) == len(sample) and all(d is None or d == given for d, given in zip(sample, shape, strict=True)):
        return
    takes = f"{spec}: takes samples {_dims(sample)} (its input is {_dims(dims)})"
    if options.input_shape is not None:
        raise TeacherError(f"{takes}, not {list(shape)} as given by input_shape", setting="input_shape")
    raise TeacherError(f"{takes}, but its {spec_file} declares {list(shape)}")


def _load_exported(spec: str, options: Overrides) -> Member:
    if not Path(spec).is_file():
        raise TeacherError(f"{spec}: no such file (torch.export program)")
    spec_file = models.INPUT_SPEC_FILE
    extra_files = {spec_file: ""}
    try:
        program = torch.export.load(spec, extra_files=extra_files)
    except Exception as exc:
        raise TeacherError(f"{spec}: not a torch.export program ({describe_error(exc)})") from None
    declared: dict[str, Any] = {}
    if extra_files.get(spec_file):
        try:
            raw = json.loads(extra_files[spec_file])
        except ValueError as exc:
            raise TeacherError(f"{spec}: {spec_file} is not JSON ({describe_error(exc)})") from None
        if not isinstance(raw, dict):
            raise TeacherError(f"{spec}: {spec_file} is not a JSON object")
        declared = _declared_contract(f"{spec}: {spec_file}", raw)
    dims = _program_input(program)
    if dims is None:
        contract = options.contract(spec, declared)
    else:
        sample, unknown = _program_sample(spec, dims)
        if sample is not None:
            declared.setdefault("input_shape", sample)  # the input spec file's, when it has one, is checked below
        contract = options.contract(spec, declared, unknown)
        _check_fits(spec, dims, contract, options, spec_file)
    # Parameters, buffers and lifted constants under their module names: the same names, hence the
    # same fingerprint, as the state_dict of the nn.Module that was exported.
    tensors = {k: v for k, v in {**program.state_dict, **program.constants}.items() if isinstance(v, torch.Tensor)}
    return Member(
        spec=spec, name=Path(spec).name, module=program, fingerprint=models.weights_fingerprint(tensors),  # type: ignore[arg-type]
        contract=contract, declared_classes=declared.get("num_classes"), exported=True,
    )  # fmt: skip


def _from_student_record(where: str, payload: Any, options: Overrides, model_spec: str | None, trust_code: bool = False) -> Member:
    """A student record read from ``where``. Its ``arch`` is trusted as given when it is the
    ``model_spec`` named on the command line; read from the file alone, a module:factory arch
    needs ``trust_code``."""
    try:
        record = models.read_student_record(where, payload)
    except models.ModelSpecError as exc:
        raise TeacherError(str(exc)) from None
    arch = str(record["arch"])
    if model_spec is not None and arch != model_spec:
        raise TeacherError(f"{where}: holds a {arch!r} model, but the teacher spec says {model_spec!r}")
    state, declared = _state_dict_of(where, record)
    contract = options.contract(where, declared)
    origin = COMMAND_LINE if model_spec is not None else Origin(where, trust_code)
    module = _build(where, arch, contract.input_shape, declared["num_classes"], origin)
    _load_weights(where, module, state)
    cluster, total, head = _specialist_record(where, record, declared["num_classes"])
    member = _member(where, arch, module, contract, declared["num_classes"])
    return replace(member, cluster=cluster, cluster_total=total, cluster_head=head)


def _specialist_record(where: str, record: Mapping[str, Any], width: int) -> tuple[tuple[int, ...] | None, int | None, str | None]:
    """The cluster and class count that a specialist's student.pt records (``offline-distill
    --specialist``), checked against its output width: K + 1 for a dustbin head, C for a full one."""
    entry = record.get("specialist")
    if entry is None:
        return None, None, None
    try:
        if not isinstance(entry, Mapping):
            raise ClusterError(f"{where}: its 'specialist' entry is not a mapping")
        total = entry.get("classes_total")
        if isinstance(total, bool) or not isinstance(total, int) or total < 2:
            raise ClusterError(f"{where}: its 'specialist' entry has no class count (classes_total)")
        classes = check_cluster(f"{where}: its cluster", list(entry.get("classes") or ()), total)
    except ClusterError as exc:
        raise TeacherError(str(exc)) from None
    head = entry.get("head")
    expected = {"dustbin": len(classes) + 1, "full": total}
    if head not in expected or expected[head] != width:
        raise TeacherError(
            f"{where}: a specialist on {len(classes)} classes with a {head!r} head must have {expected.get(head, '?')} outputs, "
            f"but has {width}; the head does not match the cluster"
        )
    return classes, total, head


def _build(where: str, model_spec: str, input_shape: tuple[int, ...], num_classes: int, origin: Origin = COMMAND_LINE) -> nn.Module:
    try:
        return models.build(model_spec, input_shape, num_classes, origin)
    except models.ModelSpecError as exc:
        raise TeacherError(f"{where}: {exc}") from None


def _load_with_weights(model_spec: str, weights: str, options: Overrides) -> Member:
    """An ARCH or module:factory spec and its weights file."""
    try:
        if not models.takes_shape(model_spec, models.resolve(model_spec)):
            # The factory's model has its own shape; the contract only says what clients send.
            module = models.instantiate(model_spec, None, None)
            state, declared = _state_dict_of(weights, _torch_load(weights, f"weights for {model_spec}"))
            where = f"{model_spec} with {weights}"
            _load_weights(where, module, state)
            return _member(model_spec, model_spec, module, options.contract(where, declared), declared.get("num_classes"))
    except models.ModelSpecError as exc:
        raise TeacherError(str(exc)) from None
    payload = _torch_load(weights, f"weights for {model_spec}")
    if isinstance(payload, Mapping) and "format" in payload:
        return _from_student_record(weights, payload, options, model_spec=model_spec)
    where = f"{model_spec} with {weights}"
    state, declared = _state_dict_of(weights, payload)
    contract = options.contract(where, declared)
    num_classes = options.num_classes or declared.get("num_classes")
    if num_classes is not None:
        module = _build(where, model_spec, contract.input_shape, num_classes)
        _load_weights(where, module, state)
        return _member(model_spec, model_spec, module, contract, num_classes)
    # The class count is the length of the classifier's bias, the last 1-D tensor in the usual
    # definition order; the strict load confirms the guess.
    last = next((k for k in reversed(state) if state[k].dim() == 1), None)
    if last is None:
        raise TeacherError(
            f"{where}: cannot tell the class count (no 1-D tensor in the state_dict); pass num_classes", setting="num_classes"
        )
    guess = int(state[last].numel())
    module = _build(where, model_spec, contract.input_shape, guess)
    try:
        _load_weights(where, module, state)
    except TeacherError as exc:
        raise TeacherError(f"{exc}; guessed {guess} classes from {last!r}; pass num_classes", setting="num_classes") from None
    return _member(model_spec, model_spec, module, contract, guess)


def split_cluster(spec: str) -> tuple[str, tuple[int, ...] | None]:
    """``SPEC#CLASSES`` → (SPEC, the classes): a specialist's cluster given with its spec, as
    ``offline-distill --specialist`` takes it (``3,5,8`` or ``@clusters.json:K``)."""
    base, hash_sign, classes = spec.rpartition("#")
    if not hash_sign:
        return spec, None
    try:
        return base, parse_classes(classes)
    except ClusterError as exc:
        raise TeacherError(f"{spec}: the cluster after '#': {exc}") from None


def _classes_text(classes: Sequence[int]) -> str:
    return ",".join(map(str, classes))


def spec_kind(spec: str) -> str:
    """``exported``, ``student``, ``hf`` (a transformers causal LM directory) or ``model`` (an
    ARCH or module:factory, which takes a weights file)."""
    if spec.startswith(lm.PREFIX):
        return "hf"
    if spec.endswith(".pt2"):
        return "exported"
    if spec.endswith(".pt"):
        return "student"
    if spec in models.REGISTRY:
        return "model"
    module_name, sep, attr = spec.partition(":")
    if sep and module_name and attr and all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        return "model"
    raise TeacherError(f"{spec}: not a teacher spec; give {spec_forms()}")


def load_members(specs: Sequence[str], weights: Sequence[str], options: Overrides, trust_code: bool = False) -> Iterator[Member]:
    """Every member on the CPU, one at a time and in order (so that the caller can move each to
    its device before the next is loaded), checked to take the same inputs as the first. Class
    counts are checked later, by a forward pass on the device. ``trust_code``: import the
    module:factory arch that a student.pt names (UntrustedCode without it)."""
    specs, given_clusters = zip(*(split_cluster(spec) for spec in specs), strict=True) if specs else ((), ())
    kinds = [spec_kind(spec) for spec in specs]
    needing = [spec for spec, kind in zip(specs, kinds, strict=True) if kind == "model"]
    if len(weights) < len(needing):
        raise TeacherError(f"{needing[len(weights)]}: needs a weights file; {len(needing)} teacher(s) need one, {len(weights)} given")
    if len(weights) > len(needing):
        raise TeacherError(
            f"{weights[len(needing)]}: {len(weights)} weights files given but only {len(needing)} teacher(s) take one ({', '.join(needing) or 'none'})"
        )
    pending_weights = iter(weights)
    first: tuple[str, InputContract] | None = None  # not the member: the caller moves it off the CPU
    for spec, kind, given in zip(specs, kinds, given_clusters, strict=True):
        if kind == "exported":
            member = _load_exported(spec, options)
        elif kind == "hf":
            module, fingerprint, contract, vocab, tokenizer = lm.load_hf(spec, options)
            member = Member(
                spec=spec, name=Path(spec[len(lm.PREFIX) :]).name, module=module, fingerprint=fingerprint, contract=contract,
                declared_classes=vocab, exported=False, tokenizer=tokenizer,
            )  # fmt: skip
        elif kind == "student":
            member = _from_student_record(spec, _torch_load(spec, "student.pt"), options, model_spec=None, trust_code=trust_code)
        else:
            member = _load_with_weights(spec, next(pending_weights), options)
        if options.num_classes is not None:
            if member.declared_classes not in (None, options.num_classes):
                raise TeacherError(
                    f"{member.spec}: declares {member.declared_classes} classes, not the {options.num_classes} given as num_classes",
                    setting="num_classes",
                )
            member = replace(member, declared_classes=options.num_classes)
        if given is not None:
            if member.cluster is not None and member.cluster != given:
                raise TeacherError(
                    f"{spec}: records the cluster {_classes_text(member.cluster)}, but the spec gives {_classes_text(given)}"
                )
            member = replace(member, cluster=given)
        if first is None:
            first = (member.spec, member.contract)
        elif member.contract != first[1]:
            first_spec, contract = first
            field = next(f for f in ("input_shape", "input_dtype", "preprocessing") if getattr(member.contract, f) != getattr(contract, f))
            raise TeacherError(
                f"{member.spec}: {field} is {getattr(member.contract, field)!r}, but {first_spec} has {getattr(contract, field)!r}; "
                "all members of an ensemble must take the same inputs"
            )
        yield member
