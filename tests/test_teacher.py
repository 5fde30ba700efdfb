"""The teacher component of the service: the four spec kinds, fingerprints, ensembles, the input
contract, and errors that name the file."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.offline import models, train
from kdcache.offline.cache import CacheMeta, Preprocessing
from kdcache.service.cli import load_settings, serve_main
from kdcache.service.contract import InputContract, TeacherError, parse_normalize
from kdcache.service.ensemble import ArithmeticMean, GeometricMean, SingleMember
from kdcache.service.teacher import load_teacher

SHAPE = (8, 8)
CLASSES = 10
PREPROCESSING = Preprocessing(scale=1 / 16)
FACTORY_SOURCE = """
import torch
from kdcache.offline import models

def make():
    return models.build("cnn-small", (8, 8), 10)

def not_a_module():
    return 42

def flat_output():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Flatten(0))

def needs_arguments(input_shape, num_classes):
    return models.build("mlp-small", input_shape, num_classes)

def shaped(input_shape, num_classes):
    return models.build("cnn-small", input_shape, num_classes)

def one_argument(config):
    return make()

def broken():
    raise RuntimeError("no")
"""


def random_model(arch: str, seed: int, shape: tuple[int, ...] = SHAPE, classes: int = CLASSES) -> torch.nn.Module:
    """A model with random weights and, for BatchNorm, random running statistics (so that a missed
    ``eval()`` or a lost buffer shows)."""
    torch.manual_seed(seed)
    model = models.build(arch, shape, classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def reference_logits(model: torch.nn.Module, x: np.ndarray, preprocessing: Preprocessing = PREPROCESSING) -> np.ndarray:
    with torch.no_grad():
        return model(preprocessing.apply(torch.from_numpy(x))).numpy()


def write_student(
    model: torch.nn.Module, arch: str, directory: Path, preprocessing: Preprocessing = PREPROCESSING, export: bool = True
) -> Path:
    """student.pt (and student.pt2) exactly as offline-distill writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = CacheMeta(
        teacher_fingerprint="0" * 64, teacher_name="digits", num_classes=CLASSES, input_shape=SHAPE, input_dtype="uint8",
        preprocessing=preprocessing,
    )  # fmt: skip
    train.save_atomic(train.student_record(train.TrainConfig(caches=[], student=arch), model, meta), directory / "student.pt")
    if export:
        train.export_program(model, meta, directory / "student.pt2")
    return directory


def uint8_batch(n: int = 5, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, *shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("teachers")
    model = random_model("cnn-small", seed=0)
    write_student(model, "cnn-small", root / "run")
    torch.save(model.state_dict(), root / "cnn.sd.pt")
    torch.save(
        {"state_dict": model.state_dict(), "input_shape": list(SHAPE), "input_dtype": "uint8", "preprocessing": PREPROCESSING.to_dict()},
        root / "cnn.wrapped.pt",
    )
    other = random_model("cnn-small", seed=1)
    torch.save(other.state_dict(), root / "cnn-other.sd.pt")
    mlps = [random_model("mlp-small", seed=10 + i) for i in range(3)]
    for i, mlp in enumerate(mlps):
        torch.save(mlp.state_dict(), root / f"mlp{i}.sd.pt")
    torch.save(random_model("mlp-small", seed=20, classes=7).state_dict(), root / "mlp-7.sd.pt")
    (root / "kd_test_factories.py").write_text(FACTORY_SOURCE)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Flatten(0))
    torch.save(flat.state_dict(), root / "flat.sd.pt")
    (root / "garbage.pt2").write_bytes(b"not a zip file")
    torch.save(model, root / "pickled-module.pt")
    return {"root": root, "model": model, "other": other, "mlps": mlps}


@pytest.fixture
def factories(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))
    yield
    sys.modules.pop("kd_test_factories", None)


UINT8_SCALED = {"input_shape": SHAPE, "input_dtype": "uint8", "input_scale": 1 / 16}


