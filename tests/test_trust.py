"""Consent before code (issue 20, defect 1): code named inside a file (a cache's augment policy, a
student.pt's arch) is imported only with --trust-code, and a refusal imports nothing; code named
on the command line is trusted as given; checkpoint.pt and every other torch.load read data only.

The user module below writes a marker file beside itself when it is imported, so that "imported
nothing" is checked on the file system (and in ``sys.modules`` in process)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.cache.trust import UntrustedCode
from kdcache.offline.outputs import Checkpoint, CheckpointError

ROOT = Path(__file__).resolve().parent.parent
MODULE = "kd_trust_probe"
MARKER = "imported.marker"
PROBE = f"""
import pathlib

import torch

pathlib.Path(__file__).with_name({MARKER!r}).write_text("imported")


def views():
    return lambda inputs, seeds: inputs.clone()


def student(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
"""
SHAPE, CLASSES, VIEWS, N = (8, 8), 5, 2, 48
PREPROCESSING = Preprocessing(scale=1 / 16)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A user module in its own folder (on sys.path here, PYTHONPATH for a subprocess): the folder."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(PROBE)
    sys.modules.pop(MODULE, None)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    yield folder
    sys.modules.pop(MODULE, None)


def imported(folder: Path) -> bool:
    return (folder / MARKER).exists()


def write_cache(directory: Path, policy: str | None, views: int = VIEWS) -> Path:
    """A tiny cache whose manifest names ``policy`` as its augment policy, written without
    importing it: the record is data, and the logits need not be the policy's."""
    augment = None if policy is None else {"name": policy, "params": {}, "version": 1}
    meta = CacheMeta("ab" * 32, "trust-test", CLASSES, SHAPE, "uint8", PREPROCESSING, views_per_id=views, augment=augment)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(N, *SHAPE)).astype(np.uint8)
    logits = rng.normal(size=(N, views, CLASSES) if views > 1 else (N, CLASSES)).astype(np.float32)
    with CacheWriter(directory, meta) as writer:
        writer.append(np.array([f"s{i}" for i in range(N)], dtype=object), x, logits, rng.integers(0, CLASSES, size=N))
    return directory


