"""Shared fixtures: a digits teacher trained once per session and the cache it writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import digits  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_teacher() -> dict:
    """A teacher trained on the digits train split, its logits, and the split itself."""
    split = digits.load_split()
    teacher = digits.train_teacher(split["x_train"], split["y_train"], arch="mlp-teacher", epochs=15)
    return {
        **split,
        "teacher": teacher,
        "fingerprint": digits.fingerprint(teacher),
        "logits_train": digits.teacher_logits(teacher, split["x_train"]),
        "logits_test": digits.teacher_logits(teacher, split["x_test"]),
    }


@pytest.fixture(scope="session")
def digits_files(digits_teacher, tmp_path_factory) -> dict:
    """A cache of the teacher's logits in which 10% of the train split keeps its label (the
    paper's section 6 setting), the fully labelled cache, and the held-out eval .npz."""
    root = tmp_path_factory.mktemp("digits")
    t = digits_teacher
    rng = np.random.default_rng(0)
    few = t["y_train"].copy()
    few[rng.random(len(few)) > 0.1] = -1
    eval_path = root / "eval.npz"
    np.savez(eval_path, inputs=t["x_test"], labels=t["y_test"])
    return {
        "cache_few_labels": digits.write_cache(root / "few", t["x_train"], t["logits_train"], few, teacher_fingerprint=t["fingerprint"]),
        "cache": digits.write_cache(root / "all", t["x_train"], t["logits_train"], t["y_train"], teacher_fingerprint=t["fingerprint"]),
        "eval": eval_path,
    }


def small_float_teacher(directory: Path, shape: tuple[int, ...], classes: int):
    """A seeded ``mlp-small`` on float32 samples of ``shape``, saved as a student.pt record in
    ``directory``: (the model, the file teacher-serve loads)."""
    import torch

    from kdcache.offline import models
    from kdcache.offline.cache import CacheMeta

    torch.manual_seed(0)
    model = models.build("mlp-small", shape, classes).eval()
    meta = CacheMeta("0" * 64, "mlp-small", classes, shape, "float32")
    path = directory / "teacher.pt"
    torch.save(models.student_record("mlp-small", model, meta, temperature=1.0, alpha=1.0), path)
    return model, path


def save_teacher_record(model, path: Path, arch: str = "mlp-teacher") -> Path:
    """Save a digits model the way offline-distill saves a student, which teacher-serve loads."""
    import torch

    record = {
        "format": "kd-student", "version": 1, "arch": arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_classes": 10, "input_shape": [8, 8], "input_dtype": "uint8",
        "preprocessing": digits.PREPROCESSING.to_dict(),
    }  # fmt: skip
    torch.save(record, path)
    return path


@pytest.fixture(scope="session")
def digits_teacher_pt(digits_teacher, tmp_path_factory) -> Path:
    """The digits teacher as a file that ``teacher-serve --teacher`` takes."""
    return save_teacher_record(digits_teacher["teacher"], tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def second_teacher_pt(tmp_path_factory) -> Path:
    """Another digits-shaped teacher (briefly trained, different seed) for ensemble tests."""
    split = digits.load_split()
    model = digits.train_teacher(split["x_train"], split["y_train"], arch="mlp-teacher", epochs=2, seed=1)
    return save_teacher_record(model, tmp_path_factory.mktemp("teacher2") / "teacher2.pt")


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 16 MiB tmpfs, where this machine lets the tests mount one (root on Linux)."""
    import subprocess

    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