def spec_of(kind: str, root: Path) -> tuple[list[str], list[str], dict]:
    return {
        "student.pt": ([str(root / "run/student.pt")], [], {}),
        "student.pt2": ([str(root / "run/student.pt2")], [], {}),
        "arch+student.pt": (["cnn-small"], [str(root / "run/student.pt")], {}),
        "arch+state_dict": (["cnn-small"], [str(root / "cnn.sd.pt")], UINT8_SCALED),
        "factory+wrapped": (["kd_test_factories:make"], [str(root / "cnn.wrapped.pt")], {}),
        "factory+state_dict": (["kd_test_factories:make"], [str(root / "cnn.sd.pt")], UINT8_SCALED),
        # offline.models' factory form, (input_shape, num_classes): loaded as an ARCH is.
        "shaped factory+wrapped": (["kd_test_factories:shaped"], [str(root / "cnn.wrapped.pt")], {}),
        "shaped factory+state_dict": (["kd_test_factories:shaped"], [str(root / "cnn.sd.pt")], UINT8_SCALED),
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "student.pt", "student.pt2", "arch+student.pt", "arch+state_dict", "factory+wrapped", "factory+state_dict",
        "shaped factory+wrapped", "shaped factory+state_dict",
    ],
)  # fmt: skip
def test_every_spec_kind_serves_the_model_itself(files, factories, kind):
    specs, weights, options = spec_of(kind, files["root"])
    teacher = load_teacher(specs, weights=weights, device="cpu", **options)
    x = uint8_batch()
    logits = teacher.forward(x)
    assert logits.dtype == np.float32 and logits.flags.c_contiguous and logits.shape == (5, CLASSES)
    np.testing.assert_allclose(logits, reference_logits(files["model"], x), rtol=1e-5, atol=1e-5)
    # The same weights have one fingerprint however they are packaged, the one the tests' caches use.
    assert teacher.fingerprint == models.weights_fingerprint(files["model"].state_dict())
    assert teacher.contract == InputContract(SHAPE, "uint8", PREPROCESSING)
    assert (teacher.num_classes, len(teacher.members), teacher.combiner.ensemble, teacher.compute_dtype) == (
        CLASSES,
        1,
        None,
        torch.float32,
    )
    assert isinstance(teacher.combiner, SingleMember) and teacher.cache_meta().temperature_rule == "any"


def export(model: torch.nn.Module, example: torch.Tensor, path: Path, dynamic: dict | None = None) -> Path:
    """``model`` as a plain torch.export program, without offline-distill's input spec file."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=(dynamic,) if dynamic is not None else None)
    torch.export.save(program, path)
    return path


def test_exported_program_without_input_spec_takes_the_sample_shape_from_the_program(files, tmp_path):
    path = export(files["mlps"][0], torch.zeros(2, *SHAPE), tmp_path / "plain.pt2", {0: torch.export.Dim("batch", min=1)})
    teacher = load_teacher([str(path)], device="cpu")
    x = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)
    assert teacher.contract == InputContract(SHAPE, "float32", Preprocessing())
    assert teacher.num_classes == CLASSES  # from a forward pass: the file does not say
    np.testing.assert_allclose(teacher.forward(x), reference_logits(files["mlps"][0], x, Preprocessing()), rtol=1e-5, atol=1e-5)
    assert teacher.fingerprint == models.weights_fingerprint(files["mlps"][0].state_dict())
    assert load_teacher([str(path)], device="cpu", input_shape=SHAPE).contract == teacher.contract  # the same shape, given
    with pytest.raises(
        TeacherError, match=r"plain\.pt2: takes samples \[8, 8\] \(its input is \[dynamic, 8, 8\]\), not \[64\] as given by input_shape$"
    ):
        load_teacher([str(path)], device="cpu", input_shape=(64,))


def any_size_program(path: Path) -> Path:
    """A convolutional program whose height and width are dynamic, like its batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=4), 3: torch.export.Dim("width", min=4)}
    return export(model, torch.zeros(2, 3, 6, 6), path, dims)


def test_exported_program_with_other_dynamic_dimensions_needs_input_shape(tmp_path):
    path = any_size_program(tmp_path / "any-size.pt2")
    with pytest.raises(TeacherError) as caught:
        load_teacher([str(path)], device="cpu")
    assert str(caught.value) == (
        f"{path}: its input is [dynamic, 3, dynamic, dynamic]: dimensions besides the batch are dynamic, so it does not fix "
        "the shape of one sample; give the shape of one sample as input_shape"
    )
    assert caught.value.setting == "input_shape"
    assert caught.value.spelled(lambda setting: "--input-shape").endswith("give the shape of one sample as --input-shape")
    teacher = load_teacher([str(path)], device="cpu", input_shape=(3, 10, 12))
    assert teacher.contract.input_shape == (3, 10, 12) and teacher.forward(np.zeros((2, 3, 10, 12), np.float32)).shape == (2, 5)
    for wrong in ((4, 10, 12), (3, 10)):
        with pytest.raises(
            TeacherError, match=r"any-size\.pt2: takes samples \[3, dynamic, dynamic\] .*, not \[.*\] as given by input_shape$"
        ):
            load_teacher([str(path)], device="cpu", input_shape=wrong)


