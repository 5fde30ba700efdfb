"""The student registry: every built-in fits the shapes it claims, and misfits are explained."""

import sys

import pytest
import torch

from kdcache.offline import models


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (3, 32, 32)])
def test_builtins_infer_shape_and_classes(arch, shape):
    model = models.build(arch, shape, 7)
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize("arch", ["mlp-small", "mlp", "mlp-large"])
def test_mlp_takes_flat_inputs(arch):
    assert models.build(arch, (64,), 10)(torch.zeros(2, 64)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["cnn-small", "resnet"])
def test_image_models_refuse_flat_inputs(arch):
    with pytest.raises(models.ModelSpecError, match=r"needs image inputs .* \[64\]"):
        models.build(arch, (64,), 10)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(models.ModelSpecError, match="unknown model 'vit'.*cnn-small"):
        models.resolve("vit")


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_students.py").write_text(
        "import torch\n"
        "def tiny(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))\n"
        "def wrong(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert models.build("my_students:tiny", (8, 8), 10)(torch.zeros(1, 8, 8)).shape == (1, 10)
    with pytest.raises(models.ModelSpecError, match=r"returns shape \[11\] per sample, expected \[10\]"):
        models.build("my_students:wrong", (8, 8), 10)
    with pytest.raises(models.ModelSpecError, match="has no callable 'missing'"):
        models.build("my_students:missing", (8, 8), 10)
    with pytest.raises(models.ModelSpecError, match="cannot import"):
        models.build("no_such_module_here:tiny", (8, 8), 10)
    sys.modules.pop("my_students", None)


def test_factory_forms_are_read_from_the_signature(tmp_path, monkeypatch):
    """One module:factory contract for the trainer and the service: (input_shape, num_classes), or no arguments."""
    (tmp_path / "my_factories.py").write_text(
        "import torch\n"
        "def fixed():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "class Zoo:\n"
        "    @staticmethod\n"
        "    def shaped(input_shape, num_classes, width=4):\n"
        "        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))\n"
        "def one(config):\n"
        "    return fixed()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert models.takes_shape("my_factories:fixed", models.resolve("my_factories:fixed")) is False
    assert models.takes_shape("my_factories:Zoo.shaped", models.resolve("my_factories:Zoo.shaped")) is True
    assert models.build("my_factories:fixed", (8, 8), 10)(torch.zeros(1, 8, 8)).shape == (1, 10)
    assert models.build("my_factories:Zoo.shaped", (3, 3), 5)(torch.zeros(1, 3, 3)).shape == (1, 5)
    with pytest.raises(models.ModelSpecError, match=r"returns shape \[10\] per sample, expected \[7\]"):
        models.build("my_factories:fixed", (8, 8), 7)  # a fixed model is checked like any other
    with pytest.raises(models.ModelSpecError, match=r"my_factories:one: its factory takes \(config\); a factory takes"):
        models.build("my_factories:one", (8, 8), 10)
    with pytest.raises(models.ModelSpecError, match=r"the input shape is not known"):
        models.instantiate("my_factories:Zoo.shaped", None, None)
    assert isinstance(models.instantiate("my_factories:fixed", None, None), torch.nn.Module)
    sys.modules.pop("my_factories", None)


def test_student_sizes_are_ordered():
    sizes = [models.count_parameters(models.build(a, (8, 8), 10)) for a in ("mlp-small", "mlp", "mlp-large", "mlp-teacher")]
    assert sizes == sorted(sizes)
