"""The model registry: built-in students (and teachers), and ``module:factory`` for your own.

A factory takes ``(input_shape, num_classes)``, the shape of one sample as stored in the cache
and the number of classes, and returns an ``nn.Module`` mapping a float batch
``[B, *input_shape]`` to logits ``[B, num_classes]``. The service imports this registry too, so
that a model trained with ``offline-distill`` can be served as a teacher.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

Factory = Callable[[tuple[int, ...], int], nn.Module]
REGISTRY: dict[str, Factory] = {}


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
    """conv-BN-ReLU stages, 2× max-pool between them, global average pool, linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int], dropout: float, arch: str) -> None:
        super().__init__()
        channels, height, width = _image_shape(input_shape, arch)
        self.image_shape = (channels, height, width)
        layers: list[nn.Module] = []
        for i, out in enumerate(widths):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
            if i % 2 == 1 and min(height, width) >= 4:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

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


register("mlp-small")(lambda shape, classes: MLP(shape, classes, [32]))
register("mlp")(lambda shape, classes: MLP(shape, classes, [128]))
register("mlp-large")(lambda shape, classes: MLP(shape, classes, [512, 512]))
register("mlp-teacher")(lambda shape, classes: MLP(shape, classes, [1200, 1200], dropout=0.3))
register("cnn-small")(lambda shape, classes: ConvNet(shape, classes, [16, 32], 0.0, "cnn-small"))
register("cnn-large")(lambda shape, classes: ConvNet(shape, classes, [64, 64, 128, 128], 0.3, "cnn-large"))
register("resnet")(lambda shape, classes: CifarResNet(shape, classes, 3, "resnet"))
register("resnet-8")(lambda shape, classes: CifarResNet(shape, classes, 1, "resnet-8"))


def resolve(spec: str) -> Factory:
    """A registry name, or ``package.module:factory`` importable from the current environment."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" not in spec:
        raise ModelSpecError(f"unknown model {spec!r}; built-in: {', '.join(sorted(REGISTRY))}; or give module:factory")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"{spec}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{spec}: {module_name} has no callable {attr!r}")
    return factory


def build(spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a model and check, with one forward pass on zeros, that it fits the inputs."""
    input_shape = tuple(int(d) for d in input_shape)
    factory = resolve(spec)
    try:
        model = factory(input_shape, num_classes)
    except ModelSpecError:
        raise
    except Exception as exc:  # a user factory can fail in any way; say which one and why
        raise ModelSpecError(f"{spec}: building it for inputs {list(input_shape)} failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}: the factory returned {type(model).__name__}, expected torch.nn.Module")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise ModelSpecError(f"{spec} does not fit inputs of shape {list(input_shape)} ({type(exc).__name__}: {exc})") from None
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