@pytest.mark.parametrize("batch", [1, 2])
def test_exported_program_with_a_static_batch_is_refused(files, tmp_path, batch):
    # Exported on one example without dynamic_shapes: the program refuses any other batch size,
    # and the service runs batches of any size. Given the shape or not, it cannot be served.
    path = export(files["mlps"][0], torch.zeros(batch, *SHAPE), tmp_path / f"static-{batch}.pt2")
    for options in ({}, {"input_shape": SHAPE}):
        with pytest.raises(
            TeacherError,
            match=rf"static-{batch}\.pt2: exported with a static batch of {batch} \(its input is \[{batch}, 8, 8\]\), "
            r"so it takes no other batch size; export it with a dynamic batch dimension: .*Dim\('batch'\)",
        ):
            load_teacher([str(path)], device="cpu", **options)


def test_recorded_teacher_name_is_the_file_name_and_a_cache_named_by_path_still_opens(files, tmp_path):
    """Older servers recorded the absolute path as the teacher's name; the cache writer compares the
    fingerprint (and the contract), not the name, so a restart on such a cache keeps appending."""
    from kdcache.offline.cache import CacheReader, CacheWriter

    spec = str(files["root"] / "run/student.pt2")
    teacher = load_teacher([spec], device="cpu")
    meta = teacher.cache_meta()
    assert teacher.name == meta.teacher_name == "student.pt2"
    summary = teacher.describe()
    assert summary["name"] == "student.pt2" and summary["member_details"][0]["spec"] == "student.pt2"
    assert str(files["root"]) not in json.dumps(summary)
    ensemble = load_teacher([spec, spec], device="cpu")
    assert ensemble.name == "ensemble-geometric(student.pt2,student.pt2)"

    x = uint8_batch(6)
    old = dataclasses.replace(meta, teacher_name=spec)
    with CacheWriter(tmp_path / "cache", old, max_samples=4) as writer:
        writer.append([f"a{i}" for i in range(3)], x[:3], teacher.forward(x[:3]), np.full(3, -1))
    with CacheWriter(tmp_path / "cache", meta, max_samples=4) as writer:
        writer.append([f"b{i}" for i in range(3)], x[3:], teacher.forward(x[3:]), np.full(3, -1))
    reader = CacheReader(tmp_path / "cache")
    assert reader.num_samples == 6 and reader.meta.teacher_fingerprint == teacher.fingerprint


@pytest.mark.parametrize("words", [["3,10,12"], ["3", "10", "12"], ["3,", "10,", "12"]])
def test_input_shape_option_takes_commas_or_words(words, monkeypatch):
    assert load_settings(["--teacher", "t.pt2", "--cache", "c", "--input-shape", *words]).input_shape == [3, 10, 12]
    monkeypatch.setenv("TEACHER_SERVE_INPUT_SHAPE", " ".join(words))
    assert load_settings(["--teacher", "t.pt2", "--cache", "c"]).input_shape == [3, 10, 12]


def test_serve_cli_names_the_input_shape_option(tmp_path, capsys):
    """The loader asks for the Python keyword input_shape; teacher-serve says --input-shape."""
    path = str(any_size_program(tmp_path / "any-size.pt2"))
    base = ["--teacher", path, "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    for extra, ending in (
        ([], "so it does not fix the shape of one sample; give the shape of one sample as --input-shape"),
        (["--input-shape", "4,10,12"], "takes samples [3, dynamic, dynamic] (its input is [dynamic, 3, dynamic, dynamic]), "
         "not [4, 10, 12] as given by --input-shape"),
        (["--input-shape", "3,x,12"], "--input-shape: Input should be a valid integer, unable to parse string as an integer"),
        (["--input-shape", "3", "0", "12"], "--input-shape: Input should be greater than or equal to 1"),
    ):  # fmt: skip
        assert serve_main(base + extra) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("teacher-serve: error: ") and error.endswith(ending) and "input_shape" not in error, error
    assert not (tmp_path / "cache").exists()


