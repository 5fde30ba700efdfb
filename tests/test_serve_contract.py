"""teacher-serve on an existing cache, end to end with real processes: a restart given only
``--teacher`` and ``--cache`` takes the input contract and the rest of what the cache records,
and a re-push is all hits; a flag that disagrees with the cache, or another teacher, is refused;
a port in use is refused before the cache directory is touched. The rules themselves
(``settings.take_from_cache``) are checked in process."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN

from kdcache.offline import models
from kdcache.offline.cache import CacheMeta, CacheReader, Preprocessing
from kdcache.service.cli import load_settings
from kdcache.service.launch import ServeProcess, free_port
from kdcache.service.settings import CacheConflict, take_from_cache

SHAPE, CLASSES, N = (1, 8, 8), 10, 40


def export_teacher(path: Path, seed: int = 0) -> Path:
    """A float teacher as a plain torch.export program (no input spec file): served on uint8
    images it needs --input-dtype uint8 --input-scale 1/255."""
    torch.manual_seed(seed)
    model = models.build("mlp-small", SHAPE, CLASSES).eval()
    program = torch.export.export(model, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return export_teacher(root / "t.pt2"), export_teacher(root / "other.pt2", seed=1)


def push(url: str, data: Path) -> tuple[int, int]:
    """teacher-push the transfer set: (hits, misses)."""
    result = subprocess.run(
        [str(BIN / "teacher-push"), "--url", url, "--data", str(data), "--batch-size", "16", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r"(\d+) samples, (\d+) hits, (\d+) misses", result.stdout + result.stderr)
    assert found and int(found[1]) == N, result.stdout + result.stderr
    return int(found[2]), int(found[3])


def serve(*args: str) -> subprocess.CompletedProcess:
    """A teacher-serve that is expected to refuse to start."""
    return subprocess.run([str(BIN / "teacher-serve"), "--device", "cpu", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_restart_given_only_teacher_and_cache_answers_a_re_push_from_the_cache(tmp_path, teachers):
    teacher, other_teacher = teachers
    images = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(images, inputs=rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8), labels=rng.integers(0, CLASSES, N))
    cache = tmp_path / "c"
    first = ["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu", "--input-dtype", "uint8", "--input-scale", "1/255"]
    with ServeProcess(first, tmp_path / "first.log") as server:
        server.wait_ready()
        assert push(server.url, images) == (0, N)
        assert server.stop() == 0
    meta = CacheReader(cache).meta
    assert meta.input_dtype == "uint8" and meta.preprocessing.scale == 1 / 255

    with ServeProcess(["--teacher", str(teacher), "--cache", str(cache), "--device", "cpu"], tmp_path / "second.log") as server:
        server.wait_ready()
        assert push(server.url, images) == (N, 0)  # all hits: the same ids, the same teacher, the same contract
        assert server.stop() == 0
        taken = next(line for line in server.output().splitlines() if "taken from the cache" in line)
    assert "--input-dtype uint8" in taken and "--input-scale 0.00392157" in taken and "--temperature 4" in taken, taken
    assert CacheReader(cache).num_samples == N

    manifest = (cache / "manifest.json").read_bytes()
    refused = serve("--teacher", str(teacher), "--cache", str(cache), "--input-scale", "0.5")
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"teacher-serve: error: --input-scale 0.5 disagrees with the cache {cache}/, which records 0.00392157 (omit it to use the cache's)"
    ], refused.stderr
    other = serve("--teacher", str(other_teacher), "--cache", str(cache))  # still checked by its fingerprint
    assert other.returncode == 2 and "refusing to start" in other.stderr and "teacher_fingerprint" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert (cache / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_a_port_in_use_is_one_line_exit_2_and_nothing_in_the_cache_directory(tmp_path, teachers):
    teacher, _ = teachers
    cache = tmp_path / "c"
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = serve("--teacher", str(teacher), "--cache", str(cache), "--port", str(port), "--input-dtype", "uint8")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"teacher-serve: error: --port {port}: ") and "already in use" in lines[0], result.stderr
    assert not cache.exists()


META = CacheMeta("f" * 64, "t.pt2", CLASSES, SHAPE, "uint8", Preprocessing(scale=1 / 255), serving_temperature=2.0)


def settings_of(*extra: str):
    return load_settings(["--teacher", "t.pt2", "--cache", "c", *extra])


def test_what_the_cache_records_is_taken_where_not_given():
    settings, taken = take_from_cache(settings_of("--device", "cpu"), META, "c/")
    assert (settings.input_dtype, settings.input_scale, settings.input_shape, settings.temperature) == ("uint8", 1 / 255, [1, 8, 8], 2.0)
    assert (settings.targets, settings.logits_dtype, settings.views, settings.augment) == ("full", "float32", 1, None)
    assert " ".join(taken) == (
        "--input-shape 1,8,8 --input-dtype uint8 --input-scale 0.00392157 --normalize 0,1 --temperature 2 --targets full --logits-dtype float32"
    )
    # Given and agreeing (as a fraction, or as the log shows it): the cache's exact value, not listed as taken.
    for scale in ("1/255", "0.00392157"):
        settings, taken = take_from_cache(settings_of("--input-scale", scale, "--input-dtype", "uint8"), META, "c/")
        assert settings.input_scale == 1 / 255 and not any(t.startswith(("--input-scale", "--input-dtype")) for t in taken)

    sparse = CacheMeta(
        "f" * 64, "ensemble-arithmetic(a.pt2,b.pt2)", CLASSES, SHAPE, "uint8", serving_temperature=2.0, temperature_rule="serving",
        logits_layout="sampled:4", target_seed=9, views_per_id=3, augment={"name": "random-crop", "params": {"padding": 1}, "version": 1},
        view_salt=5,
    )  # fmt: skip
    settings, taken = take_from_cache(load_settings(["--teacher", "a.pt2", "--teacher", "b.pt2", "--cache", "c"]), sparse, "c/")
    assert (settings.ensemble, settings.targets, settings.target_seed) == ("arithmetic", "sampled:4", 9)
    assert (settings.views, settings.augment, settings.view_salt) == (3, "random-crop:1", 5)
    assert {"--views 3", "--augment random-crop:1", "--view-salt 5", "--target-seed 9", "--ensemble arithmetic"} <= set(taken)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-scale", "0.5"], "--input-scale 0.5 disagrees with the cache c/, which records 0.00392157"),
        (["--input-dtype", "float32"], "--input-dtype float32 disagrees with the cache c/, which records uint8"),
        (["--input-shape", "8,8"], "--input-shape 8,8 disagrees with the cache c/, which records 1,8,8"),
        (["--normalize", "0.5,0.25"], "--normalize 0.5,0.25 disagrees with the cache c/, which records 0,1"),
        (["--temperature", "4"], "--temperature 4 disagrees with the cache c/, which records 2"),
        (["--targets", "topk:3"], "--targets topk:3 disagrees with the cache c/, which records full"),
        (["--logits-dtype", "float16"], "--logits-dtype float16 disagrees with the cache c/, which records float32"),
        (["--views", "4", "--augment", "random-crop:1"], "--views 4 disagrees with the cache c/, which records 1"),
        (["--augment", "random-crop:1"], "--augment random-crop:1 disagrees with the cache c/, which records none"),
    ],
)
def test_a_given_setting_that_disagrees_with_the_cache_is_refused_naming_both(extra, message, monkeypatch):
    with pytest.raises(CacheConflict) as refused:
        take_from_cache(settings_of(*extra), META, "c/")
    assert str(refused.value) == f"{message} (omit it to use the cache's)"
    option, value = extra[:2]
    monkeypatch.setenv("TEACHER_SERVE_" + option[2:].upper().replace("-", "_"), value)  # the environment is given too
    with pytest.raises(CacheConflict, match=re.escape(f"{option} {value}")):
        take_from_cache(settings_of(*extra[2:]), META, "c/")


def test_a_policy_of_ones_own_is_imported_from_the_cache_only_with_trust_code():
    """Without --trust-code it is refused (tests/test_trust.py has the rest); given again with
    --augment it is trusted as given."""
    from kdcache.offline.cache.trust import UntrustedCode

    meta = CacheMeta(
        "f" * 64, "t.pt2", CLASSES, SHAPE, "uint8", views_per_id=2, augment={"name": "mine.views:crop", "params": {}, "version": 1}
    )
    with pytest.raises(
        UntrustedCode, match=r"the cache c/ names code to import: the augment policy mine\.views:crop \(module mine\.views\)"
    ):
        take_from_cache(settings_of(), meta, "c/")
    assert take_from_cache(settings_of("--trust-code"), meta, "c/")[0].augment == "mine.views:crop"


@pytest.mark.parametrize("scale", ["1/255", "0.00392156862745098", " 1 / 255 "])
def test_input_scale_takes_a_fraction_on_the_command_line_and_in_the_environment(scale, monkeypatch):
    assert settings_of("--input-scale", scale).input_scale == pytest.approx(1 / 255, rel=1e-15)
    monkeypatch.setenv("TEACHER_SERVE_INPUT_SCALE", scale)
    assert settings_of().input_scale == pytest.approx(1 / 255, rel=1e-15)


@pytest.mark.parametrize("scale", ["abc", "1/0", "0", "-1/255", "nan", "1/x"])
def test_a_bad_input_scale_is_one_line_naming_the_option(scale, tmp_path, capsys):
    from kdcache.service.cli import serve_main

    assert serve_main(["--teacher", "t.pt2", "--cache", str(tmp_path / "c"), f"--input-scale={scale}"]) == 2
    error = capsys.readouterr().err
    assert error == f"teacher-serve: error: --input-scale: expected a number > 0 or a fraction such as 1/255, got {scale!r}\n"
    assert not (tmp_path / "c").exists()
