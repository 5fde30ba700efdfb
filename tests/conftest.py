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