def test_class_count_guessed_from_the_classifier_bias(files):
    teacher = load_teacher(["mlp-small"], weights=[str(files["root"] / "mlp-7.sd.pt")], device="cpu", input_shape=SHAPE)
    assert teacher.num_classes == 7


def test_student_format_matches_the_trainer(files):
    """One definition of the record: what the trainer writes is what the reader checks."""
    record = torch.load(files["root"] / "run/student.pt", weights_only=True)
    assert record["format"] == models.STUDENT_FORMAT
    assert models.read_student_record("student.pt", record) is record
    assert set(record) == {
        "format", "version", "arch", "state_dict", "num_classes", "input_shape", "input_dtype", "preprocessing",
        "teacher_fingerprint", "temperature", "alpha",
    }  # fmt: skip
    with pytest.raises(models.ModelSpecError, match=r"student\.pt: a kd-student record without 'num_classes'"):
        models.read_student_record("student.pt", {k: v for k, v in record.items() if k != "num_classes"})
    extra_files = {models.INPUT_SPEC_FILE: ""}
    torch.export.load(files["root"] / "run/student.pt2", extra_files=extra_files)
    assert json.loads(extra_files[models.INPUT_SPEC_FILE]) == {
        "input_shape": list(SHAPE), "input_dtype": "uint8", "preprocessing": PREPROCESSING.to_dict(),
    }  # fmt: skip


def test_fingerprints(files):
    root = files["root"]
    one = load_teacher(["cnn-small"], weights=[str(root / "cnn.sd.pt")], device="cpu", **UINT8_SCALED)
    other = load_teacher(["cnn-small"], weights=[str(root / "cnn-other.sd.pt")], device="cpu", **UINT8_SCALED)
    assert one.fingerprint != other.fingerprint
    mlp = [str(root / f"mlp{i}.sd.pt") for i in range(3)]

    def ensemble(weights: list[str], mode: str = "geometric", temperature: float = 1.0) -> str:
        return load_teacher(
            ["mlp-small"] * len(weights), weights=weights, ensemble=mode, temperature=temperature, device="cpu", input_shape=SHAPE
        ).fingerprint

    geometric = ensemble(mlp)
    assert geometric == ensemble(mlp[::-1]) == ensemble(mlp, temperature=4.0)  # order-free; T does not change mean logits
    arithmetic = ensemble(mlp, "arithmetic", 2.0)
    assert arithmetic == ensemble(mlp[::-1], "arithmetic", 2.0)
    assert len({geometric, arithmetic, ensemble(mlp, "arithmetic", 4.0), ensemble(mlp[:2])}) == 4


def member_logits(files, x: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(reference_logits(m, x, Preprocessing())).double() for m in files["mlps"]])


def load_mlp_ensemble(files, **options):
    weights = [str(files["root"] / f"mlp{i}.sd.pt") for i in range(3)]
    return load_teacher(["mlp-small"] * 3, weights=weights, device="cpu", input_shape=SHAPE, **options)


def test_geometric_ensemble_is_the_normalised_product_at_every_temperature(files):
    teacher = load_mlp_ensemble(files)
    assert (len(teacher.members), teacher.combiner.ensemble, teacher.name) == (
        3,
        "geometric",
        "ensemble-geometric(mlp-small,mlp-small,mlp-small)",
    )
    assert isinstance(teacher.combiner, GeometricMean) and teacher.cache_meta().temperature_rule == "any"
    x = np.random.default_rng(1).normal(size=(6, *SHAPE)).astype(np.float32) * 3
    stored = torch.from_numpy(teacher.forward(x)).double()
    z = member_logits(files, x)
    for t in (0.5, 1.0, 2.0, 8.0):
        # The geometric mean: the product of the members' p_i ** (1/M), renormalised.
        product = torch.softmax(z / t, dim=-1).pow(1 / len(z)).prod(dim=0)
        torch.testing.assert_close(torch.softmax(stored / t, dim=-1), product / product.sum(-1, keepdim=True), atol=1e-5, rtol=0)