def run(command: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_refusal(proc: subprocess.CompletedProcess, command: str, module: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), proc.stderr
    assert f"(module {module})" in lines[0] and "--trust-code" in lines[0], lines[0]
    return lines[0]


# ---- a cache's augment policy


@pytest.mark.slow
def test_offline_distill_refuses_a_cache_whose_policy_is_code_and_trains_with_trust_code(probe, tmp_path):
    """Done-when 1."""
    cache = write_cache(tmp_path / "c", f"{MODULE}:views")
    common = ["--cache", cache, "--epochs", "1", "--batch-size", "16", "--no-export", "--no-progress"]
    refused = run("offline-distill", *common, "--out", tmp_path / "refused")
    line = one_line_refusal(refused, "offline-distill", MODULE)
    assert f"{cache}/manifest.json names code to import: the augment policy {MODULE}:views" in line
    assert not imported(probe) and not (tmp_path / "refused").exists()

    trusted = run("offline-distill", *common, "--out", tmp_path / "trusted", "--trust-code")
    assert trusted.returncode == 0, trusted.stderr
    assert imported(probe) and (tmp_path / "trusted" / "student.pt").is_file()


@pytest.mark.slow
def test_a_policy_named_os_abort_is_refused_in_one_line_not_run(tmp_path):
    cache = write_cache(tmp_path / "c", "os:abort")
    refused = run("offline-distill", "--cache", cache, "--epochs", "1", "--no-progress", "--out", tmp_path / "run")
    one_line_refusal(refused, "offline-distill", "os")  # not SIGABRT (-6)
    assert not (tmp_path / "run").exists()


def test_the_stream_refuses_before_importing(probe, tmp_path):
    from kdcache.offline.dataset import ShardStream

    reader = CacheReader(write_cache(tmp_path / "c", f"{MODULE}:views"))
    with pytest.raises(UntrustedCode, match=r"manifest\.json names code to import: .*; pass --trust-code"):
        ShardStream.from_readers([reader], reader.meta, batch_size=8)
    assert MODULE not in sys.modules and not imported(probe)
    stream = ShardStream.from_readers([reader], reader.meta, batch_size=8, trust_code=True)
    assert stream.policy.describe()["name"] == f"{MODULE}:views" and MODULE in sys.modules and imported(probe)


def test_built_in_policies_need_no_consent(tmp_path):
    from kdcache.offline.dataset import ShardStream

    reader = CacheReader(write_cache(tmp_path / "c", "random-resized-crop"))
    assert ShardStream.from_readers([reader], reader.meta, batch_size=8).policy.describe()["name"] == "random-resized-crop"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cache-inspect", "cache-convert"])
def test_inspect_and_convert_take_the_flag_and_never_import_a_policy(command, probe, tmp_path):
    """Both read the policy's record as data: with or without --trust-code nothing is imported."""
    cache = write_cache(tmp_path / "c", f"{MODULE}:views")
    for n, flags in enumerate(([], ["--trust-code"])):
        if command == "cache-inspect":
            proc = run(command, cache, "--verify", *flags)
            assert proc.returncode == 0 and f"policy {MODULE}:views" in proc.stdout, proc.stderr
        else:
            proc = run(command, cache, tmp_path / f"topk{n}", "--targets", "topk:2", "--no-progress", *flags)
            assert proc.returncode == 0, proc.stderr
            assert CacheReader(tmp_path / f"topk{n}").meta.augment["name"] == f"{MODULE}:views"
        assert not imported(probe)


def test_teacher_serve_takes_a_recorded_policy_of_code_only_with_trust_code(monkeypatch):
    from kdcache.service.cli import load_settings
    from kdcache.service.settings import take_from_cache

    meta = CacheMeta(
        "f" * 64, "t.pt2", CLASSES, SHAPE, "uint8", views_per_id=2, augment={"name": "mine.views:crop", "params": {}, "version": 1}
    )
    with pytest.raises(
        UntrustedCode,
        match=r"the cache c/ names code to import: the augment policy mine\.views:crop .*--trust-code.*; or give --augment mine\.views:crop",
    ):
        take_from_cache(load_settings(["--teacher", "t.pt2", "--cache", "c"]), meta, "c/")
    settings, taken = take_from_cache(load_settings(["--teacher", "t.pt2", "--cache", "c", "--trust-code"]), meta, "c/")
    assert settings.augment == "mine.views:crop" and "--augment mine.views:crop" in taken
    monkeypatch.setenv("TEACHER_SERVE_TRUST_CODE", "1")
    assert load_settings(["--teacher", "t.pt2", "--cache", "c"]).trust_code is True


# ---- a student.pt's arch


def write_student(path: Path, arch: str) -> Path:
    """A student.pt naming ``arch``, written without importing it."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES))
    meta = CacheMeta("0" * 64, "trust-test", CLASSES, SHAPE, "uint8", PREPROCESSING)
    torch.save(models.student_record(arch, model, meta, temperature=1.0, alpha=1.0), path)
    return path


def test_a_student_pt_naming_code_is_loaded_only_with_trust_code(probe, tmp_path):
    from kdcache.service.teacher import load_teacher

    student_pt = write_student(tmp_path / "student.pt", f"{MODULE}:student")
    with pytest.raises(UntrustedCode, match=rf"student\.pt names code to import: the architecture {MODULE}:student .*--trust-code"):
        load_teacher([str(student_pt)], device="cpu")
    assert MODULE not in sys.modules and not imported(probe)
    assert load_teacher([str(student_pt)], device="cpu", trust_code=True).num_classes == CLASSES
    assert imported(probe)


def test_the_same_arch_named_on_the_command_line_is_trusted_as_given(probe, tmp_path):
    from kdcache.service.teacher import load_teacher

    student_pt = write_student(tmp_path / "student.pt", f"{MODULE}:student")
    assert load_teacher([f"{MODULE}:student"], weights=[str(student_pt)], device="cpu").num_classes == CLASSES
    assert imported(probe)


@pytest.mark.slow
def test_teacher_serve_refuses_a_student_pt_whose_arch_is_os_abort(tmp_path):
    student_pt = write_student(tmp_path / "abort.pt", "os:abort")
    refused = run("teacher-serve", "--teacher", student_pt, "--cache", tmp_path / "c", "--device", "cpu", "--port", "0")
    line = one_line_refusal(refused, "teacher-serve", "os")  # not SIGABRT (-6)
    assert f"{student_pt} names code to import: the architecture os:abort" in line
    assert not (tmp_path / "c").exists()


def test_built_in_archs_in_a_student_pt_need_no_consent(tmp_path):
    from kdcache.service.teacher import load_teacher

    model = models.build("mlp-small", SHAPE, CLASSES)
    meta = CacheMeta("0" * 64, "trust-test", CLASSES, SHAPE, "uint8", PREPROCESSING)
    torch.save(models.student_record("mlp-small", model, meta, temperature=1.0, alpha=1.0), tmp_path / "s.pt")
    assert load_teacher([str(tmp_path / "s.pt")], device="cpu").num_classes == CLASSES


# ---- the checkpoint, and every torch.load


class WritesAFile:
    """Unpickled, it opens (creates) a file: what weights_only=False would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_is_read_as_data_only(tmp_path):
    torch.save({"model": {}, "history": [WritesAFile(tmp_path / "ran")]}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: holds Python objects that torch\.load\(weights_only=True\) refuses"):
        Checkpoint.load(tmp_path / "checkpoint.pt", torch.device("cpu"))
    assert not (tmp_path / "ran").exists()


def test_a_real_checkpoint_round_trips_with_weights_only(tmp_path):
    from kdcache.offline.train import TrainConfig, lr_factor

    student = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    student(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor("cosine", step, 10))
    cfg = TrainConfig(caches=["c"], epochs=2, batch_size=4, lr=0.1, schedule="cosine")
    history = [{"epoch": 1, "train_loss": 0.5, "eval_accuracy": None, "lr": 0.1}]
    cpu = torch.device("cpu")
    Checkpoint.capture(student, optimizer, scheduler, cpu, 1, history, cfg).save(tmp_path / "checkpoint.pt")
    rng = torch.get_rng_state()
    torch.rand(5)
    loaded = Checkpoint.load(tmp_path / "checkpoint.pt", cpu)
    assert loaded.epoch == 1 and loaded.history == history and loaded.config["student"] == "mlp"
    loaded.restore(student, optimizer, scheduler, cpu)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_holding_code(tmp_path):
    cache = write_cache(tmp_path / "c", None, views=1)
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "history": [WritesAFile(tmp_path / "ran")]}, out / "checkpoint.pt")
    refused = run("offline-distill", "--cache", cache, "--epochs", "1", "--no-progress", "--out", out, "--resume")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "weights_only=True" in refused.stderr and not (tmp_path / "ran").exists()


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def project_sources() -> list[Path]:
    return sorted(p for folder in ("offline", "service", "demo", "bench", "tests") for p in (ROOT / folder).rglob("*.py"))


def test_every_torch_load_reads_weights_only():
    unsafe = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in project_sources()
        for node, name in calls(path)
        if name == "torch.load"
        and not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
    ]
    assert unsafe == []


def test_code_is_imported_by_name_only_in_the_trust_module():
    """importlib with a computed name appears only where consent is asked (and in the cache
    package's lazy attributes, whose names are constants there, and this suite's help test)."""
    allowed = {"offline/cache/trust.py", "offline/cache/__init__.py", "tests/test_cli_help.py"}
    found = {
        str(path.relative_to(ROOT))
        for path in project_sources()
        for node, name in calls(path)
        if name in ("importlib.import_module", "import_module", "__import__") and not isinstance(node.args[0], ast.Constant)
    }
    assert found <= allowed, sorted(found - allowed)
    assert "offline/cache/trust.py" in found
