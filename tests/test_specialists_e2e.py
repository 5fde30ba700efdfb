"""Issue 21's "Done when", as processes: ``cache-inspect --clusters 2 --json``, a generalist and
one specialist per cluster with ``offline-distill --specialist @clusters.json:k --init``, then
``teacher-serve`` with the three student.pt files and ``--ensemble specialists`` answers q (the
same as the combination in process), records the combined teacher, and refuses bad setups in
one line."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import BIN
from test_specialist import SHAPE, T_S, C

from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.service.client import TeacherClient
from kdcache.service.launch import ServeProcess
from kdcache.service.teacher import load_teacher

pytestmark = pytest.mark.slow


def write_cache(directory, rows: int = 300):
    """Inputs whose class (i % C) shows in them, and a teacher that confuses classes 0-2 among
    themselves and 3-5 among themselves."""
    rng = np.random.default_rng(0)
    top = np.arange(rows) % C
    x = rng.random((rows, *SHAPE), dtype=np.float32)
    x[:, 0] += top
    logits = rng.normal(size=(rows, C)).astype(np.float32)
    logits[np.arange(rows), top] += 4.0
    logits[np.arange(rows)[:, None], (top // 3 * 3)[:, None] + np.arange(3)] += 2.0
    meta = CacheMeta("e" * 64, "t", C, SHAPE, "float32", serving_temperature=T_S)
    with CacheWriter(directory, meta) as writer:
        writer.append([f"s{i}" for i in range(rows)], x, logits, top)
    return directory


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("specialists")
    cache = write_cache(root / "cache")
    inspect = tool("cache-inspect", cache, "--clusters", 2, "--json")
    assert inspect.returncode == 0, inspect.stderr
    (root / "clusters.json").write_text(inspect.stdout)
    common = ("--epochs", 2, "--no-progress", "--no-export", "--student", "mlp-small")
    done = tool("offline-distill", "--cache", cache, "--out", root / "generalist", *common)
    assert done.returncode == 0, done.stderr
    for k in (0, 1):
        args = ("--specialist", f"@{root / 'clusters.json'}:{k}", "--init", root / "generalist" / "student.pt")
        done = tool("offline-distill", "--cache", cache, *args, "--out", root / f"s{k}", *common)
        assert done.returncode == 0, done.stderr
    clusters = json.loads(inspect.stdout)["clusters"]
    assert sorted(map(sorted, clusters)) == [[0, 1, 2], [3, 4, 5]]  # the confusable groups
    return root, clusters


def test_teacher_serve_answers_the_combination_of_a_generalist_and_its_specialists(runs, tmp_path):
    root, clusters = runs
    specs = [str(root / "generalist" / "student.pt"), str(root / "s0" / "student.pt"), str(root / "s1" / "student.pt")]
    args = [a for spec in specs for a in ("--teacher", spec)]
    x = np.random.default_rng(1).random((12, 4), dtype=np.float32)
    served = tmp_path / "served"
    with ServeProcess(
        [*args, "--ensemble", "specialists", "--cache", str(served), "--device", "cpu", "--temperature", str(T_S)], tmp_path / "serve.log"
    ) as server:
        server.wait_ready()
        with TeacherClient(server.url) as client:
            answer = client.infer(x, ids=[f"x{i}" for i in range(len(x))], outputs=("soft_targets",))
    teacher = load_teacher(specs, ensemble="specialists", temperature=T_S, device="cpu")
    expected = torch.softmax(torch.from_numpy(teacher.forward(x)) / T_S, dim=-1).numpy()
    np.testing.assert_allclose(answer.soft_targets, expected, atol=1e-6)
    alone = torch.softmax(torch.from_numpy(load_teacher(specs[:1], temperature=T_S, device="cpu").forward(x)) / T_S, dim=-1).numpy()
    assert np.abs(answer.soft_targets - alone).max() > 1e-3  # the specialists changed the answer
    meta = CacheReader(served).meta
    assert meta.teacher_name.startswith("ensemble-specialists(mlp-small,mlp-small[")
    assert meta.temperature_rule == "serving" and meta.num_classes == C
    assert [list(c) for c in teacher.combiner.clusters] == clusters


@pytest.mark.parametrize(
    "order, message",
    [
        (("s0", "generalist", "s1"), "the generalist (the first --teacher) is a specialist"),
        (("generalist", "generalist"), "a specialist needs its cluster"),
        (("generalist", "s0", "s0"), "overlapping clusters"),
    ],
)
def test_bad_setups_are_refused_in_one_line(runs, tmp_path, order, message):
    root, _ = runs
    args = [a for name in order for a in ("--teacher", str(root / name / "student.pt"))]
    done = tool("teacher-serve", *args, "--ensemble", "specialists", "--cache", tmp_path / "c", "--device", "cpu", "--port", "0")
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "c").exists()


def test_a_specialist_alone_is_refused(runs, tmp_path):
    root, _ = runs
    done = tool("teacher-serve", "--teacher", root / "s0" / "student.pt", "--cache", tmp_path / "c", "--device", "cpu", "--port", "0")
    assert done.returncode == 2 and "serve it after its generalist with --ensemble specialists" in done.stderr, done.stderr