def test_arithmetic_ensemble_is_the_mean_of_probabilities_at_the_serving_temperature(files):
    t_s = 2.5
    teacher = load_mlp_ensemble(files, ensemble="arithmetic", temperature=t_s)
    x = np.random.default_rng(2).normal(size=(6, *SHAPE)).astype(np.float32) * 3
    stored = torch.from_numpy(teacher.forward(x)).double()
    mean = torch.softmax(member_logits(files, x) / t_s, dim=-1).mean(dim=0)
    torch.testing.assert_close(torch.softmax(stored / t_s, dim=-1), mean, atol=1e-5, rtol=0)
    meta = teacher.cache_meta("float16")
    assert (meta.serving_temperature, meta.logits_dtype, meta.teacher_fingerprint, meta.num_classes) == (
        t_s,
        "float16",
        teacher.fingerprint,
        CLASSES,
    )
    # The rule the cache records, so that the trainer need not parse the teacher's name.
    assert isinstance(teacher.combiner, ArithmeticMean) and meta.temperature_rule == "serving"


def test_uint8_with_device_preprocessing_equals_float_preprocessed_by_hand(files):
    weights = [str(files["root"] / "mlp0.sd.pt")]
    mean, std = parse_normalize("0.5,0.25")
    served = load_teacher(
        ["mlp-small"], weights=weights, device="cpu", input_shape=SHAPE, input_dtype="uint8", input_scale=1 / 16, normalize=(mean, std)
    )
    plain = load_teacher(["mlp-small"], weights=weights, device="cpu", input_shape=SHAPE)
    x = uint8_batch(7)
    by_hand = ((x.astype(np.float32) / 16 - 0.5) / 0.25).astype(np.float32)
    np.testing.assert_allclose(served.forward(x), plain.forward(by_hand), rtol=1e-5, atol=1e-5)
    assert served.contract.preprocessing == Preprocessing(scale=1 / 16, mean=(0.5,), std=(0.25,))


