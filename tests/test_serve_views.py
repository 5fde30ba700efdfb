"""teacher-serve --views V --augment POLICY, end to end: a real server on a loopback port makes
V views of each pushed sample on its device, caches them with their seeds, answers [B, V, C],
and offline-distill trains on the views with no further option."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import BIN, small_float_teacher

from kdcache.offline.cache import CacheReader
from kdcache.offline.cache.views import parse_policy, view_seeds
from kdcache.service.client import TeacherClient
from kdcache.service.launch import ServeProcess

SHAPE, CLASSES, VIEWS, POLICY = (1, 28, 28), 10, 30, "random-crop:3"


@pytest.fixture(scope="module")
def float_teacher(tmp_path_factory):
    """A small float32 [1, 28, 28] teacher saved as a student.pt record."""
    return small_float_teacher(tmp_path_factory.mktemp("teacher"), SHAPE, CLASSES)


def transfer_set(path, n: int = 48):
    rng = np.random.default_rng(0)
    x = rng.random((n, *SHAPE), dtype=np.float32)
    np.savez(path, inputs=x, labels=rng.integers(0, CLASSES, n), ids=np.array([f"img-{i}" for i in range(n)]))
    return x


@pytest.mark.slow
def test_views_are_served_cached_with_their_seeds_and_distilled(tmp_path, float_teacher):
    model, teacher_pt = float_teacher
    x = transfer_set(tmp_path / "transfer.npz")
    cache = tmp_path / "cache"
    args = ["--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu", "--views", str(VIEWS), "--augment", POLICY]
    with ServeProcess(args, tmp_path / "serve.log") as server:
        server.wait_ready()
        push = subprocess.run(
            [str(BIN / "teacher-push"), "--url", server.url, "--data", str(tmp_path / "transfer.npz"), "--batch-size", "16"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr
        with TeacherClient(server.url) as client:
            answer = client.infer(x[:3], ids=["img-0", "img-1", "img-2"], outputs=("soft_targets", "logits"))
        assert answer.logits.shape == (3, VIEWS, CLASSES) and answer.cache_hits == 3
        np.testing.assert_allclose(answer.soft_targets.sum(-1), 1.0, rtol=1e-5)
        metadata = json.loads(
            subprocess.run(["curl", "-s", f"{server.url}/v2/models/teacher"], capture_output=True, text=True).stdout or "{}"
        )
        if metadata:
            assert {o["name"]: o["shape"] for o in metadata["outputs"]}["logits"] == [-1, VIEWS, CLASSES]
        assert server.stop() == 0

    reader = CacheReader(cache)
    assert reader.meta.views_per_id == VIEWS and reader.meta.augment == parse_policy(POLICY).describe()
    stored = reader.read(("ids", "inputs", "view_seeds", "logits"))
    order = np.argsort([int(i.split("-")[1]) for i in stored["ids"]])
    np.testing.assert_array_equal(stored["inputs"][order], x)  # the original, once
    np.testing.assert_array_equal(stored["view_seeds"][order], view_seeds(0, [f"img-{i}" for i in range(len(x))], VIEWS))
    # Each stored view's logits are the teacher's on that view, replayed here from its seed.
    policy = parse_policy(POLICY)
    with torch.no_grad():
        for v in (0, 7, VIEWS - 1):
            replayed = policy(torch.from_numpy(x), torch.from_numpy(stored["view_seeds"][order][:, v]))
            np.testing.assert_allclose(stored["logits"][order][:, v], model(replayed).numpy(), rtol=1e-5, atol=1e-5)
    # The views differ: a crop of up to 3 pixels moves the logits.
    assert np.abs(stored["logits"][:, 0] - stored["logits"][:, 1]).max() > 1e-3

    inspect = subprocess.run([str(BIN / "cache-inspect"), str(cache)], capture_output=True, text=True, check=True).stdout
    assert f"{VIEWS} per sample" in inspect and "random-crop (padding=3)" in inspect
    run = subprocess.run(
        [str(BIN / "offline-distill"), "--cache", str(cache), "--epochs", "30", "--student", "mlp-small", "--out", str(tmp_path / "run"),
         "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_samples"] == 30 * len(x)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--views", "0"], "views"),
        (["--views", "3"], "--views 3 needs --augment POLICY"),
        (["--augment", "random-crop:1"], "--augment random-crop:1 needs --views V with V >= 2"),  # one cropped copy, never the original
        (["--views", "1", "--augment", "random-crop:1"], "--augment random-crop:1 needs --views V with V >= 2"),
        (["--views", "3", "--augment", "random-blur:2"], "--augment: unknown augmentation policy 'random-blur:2'"),
        (["--views", "3", "--augment", "random-crop:x"], "--augment: random-crop:x: the padding must be a whole number"),
        (["--views", "3", "--augment", "random-crop:40"], "--augment"),
        (["--views", "3", "--augment", "no_such_module_xyz:make"], "--augment: no_such_module_xyz:make: cannot import"),
    ],
)
def test_bad_views_options_are_refused_in_one_line_and_write_nothing(tmp_path, float_teacher, extra, message):
    _, teacher_pt = float_teacher
    cache = tmp_path / "cache"
    result = subprocess.run(
        [str(BIN / "teacher-serve"), "--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu", *extra],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines and message in lines[-1] and "Traceback" not in result.stderr, result.stderr
    assert not cache.exists()


def test_a_restart_takes_the_views_and_other_views_are_refused(tmp_path, float_teacher):
    _, teacher_pt = float_teacher
    cache = tmp_path / "cache"
    base = [str(BIN / "teacher-serve"), "--teacher", str(teacher_pt), "--cache", str(cache), "--device", "cpu"]
    with ServeProcess(base[1:] + ["--views", "2", "--augment", "random-crop:1"], tmp_path / "serve.log", command=base[:1]) as server:
        server.wait_ready()
        assert server.stop() == 0
    with ServeProcess(base[1:], tmp_path / "serve2.log", command=base[:1]) as server:
        server.wait_ready()  # the views, the policy and the salt are the cache's
        assert server.stop() == 0
    assert "--views 2 --augment random-crop:1 --view-salt 0" in server.output()
    for other, given in (
        (["--views", "3", "--augment", "random-crop:1"], "--views 3"),
        (["--views", "2", "--augment", "random-crop-flip:1"], "--augment random-crop-flip:1"),
    ):
        result = subprocess.run([*base, *other], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(f"teacher-serve: error: {given} disagrees with the cache"), result.stderr
