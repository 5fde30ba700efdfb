"""offline-distill end to end: real processes on a real cache of digits teacher outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import BIN
from digits import PREPROCESSING

from kdcache.offline import models

DISTILL = str(BIN / "offline-distill")


def distill(*args, check=True, timeout=300):
    proc = subprocess.run([DISTILL, "--no-progress", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"offline-distill failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_distilled_student_beats_labels_alone(digits_files, tmp_path):
    """The paper's section 6: few labels, soft targets for everything. Same student, seed, epochs."""
    common = ["--cache", digits_files["cache_few_labels"], "--student", "mlp-small", "--epochs", "15", "--batch-size", "64",
              "--lr", "3e-3", "--temperature", "4", "--eval", digits_files["eval"], "--seed", "0"]  # fmt: skip
    distill(*common, "--alpha", "0.9", "--out", tmp_path / "kd")
    distill(*common, "--alpha", "0", "--out", tmp_path / "labels", "--no-export")
    kd = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    labels_only = json.loads((tmp_path / "labels" / "metrics.json").read_text())
    assert kd["eval_accuracy"] > labels_only["eval_accuracy"] + 0.02, (kd["eval_accuracy"], labels_only["eval_accuracy"])

    for key in ("eval_accuracy", "student_params", "epochs", "train_samples_per_s", "teacher_fingerprint", "temperature", "alpha"):
        assert kd[key] is not None, key
    assert kd["epochs"] == 15 and kd["alpha"] == 0.9 and kd["temperature"] == 4.0
    lines = (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 16))
    assert (tmp_path / "kd" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # student.pt rebuilds the model with weights_only=True and reproduces the eval accuracy
    record = torch.load(tmp_path / "kd" / "student.pt", weights_only=True)
    student = models.build(record["arch"], record["input_shape"], record["num_classes"])
    student.load_state_dict(record["state_dict"])
    student.eval()
    data = np.load(digits_files["eval"])
    with torch.no_grad():
        x = PREPROCESSING.apply(torch.from_numpy(data["inputs"]))
        logits = student(x)
    accuracy = (logits.argmax(-1).numpy() == data["labels"]).mean()
    assert accuracy == pytest.approx(kd["eval_accuracy"])
    # student.pt2 is the same function, for any batch size
    program = torch.export.load(tmp_path / "kd" / "student.pt2")
    torch.testing.assert_close(program.module()(x), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(program.module()(x[:1]), logits[:1], rtol=1e-4, atol=1e-4)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(digits_files, tmp_path):
    common = ["--cache", digits_files["cache"], "--student", "mlp", "--epochs", "6", "--batch-size", "16",
              "--eval", digits_files["eval"], "--seed", "3", "--no-export"]  # fmt: skip
    distill(*common, "--out", tmp_path / "straight")

    out = tmp_path / "interrupted"
    proc = subprocess.Popen([DISTILL, "--no-progress", *map(str, common), "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    # Without --resume the run directory is protected
    refused = distill(*common, "--out", out, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = distill(*common, "--out", out, "--resume")
    assert "resuming" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "student.pt", weights_only=True)
    b = torch.load(out / "student.pt", weights_only=True)
    assert same_weights(a["state_dict"], b["state_dict"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))


@pytest.mark.slow
def test_ddp_two_cpu_processes(digits_files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdcache.offline.cli",
         "--cache", str(digits_files["cache"]), "--student", "mlp", "--epochs", "4", "--batch-size", "32", "--lr", "5e-3",
         "--eval", str(digits_files["eval"]), "--out", str(tmp_path / "ddp"), "--no-progress", "--no-export", "--workers", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert summary["world_size"] == 2
    history = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert all(h["samples"] == 1257 for h in history), [h["samples"] for h in history]  # every sample once per epoch
    assert summary["eval_accuracy"] > 0.8, summary


def make_flat_cache(tmp_path):
    from digits import write_cache

    rng = np.random.default_rng(0)
    x = rng.random((40, 64)).astype(np.float32)
    return write_cache(tmp_path / "flat", x, rng.normal(size=(40, 10)).astype(np.float32), rng.integers(0, 10, 40))


BAD_INPUTS = {
    "missing directory": (lambda t, f: ["--cache", t / "nope"], "no such cache directory"),
    "empty directory": (lambda t, f: ["--cache", (t / "empty").mkdir() or t / "empty"], "empty cache directory"),
    "student does not fit": (lambda t, f: ["--cache", make_flat_cache(t), "--student", "cnn-small"], "needs image inputs"),
    "unknown student": (lambda t, f: ["--cache", f["cache"], "--student", "vit-huge"], "unknown model"),
    "eval of the wrong shape": (
        lambda t, f: ["--cache", f["cache"], "--eval", np.savez(t / "e.npz", inputs=np.zeros((5, 9, 9)), labels=np.zeros(5, int)) or t / "e.npz"],
        "sample shape [9, 9]",
    ),
    "eval without labels": (lambda t, f: ["--cache", f["cache"], "--eval", np.savez(t / "e.npz", inputs=np.zeros((5, 8, 8))) or t / "e.npz"], "labels"),
    "eval file missing": (lambda t, f: ["--cache", f["cache"], "--eval", t / "none.npz"], "no such file"),
    "alpha out of range": (lambda t, f: ["--cache", f["cache"], "--alpha", "1.5"], "--alpha must lie in [0, 1]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_error(case, digits_files, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    proc = distill(*make_args(tmp_path, digits_files), "--out", tmp_path / "run", "--epochs", "1", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("offline-distill: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