def test_per_channel_normalisation(tmp_path):
    shape = (3, 4, 4)
    model = random_model("cnn-small", seed=3, shape=shape)
    torch.save(model.state_dict(), tmp_path / "rgb.pt")
    normalize = parse_normalize("0.485/0.456/0.406,0.229/0.224/0.225")
    teacher = load_teacher(
        ["cnn-small"],
        weights=[str(tmp_path / "rgb.pt")],
        device="cpu",
        input_shape=shape,
        input_dtype="uint8",
        input_scale=1 / 255,
        normalize=normalize,
    )
    x = uint8_batch(3, shape=shape) * 15
    mean, std = (np.array(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in normalize)
    by_hand = torch.from_numpy(((x.astype(np.float32) / 255 - mean) / std).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(teacher.forward(x), model(by_hand).numpy(), rtol=1e-5, atol=1e-5)


def test_forward_checks_inputs_and_handles_edge_cases(files):
    teacher = load_teacher([str(files["root"] / "run/student.pt")], device="cpu")
    with pytest.raises(ValueError, match=r"inputs are float32, the teacher expects uint8"):
        teacher.forward(np.zeros((2, *SHAPE), dtype=np.float32))
    with pytest.raises(ValueError, match=r"inputs are \[2, 9, 9\], the teacher expects \[B, 8, 8\]"):
        teacher.forward(np.zeros((2, 9, 9), dtype=np.uint8))
    assert teacher.forward(np.zeros((0, *SHAPE), dtype=np.uint8)).shape == (0, CLASSES)
    x = uint8_batch(4)
    read_only = np.frombuffer(x.tobytes(), dtype=np.uint8).reshape(x.shape)  # as a request body decodes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(teacher.forward(read_only), teacher.forward(x))
    np.testing.assert_array_equal(teacher.forward(x[::-1]), teacher.forward(x)[::-1])
    teacher.warmup(16)
    summary = json.loads(json.dumps(teacher.describe()))
    assert summary["name"] == "cnn-small" and summary["fingerprint"] == teacher.fingerprint and summary["dtype"] == "float32"
    assert summary["contract"] == {"input_shape": [8, 8], "input_dtype": "uint8", "preprocessing": PREPROCESSING.to_dict()}
    assert (summary["members"], summary["ensemble"], summary["device"], summary["temperature"]) == (1, None, "cpu", 1.0)


def bad_cases(root: Path) -> list:
    r = str(root)
    return [
        ([f"{r}/missing.pt2"], [], {}, r"missing\.pt2: no such file"),
        ([f"{r}/missing.pt"], [], {}, r"missing\.pt: no such file"),
        ([f"{r}/garbage.pt2"], [], {}, r"garbage\.pt2: not a torch\.export program"),
        ([f"{r}/cnn.sd.pt"], [], {}, r"cnn\.sd\.pt: not a student\.pt written by offline-distill"),
        (["vit-huge"], [], {}, r"vit-huge: not a teacher spec; give a torch\.export program \(FILE\.pt2\).*module:factory"),
        (["cnn-small"], [], {}, r"cnn-small: needs a weights file"),
        ([f"{r}/run/student.pt"], [f"{r}/cnn.sd.pt"], {}, r"cnn\.sd\.pt: 1 weights files given but only 0 teacher"),
        (["cnn-small"], [f"{r}/nope.pt"], {}, r"nope\.pt: no such file"),
        (["cnn-small"], [f"{r}/pickled-module.pt"], {}, r"pickled-module\.pt: holds Python objects .*state_dict"),
        (
            ["cnn-small"],
            [f"{r}/mlp0.sd.pt"],
            {"input_shape": SHAPE, "num_classes": 10},
            r"cnn-small with .*mlp0\.sd\.pt: weights do not fit the model: missing 'features",
        ),
        (
            ["cnn-small"],
            [f"{r}/mlp0.sd.pt"],
            {"input_shape": SHAPE},
            r"mlp0\.sd\.pt: weights do not fit.*guessed 10 classes from 'net\.3\.bias'; pass num_classes",
        ),
        (["cnn-small"], [f"{r}/cnn.sd.pt"], {}, r"cnn-small with .*cnn\.sd\.pt: does not declare its input shape"),
        (
            ["mlp-small"],
            [f"{r}/mlp0.sd.pt"],
            {"input_shape": (9, 9)},
            r"mlp0\.sd\.pt: weights do not fit the model: 'net\.1\.weight' is \[32, 64\], the model has \[32, 81\]",
        ),
        (["mlp-small"], [f"{r}/run/student.pt"], {}, r"student\.pt: holds a 'cnn-small' model, but the teacher spec says 'mlp-small'"),
        (["no_such_module_kd:make"], [f"{r}/cnn.sd.pt"], {}, r"no_such_module_kd:make: cannot import no_such_module_kd"),
        (["kd_test_factories:missing"], [f"{r}/cnn.sd.pt"], {}, r"kd_test_factories:missing: kd_test_factories has no callable 'missing'"),
        (["kd_test_factories:not_a_module"], [f"{r}/cnn.sd.pt"], {}, r"not_a_module\(\) returned int, expected torch\.nn\.Module"),
        (
            # A factory taking (input_shape, num_classes) needs the shape from the weights or the options.
            ["kd_test_factories:needs_arguments"],
            [f"{r}/cnn.sd.pt"],
            {},
            r"kd_test_factories:needs_arguments with .*cnn\.sd\.pt: does not declare its input shape",
        ),
        (
            ["kd_test_factories:one_argument"],
            [f"{r}/cnn.sd.pt"],
            {},
            r"one_argument: its factory takes \(config\); a factory takes \(input_shape, num_classes\) or no arguments",
        ),
        (["kd_test_factories:broken"], [f"{r}/cnn.sd.pt"], {}, r"kd_test_factories:broken: calling broken\(\) failed \(RuntimeError: no"),
        (
            ["kd_test_factories:flat_output"],
            [f"{r}/flat.sd.pt"],
            {"input_shape": SHAPE},
            r"flat_output: returns \[20\] for a batch of 2, expected logits \[2, C\]",
        ),
        (
            ["kd_test_factories:make"],
            [f"{r}/cnn.wrapped.pt"],
            {"input_shape": (2, 2, 2)},
            r"kd_test_factories:make: forward pass on inputs \[2, 2, 2, 2\] failed",
        ),
        (
            ["mlp-small", "mlp-small"],
            [f"{r}/mlp0.sd.pt", f"{r}/mlp-7.sd.pt"],
            {"input_shape": SHAPE},
            r"mlp-small \(--teacher 2\): returns 7 classes, but mlp-small \(--teacher 1\) returns 10; all members",
        ),
        ([f"{r}/run/student.pt", "mlp-small"], [f"{r}/mlp0.sd.pt"], {}, r"mlp-small with .*mlp0\.sd\.pt: does not declare its input shape"),
        (
            ["mlp-small", f"{r}/run/student.pt"],
            [f"{r}/mlp0.sd.pt"],
            {"input_shape": SHAPE},
            r"student\.pt: input_dtype is 'uint8', but mlp-small has 'float32'; all members",
        ),
        ([f"{r}/run/student.pt"], [], {"num_classes": 7}, r"student\.pt: declares 10 classes, not the 7 given as num_classes$"),
        (
            [f"{r}/run/student.pt"],
            [],
            {"normalize": ((0.1, 0.2), (1.0,))},
            r"student\.pt: preprocessing mean has 2 values; expected 1 or one per channel \(8",
        ),
        ([f"{r}/run/student.pt"], [], {"ensemble": "median"}, r"ensemble 'median': expected one of geometric, arithmetic"),
        ([f"{r}/run/student.pt"], [], {"dtype": "int8"}, r"dtype 'int8': expected auto, float32, bfloat16, float16"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases(Path("/")))))
def test_bad_specs_are_explained_in_one_line(files, factories, case):
    specs, weights, options, message = bad_cases(files["root"])[case]
    options = {"device": "cpu", **options}
    with pytest.raises(TeacherError, match=message) as caught:
        load_teacher(specs, weights=weights, **options)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_cuda_is_refused_and_auto_means_cpu_float32(files):
    with pytest.raises(TeacherError, match=r"device 'cuda': CUDA is not available"):
        load_teacher([str(files["root"] / "run/student.pt")], device="cuda")
    teacher = load_teacher([str(files["root"] / "run/student.pt")])
    assert (teacher.device, teacher.compute_dtype) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5,0.25", ((0.5,), (0.25,))),
        ("0.485/0.456/0.406,0.229/0.224/0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("0,1/2/3", ((0.0,), (1.0, 2.0, 3.0))),
    ],
)
def test_parse_normalize(text, expected):
    assert parse_normalize(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5", "expected MEAN,STD"),
        ("a,b", "expected MEAN,STD"),
        ("0,0", "std must not contain 0"),
        ("1/2,1/2/3", "2 means but 3 stds"),
        ("nan,1", "finite"),
    ],
)
def test_parse_normalize_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_normalize(text)


