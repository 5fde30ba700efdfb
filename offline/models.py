"""The model registry: built-in students (and teachers), ``module:factory`` for your own, and the
student record that ``offline-distill`` writes and ``teacher-serve`` loads.

A model spec is a registry name or ``package.module:factory`` (the attribute may be dotted,
``module:Class.build``), importable from the current environment. Its factory is called with
what its signature takes:

* ``factory(input_shape, num_classes)``: the shape of one sample as stored in the cache and the
  number of classes. Every built-in is such a factory; a factory that accepts two positional
  arguments is always called this way.
* ``factory()``: a model of fixed shape (``teacher-serve`` loaded only this form before). The
  model's own input shape and classes are then checked by a forward pass.

Either way it returns an ``nn.Module`` mapping a float batch ``[B, *input_shape]`` to logits
``[B, num_classes]``. ``resolve`` finds the factory, ``instantiate`` calls it, ``build`` also
checks the model with a forward pass; the trainer and the service both go through them.
Each takes the spec's ``origin``: the command line (the default) is trusted as given, while a
``module:factory`` read from a file (a ``student.pt``'s ``arch``) is imported only with
``--trust-code`` (``cache.trust``).

``student.pt`` (``student_record``, ``read_student_record``) holds the architecture, the
weights and the input contract, loadable with ``torch.load(weights_only=True)``;
``student.pt2`` (``export_program``) is a ``torch.export`` program carrying the same contract
in its extra file ``kd_input_spec.json``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .cache.trust import COMMAND_LINE, Origin, describe_error, import_factory

if TYPE_CHECKING:
    from .cache import CacheMeta

Factory = Callable[..., nn.Module]
REGISTRY: dict[str, Factory] = {}
STUDENT_FORMAT = "kd-student"
STUDENT_VERSION = 1
INPUT_SPEC_FILE = "kd_input_spec.json"
# What a reader needs of a student record; the rest (teacher_fingerprint, temperature, alpha)
# describes how it was trained.
STUDENT_REQUIRED = ("arch", "state_dict", "num_classes", "input_shape")


class ModelSpecError(ValueError):
    """An architecture name or ``module:factory`` that cannot be resolved or does not fit."""


def register(name: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        REGISTRY[name] = factory
        return factory

    return add


def _image_shape(input_shape: tuple[int, ...], arch: str) -> tuple[int, int, int]:
    if len(input_shape) == 2:
        return (1, *input_shape)
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    raise ModelSpecError(f"{arch} needs image inputs [C, H, W] or [H, W]; the samples are {list(input_shape)}")


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """conv-BN-ReLU layers, each followed by a 2× max-pool while the feature map is at least
    ``POOL_MIN`` pixels on its short side, then an average pool to at most 4×4 kept as a grid
    (not one global average: a digit's strokes are told apart by where they are), and a linear
    head. A global average pool after two 3×3 convolutions sees 5-pixel patches only, which is
    why the earlier ``cnn-small`` stalled near chance on 28×28 digits."""

    POOL_MIN = 8
    GRID = 4

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int], dropout: float, arch: str) -> None:
        super().__init__()
        channels, height, width = _image_shape(input_shape, arch)
        self.image_shape = (channels, height, width)
        layers: list[nn.Module] = []
        for out in widths:
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
            if min(height, width) >= self.POOL_MIN:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        grid = (min(self.GRID, height), min(self.GRID, width))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * grid[0] * grid[1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(x.shape[0], *self.image_shape)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), section 4.2: 6n+2 layers, widths 16/32/64."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, blocks_per_stage: int, arch: str) -> None:
        super().__init__()
        self.image_shape = _image_shape(input_shape, arch)
        channels = self.image_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x.reshape(x.shape[0], *self.image_shape))))


# What each built-in is and suits, for --list-students and the README (architecture, suits).
ABOUT: dict[str, tuple[str, str]] = {}


def builtin(name: str, architecture: str, suits: str) -> Callable[[Factory], Factory]:
    ABOUT[name] = (architecture, suits)
    return register(name)


builtin("mlp-small", "MLP, one hidden layer of 32", "tiny inputs (8×8); the demo's student")(
    lambda shape, classes: MLP(shape, classes, [32])
)
builtin("mlp", "MLP, one hidden layer of 128", "the default student: any input, fast on a CPU")(
    lambda shape, classes: MLP(shape, classes, [128])
)
builtin("mlp-large", "MLP, two hidden layers of 512", "any input, when mlp underfits")(
    lambda shape, classes: MLP(shape, classes, [512, 512])
)
builtin("mlp-teacher", "MLP, two hidden layers of 1200, dropout 0.3", "a teacher for small inputs (the paper's MNIST net)")(
    lambda shape, classes: MLP(shape, classes, [1200, 1200], dropout=0.3)
)
builtin("cnn-small", "conv 16, 32 (3×3, BN, max-pools), 4×4 grid, linear", "small images up to about 64×64: the conv student")(
    lambda shape, classes: ConvNet(shape, classes, [16, 32], 0.0, "cnn-small")
)
builtin("cnn-large", "conv 64, 64, 128, 128 (3×3, BN, max-pools), 4×4 grid, dropout 0.3", "a teacher or large student for small images")(
    lambda shape, classes: ConvNet(shape, classes, [64, 64, 128, 128], 0.3, "cnn-large")
)
builtin("resnet", "CIFAR ResNet-20 (He et al. 2016), widths 16/32/64", "32×32 colour images; slow on a CPU")(
    lambda shape, classes: CifarResNet(shape, classes, 3, "resnet")
)
builtin("resnet-8", "CIFAR ResNet-8, widths 16/32/64", "32×32 images, a smaller residual student")(
    lambda shape, classes: CifarResNet(shape, classes, 1, "resnet-8")
)

LIST_SHAPE = (1, 28, 28)  # the input --list-students counts parameters for, with LIST_CLASSES classes
LIST_CLASSES = 10


def describe_students(input_shape: Sequence[int] = LIST_SHAPE, num_classes: int = LIST_CLASSES) -> str:
    """The built-in students as a table: name, architecture, parameters for ``input_shape`` and
    ``num_classes``, and what each suits."""
    shape = "×".join(str(d) for d in input_shape)
    rows = [("student", "architecture", f"params ({shape}, {num_classes} classes)", "suits")]
    for name in REGISTRY:
        architecture, suits = ABOUT.get(name, ("", ""))
        try:
            params = f"{count_parameters(REGISTRY[name](tuple(input_shape), num_classes)):,}"
        except Exception:  # noqa: BLE001 - a student that does not take this input
            params = "-"
        rows.append((name, architecture, params, suits))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return (
        "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip() for row in rows)
        + "\nor module:factory, your own (see README § Students)"
    )


def resolve(spec: str, origin: Origin = COMMAND_LINE) -> Factory:
    """A registry name, or ``package.module:factory`` importable from the current environment
    (from a file the user has not trusted, ``origin``: UntrustedCode, and nothing imported)."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ModelSpecError(f"unknown model {spec!r}; built-in: {', '.join(sorted(REGISTRY))}; or give module:factory")
    return import_factory(spec, what="architecture", origin=origin, error=ModelSpecError)


def takes_shape(spec: str, factory: Factory) -> bool:
    """Whether ``factory`` is called as ``factory(input_shape, num_classes)`` (True) or
    ``factory()`` (False), read from its signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): the registry's form
        return True
    for args, shaped in (((None, None), True), ((), False)):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return shaped
    raise ModelSpecError(f"{spec}: its factory takes {signature}; a factory takes (input_shape, num_classes) or no arguments")


def instantiate(spec: str, input_shape: Sequence[int] | None, num_classes: int | None, origin: Origin = COMMAND_LINE) -> nn.Module:
    """Resolve ``spec`` and call its factory with what it takes. ``input_shape`` and
    ``num_classes`` may be None only for a factory that takes no arguments."""
    factory = resolve(spec, origin)
    shaped = takes_shape(spec, factory)
    if shaped and (input_shape is None or num_classes is None):
        missing = "input shape" if input_shape is None else "number of classes"
        raise ModelSpecError(f"{spec}: its factory takes (input_shape, num_classes), but the {missing} is not known")
    name = spec.partition(":")[2] or spec
    call = f"{name}({list(input_shape)}, {num_classes})" if shaped else f"{name}()"  # type: ignore[arg-type]
    try:
        model = factory(tuple(int(d) for d in input_shape), int(num_classes)) if shaped else factory()  # type: ignore[union-attr, arg-type]
    except ModelSpecError:
        raise
    except Exception as exc:  # a user factory can fail in any way; say which one and why
        raise ModelSpecError(f"{spec}: calling {call} failed ({describe_error(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}: {call} returned {type(model).__name__}, expected torch.nn.Module")
    return model


def build(spec: str, input_shape: Sequence[int], num_classes: int, origin: Origin = COMMAND_LINE) -> nn.Module:
    """Build a model and check, with one forward pass on zeros, that it fits the inputs."""
    input_shape = tuple(int(d) for d in input_shape)
    model = instantiate(spec, input_shape, num_classes, origin)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ModelSpecError(f"{spec} does not fit inputs of shape {list(input_shape)} ({describe_error(exc)})") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ModelSpecError(f"{spec} returns shape {list(out.shape[1:])} per sample, expected [{num_classes}] logits")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each name's UTF-8 bytes, then the tensor's raw
    contiguous CPU bytes. The teacher fingerprint that caches record; the service and the tests
    compute it here so that the two always agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        # A byte view rather than .numpy(): the same bytes, and bfloat16 has no numpy dtype.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The student record and the exported program


def input_contract(meta: CacheMeta) -> dict[str, Any]:
    """The input contract as the model files record it: ``input_shape``, ``input_dtype`` and
    ``preprocessing``, JSON-compatible."""
    return {"input_shape": list(meta.input_shape), "input_dtype": meta.input_dtype, "preprocessing": meta.preprocessing.to_dict()}


def student_record(
    arch: str, model: nn.Module, meta: CacheMeta, *, temperature: float, alpha: float, specialist: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What ``student.pt`` holds: enough to rebuild the model and feed it, with weights_only=True.
    ``num_classes`` is the model's output width (``meta``'s). A specialist's record adds
    ``specialist``: {"classes": [...], "head": "dustbin" | "full", "classes_total": C}, output
    j < K of a dustbin head being class classes[j] and output K the dustbin (offline/specialist.py)."""
    contract = input_contract(meta)
    return {
        "format": STUDENT_FORMAT,
        "version": STUDENT_VERSION,
        "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_classes": meta.num_classes,
        **contract,
        "teacher_fingerprint": meta.teacher_fingerprint,
        "temperature": temperature,
        "alpha": alpha,
        **({"specialist": dict(specialist)} if specialist is not None else {}),
    }


class UnreadableFile(ValueError):
    """A file ``load_data`` cannot read as data; the message says why, without the path."""


def load_data(path: str | Path, map_location: Any = "cpu", hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, strings and numbers only,
    never a pickled object. UnreadableFile for a file holding Python objects (``hint``, e.g. what
    to save instead, goes in that message) or not readable by torch.load at all."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # Python objects beyond plain data: never unpickled
        raise UnreadableFile(
            f"holds Python objects that torch.load(weights_only=True) refuses{hint} ({describe_error(exc)[:160]})"
        ) from None
    except Exception as exc:
        raise UnreadableFile(f"not readable by torch.load ({describe_error(exc)})") from None


def read_student_record(where: str, record: Any) -> Mapping[str, Any]:
    """``record`` (what ``torch.load`` gave for ``where``) checked to be a student record with
    every field a reader needs; the fields themselves are parsed by the reader."""
    if not isinstance(record, Mapping) or record.get("format") != STUDENT_FORMAT:
        raise ModelSpecError(
            f"{where}: not a student.pt written by offline-distill (no format {STUDENT_FORMAT!r}); "
            "to serve a plain state_dict give ARCH or module:factory as the teacher and this file as its weights"
        )
    for key in STUDENT_REQUIRED:
        if key not in record:
            raise ModelSpecError(f"{where}: a {STUDENT_FORMAT} record without {key!r}")
    return record


def export_program(model: nn.Module, meta: CacheMeta, path: Path) -> None:
    """``torch.export`` the model for preprocessed float32 input with a dynamic batch size; the
    input contract goes into the extra file ``INPUT_SPEC_FILE``."""
    model = model.eval().cpu()
    example = torch.zeros(2, *meta.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path, extra_files={INPUT_SPEC_FILE: json.dumps(input_contract(meta))})