def test_serves_the_digits_teacher_with_the_fingerprint_its_caches_record(digits_teacher, tmp_path):
    torch.save(digits_teacher["teacher"].state_dict(), tmp_path / "teacher.pt")
    teacher = load_teacher(["mlp-teacher"], weights=[str(tmp_path / "teacher.pt")], device="cpu", **UINT8_SCALED)
    assert teacher.fingerprint == digits_teacher["fingerprint"]
    np.testing.assert_allclose(teacher.forward(digits_teacher["x_test"]), digits_teacher["logits_test"], rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_on_the_cpu_returns_float32_close_to_float32(files):
    """The autocast path of the CUDA test below, on the CPU: runs without a GPU."""
    x = uint8_batch(16)
    for spec in ("run/student.pt", "run/student.pt2"):
        exact = load_teacher([str(files["root"] / spec)], device="cpu")
        fast = load_teacher([str(files["root"] / spec)], device="cpu", dtype="bfloat16")
        assert (exact.compute_dtype, fast.compute_dtype, fast.describe()["dtype"]) == (torch.float32, torch.bfloat16, "bfloat16")
        logits = fast.forward(x)
        assert logits.dtype == np.float32 and logits.flags.c_contiguous
        expected = exact.forward(x)
        np.testing.assert_allclose(logits, expected, atol=0.05 * float(np.abs(expected).max()), rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_autocast_is_close_to_cpu_float32(files):
    root = files["root"]
    x = uint8_batch(64)
    for specs, weights, options in (
        ([str(root / "run/student.pt")], [], {}),
        ([str(root / "run/student.pt2")], [], {}),
        (
            ["mlp-small"] * 3,
            [str(root / f"mlp{i}.sd.pt") for i in range(3)],
            {**UINT8_SCALED, "ensemble": "arithmetic", "temperature": 2.0},
        ),
    ):
        on_cpu = load_teacher(specs, weights=weights, device="cpu", **options)
        on_gpu = load_teacher(specs, weights=weights, device="cuda", dtype="bfloat16", **options)
        assert on_gpu.device.type == "cuda" and on_gpu.compute_dtype == torch.bfloat16 and on_gpu.fingerprint == on_cpu.fingerprint
        on_gpu.warmup(32)
        expected, logits = on_cpu.forward(x), on_gpu.forward(x)
        assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.flags.c_contiguous
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(logits, expected, atol=0.05 * scale + 0.02, rtol=0)
    assert load_teacher([str(root / "run/student.pt")], device="auto").device.type == "cuda"
