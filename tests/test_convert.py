"""``cache-convert``: a full cache re-encoded into topk:K or sampled:N targets without the teacher,
on real HDF5 caches, through the command's entry point and as a process; then ``offline-distill``
on the result."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import BIN

from kdcache.offline import convert
from kdcache.offline.cache import MANIFEST_NAME, CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.cache.views import parse_policy
from kdcache.offline.cli import inspect_main

CLASSES, ROWS, SERVING_T = 10, 150, 2.0
PREPROCESSING = Preprocessing(scale=1 / 16)


def make_meta(**overrides) -> CacheMeta:
    fields = dict(
        teacher_fingerprint="cd" * 32, teacher_name="convert-teacher", num_classes=CLASSES, input_shape=(8, 8), input_dtype="uint8",
        preprocessing=PREPROCESSING, serving_temperature=SERVING_T, temperature_rule="serving",
    )  # fmt: skip
    fields.update(overrides)
    return CacheMeta(**fields)


def rows(views: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (ROWS, views, CLASSES) if views > 1 else (ROWS, CLASSES)
    return {
        "ids": np.array([f"img-{i}" for i in range(ROWS)], dtype=object),
        "inputs": rng.integers(0, 17, size=(ROWS, 8, 8)).astype(np.uint8),
        "logits": (rng.normal(size=shape) * 3).astype(np.float32),
        "labels": rng.integers(-1, CLASSES, size=ROWS).astype(np.int64),
    }


def write(directory, meta: CacheMeta, data: dict, max_samples: int = 64):
    """The rows through CacheWriter in batches of 40, shards of ``max_samples``, the first one cut
    short: shards of 40, 64 and 46 rows."""
    with CacheWriter(directory, meta, max_samples=max_samples) as writer:
        for start in range(0, ROWS, 40):
            part = slice(start, start + 40)
            writer.append(data["ids"][part], data["inputs"][part], data["logits"][part], data["labels"][part])
            if start == 0:
                writer.flush_shard()
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    data = rows()
    meta = make_meta()
    return {"dir": write(tmp_path_factory.mktemp("src") / "cache", meta, data), "meta": meta, **data}


def run(*args) -> int:
    return convert.main([*map(str, args), "--no-progress"])


def stored(directory) -> dict:
    reader = CacheReader(directory)
    return reader.read(tuple(reader.meta.columns()))


def targets_of(directory) -> list[dict]:
    """Every shard's target datasets, in order."""
    reader = CacheReader(directory)
    fields = list(reader.meta.layout.fields(reader.meta.num_classes))
    out = []
    for info in reader.shards:
        with h5py.File(info.path, "r") as h5:
            out.append({name: h5[name][:] for name in fields})
    return out


def leftovers(parent, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.parametrize(
    "spec, dtype", [("topk:2", "float32"), ("topk:2", "float16"), ("sampled:16", "float32"), ("sampled:16", "float16")]
)
def test_a_full_cache_becomes_the_cache_a_direct_encoding_writes(source, tmp_path, spec, dtype):
    assert run(source["dir"], tmp_path / "dst", "--targets", spec, "--logits-dtype", dtype, "--seed", 11) == 0
    reader = CacheReader(tmp_path / "dst", verify_checksums=True)
    expected_meta = dataclasses.replace(source["meta"], logits_layout=spec, logits_dtype=dtype, target_seed=11 if "sampled" in spec else 0)
    assert reader.meta == expected_meta
    assert reader.meta.serving_temperature == SERVING_T and reader.meta.temperature_rule == "serving"
    assert reader.meta.teacher_fingerprint == source["meta"].teacher_fingerprint
    # One shard per source shard, in order.
    assert [s.num_samples for s in reader.shards] == [s.num_samples for s in CacheReader(source["dir"]).shards] == [40, 64, 46]

    # What a CacheWriter with the same metadata writes from the teacher's logits directly.
    write(tmp_path / "direct", expected_meta, source)
    converted, direct = stored(tmp_path / "dst"), stored(tmp_path / "direct")
    assert list(converted["ids"]) == list(source["ids"])
    np.testing.assert_array_equal(converted["inputs"], source["inputs"])
    np.testing.assert_array_equal(converted["labels"], source["labels"])
    for name in reader.meta.layout.fields(CLASSES):
        np.testing.assert_array_equal(converted[name], direct[name], err_msg=name)
        assert converted[name].dtype == direct[name].dtype
    layout = reader.meta.layout
    fields = {name: converted[name] for name in layout.fields(CLASSES)}
    np.testing.assert_array_equal(layout.decode(fields), layout.decode({name: direct[name] for name in fields}))
    if spec.startswith("topk"):
        assert fields["topk_values"].shape == (ROWS, 2)
        np.testing.assert_array_equal(fields["topk_indices"][:, 0], source["logits"].argmax(1))
    else:
        assert (fields["sample_counts"].astype(int).sum(1) == 16).all()


def test_provenance_is_recorded_and_cache_inspect_shows_it(source, tmp_path, capsys):
    assert run(source["dir"], tmp_path / "dst", "--targets", "sampled:16", "--seed", 5) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "dst" / MANIFEST_NAME).read_text())
    provenance = manifest["provenance"]
    assert provenance["tool"] == "cache-convert"
    assert provenance["source"] == {
        "directory": str(source["dir"].resolve()),
        "manifest_sha256": hashlib.sha256((source["dir"] / MANIFEST_NAME).read_bytes()).hexdigest(),
        "logits_layout": "full",
        "logits_dtype": "float32",
        "samples": ROWS,
        "shards": 3,
    }
    assert manifest["meta"]["target_seed"] == 5
    assert inspect_main([str(tmp_path / "dst"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["provenance"] == provenance and summary["target_seed"] == 5
    assert summary["logits_layout"] == "sampled:16" and summary["logits_dtype"] == "float32" and summary["serving_temperature"] == SERVING_T
    # 16 draws over 10 classes: 10 uint8 indices and 10 uint8 counts, against 4·10 bytes of float32 logits
    assert summary["target_bytes_per_sample"] == 20 and summary["target_fraction_of_full_float32"] == 0.5
    assert inspect_main([str(tmp_path / "dst")]) == 0
    text = capsys.readouterr().out
    assert "target bytes     20/sample, 50.0% of full float32 (40)" in text
    assert "target seed      5" in text
    assert "converted by cache-convert" in text and str(source["dir"].resolve()) in text
    # A writer that appends later keeps the provenance.
    with CacheWriter(tmp_path / "dst", CacheReader(tmp_path / "dst").meta) as writer:
        writer.append(["extra"], source["inputs"][:1], source["logits"][:1], source["labels"][:1])
    assert json.loads((tmp_path / "dst" / MANIFEST_NAME).read_text())["provenance"] == provenance
    # A cache filled by a teacher has none; cache-inspect still shows its target bytes.
    assert inspect_main([str(source["dir"]), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["provenance"] is None and plain["target_seed"] is None and plain["target_fraction_of_full_float32"] == 1.0


def test_the_same_seed_gives_the_same_draws_and_a_fresh_seed_others(source, tmp_path):
    for name, seed in (("a", ["--seed", "42"]), ("b", ["--seed", "42"]), ("c", []), ("d", [])):
        assert run(source["dir"], tmp_path / name, "--targets", "sampled:16", *seed) == 0
    a, b, c, d = (targets_of(tmp_path / name) for name in "abcd")
    for shard_a, shard_b in zip(a, b, strict=True):
        for name in shard_a:
            np.testing.assert_array_equal(shard_a[name], shard_b[name])
    seeds = {CacheReader(tmp_path / name).meta.target_seed for name in "cd"}
    assert len(seeds) == 2 and 42 not in seeds and all(0 <= s < 1 << 63 for s in seeds)
    assert not all(np.array_equal(x["sample_counts"], y["sample_counts"]) for x, y in zip(c, d, strict=True))


def test_a_cache_with_views_keeps_its_seeds_and_gets_targets_per_view(tmp_path):
    data = rows(views=3, seed=1)
    meta = make_meta(views_per_id=3, augment=parse_policy("random-crop:1").describe(), view_salt=99)
    write(tmp_path / "src", meta, data)
    assert run(tmp_path / "src", tmp_path / "dst", "--targets", "topk:2") == 0
    converted, original = stored(tmp_path / "dst"), stored(tmp_path / "src")
    reader = CacheReader(tmp_path / "dst")
    assert reader.meta.views_per_id == 3 and reader.meta.augment == meta.augment and reader.meta.view_salt == 99
    np.testing.assert_array_equal(converted["view_seeds"], original["view_seeds"])
    assert converted["topk_values"].shape == (ROWS, 3, 2) and converted["tail_logmass"].shape == (ROWS, 3)
    np.testing.assert_array_equal(converted["topk_indices"][:, :, 0], data["logits"].argmax(-1))
    write(tmp_path / "direct", reader.meta, data)
    direct = stored(tmp_path / "direct")
    for name in ("topk_values", "topk_indices", "tail_logmass"):
        np.testing.assert_array_equal(converted[name], direct[name])


def test_view_seeds_that_the_salt_does_not_give_are_refused(tmp_path, capsys):
    meta = make_meta(views_per_id=2, augment=parse_policy("random-crop:1").describe(), view_salt=3)
    write(tmp_path / "src", meta, rows(views=2))
    with h5py.File(tmp_path / "src" / "shard-000001.h5", "r+") as h5:  # in place: the size stays
        h5["view_seeds"][5] = [1, 2]
    assert run(tmp_path / "src", tmp_path / "dst", "--targets", "topk:2", "--no-verify-checksums") == 1
    err = capsys.readouterr().err
    assert "shard-000001.h5 rows 0:64: view_seeds are not those of the cache's view_salt 3" in err and err.count("\n") == 1
    assert leftovers(tmp_path, "dst") == []


def test_full_targets_convert_the_dtype(source, tmp_path):
    assert run(source["dir"], tmp_path / "half", "--targets", "full", "--logits-dtype", "float16") == 0
    converted = stored(tmp_path / "half")
    assert converted["logits"].dtype == np.float16
    np.testing.assert_array_equal(converted["logits"], source["logits"].astype(np.float16))
    # and a float16 cache converts from its float16 values
    assert run(tmp_path / "half", tmp_path / "top", "--targets", "topk:3") == 0
    top = stored(tmp_path / "top")
    assert CacheReader(tmp_path / "top").meta.logits_dtype == "float16"
    np.testing.assert_array_equal(top["topk_values"], -np.sort(-source["logits"].astype(np.float16), axis=1)[:, :3])


def test_an_empty_directory_is_a_valid_destination(source, tmp_path):
    (tmp_path / "dst").mkdir()
    assert run(source["dir"], tmp_path / "dst", "--targets", "topk:1") == 0
    assert CacheReader(tmp_path / "dst").num_samples == ROWS


def sparse_cache(tmp_path):
    return write(tmp_path / "sparse", make_meta(logits_layout="topk:2"), rows())


def damaged_cache(tmp_path, source):
    import shutil

    shutil.copytree(source["dir"], tmp_path / "damaged")
    shard = tmp_path / "damaged" / "shard-000001.h5"
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    return tmp_path / "damaged"


@pytest.mark.parametrize(
    "case, targets, code, message",
    [
        ("k-not-below-c", "topk:10", 2, "topk:10 needs K < C, the teacher's 10 classes"),
        ("no-draws", "sampled:0", 2, "--targets: sampled:N needs N >= 1 draws, got 0"),
        ("unknown", "ranked:3", 2, "--targets: unknown target layout 'ranked:3'; expected full, topk:K or sampled:N"),
        ("malformed", "topk:two", 2, "needs an integer K"),
        ("same-full", "full", 2, "already holds full float32 logits"),
        ("dst-not-empty", "topk:2", 2, "not empty; DST must be a new or an empty directory"),
        ("dst-inside-src", "topk:2", 2, "DST must lie outside it"),
        ("src-missing", "topk:2", 1, "no such cache directory"),
        ("src-not-a-cache", "topk:2", 1, "empty cache directory (no manifest.json)"),
        ("src-damaged", "topk:2", 1, "sha256"),
        ("src-sparse", "topk:2", 2, "cache-convert re-encodes a full cache; {src} holds topk:2 targets"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(source, tmp_path, capsys, case, targets, code, message):
    src, dst = source["dir"], tmp_path / "dst"
    if case == "dst-not-empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif case == "dst-inside-src":
        src = tmp_path / "copy"
        import shutil

        shutil.copytree(source["dir"], src)
        dst = src / "dst"
    elif case == "src-missing":
        src = tmp_path / "nowhere"
    elif case == "src-not-a-cache":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "src-damaged":
        src = damaged_cache(tmp_path, source)
    elif case == "src-sparse":
        src = sparse_cache(tmp_path)
    before = sorted(p.name for p in dst.parent.iterdir())
    assert run(src, dst, "--targets", targets) == code
    err = capsys.readouterr().err
    assert err.startswith("cache-convert: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(src=src) in err
    assert sorted(p.name for p in dst.parent.iterdir()) == before
    if case == "dst-not-empty":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_an_interruption_removes_the_staging_directory(source, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:  # after the first shard's rows are in the staging directory
            raise KeyboardInterrupt
        return original(*args)

    original = convert.append_block
    monkeypatch.setattr(convert, "append_block", interrupted)
    assert run(source["dir"], tmp_path / "dst", "--targets", "topk:2") == 130
    assert "interrupted" in capsys.readouterr().err and len(calls) == 2
    assert leftovers(tmp_path, "dst") == []


def test_the_command_then_offline_distill_at_the_serving_temperature(source, tmp_path):
    proc = subprocess.run(
        [str(BIN / "cache-convert"), str(source["dir"]), str(tmp_path / "dst"), "--targets", "sampled:16", "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cache-convert: wrote {tmp_path / 'dst'}: 150 samples in 3 shard(s), targets sampled:16 float32")
    assert "target_seed 3" in proc.stdout and "convert: 100%" in proc.stderr  # the progress bar, on stderr
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "offline-distill"), "--cache", str(tmp_path / "dst"), "--student", "mlp-small", "--epochs", "1", "--batch-size", "32",
         "--out", str(run_dir), "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["temperature"] == SERVING_T and metrics["epochs"] == 1


def test_the_label_names_are_kept(tmp_path):
    names = [f"class-{i}" for i in range(CLASSES)]
    data = rows()
    with CacheWriter(tmp_path / "named", make_meta(), label_names=names) as writer:
        writer.append(data["ids"], data["inputs"], data["logits"], data["labels"])
    assert run(tmp_path / "named", tmp_path / "top", "--targets", "topk:2") == 0
    assert CacheReader(tmp_path / "top").label_names == names


def test_a_staging_directory_left_by_kill_9_is_removed_at_the_next_run(source, tmp_path, capsys):
    """Issue 20: a killed run left its hidden staging directory (162 MB) and nothing removed it.
    Its name now holds the host and process id; the next run removes it once that process is
    gone, and names (never removes) one whose writer may still run."""
    killed = subprocess.run(
        [sys.executable, "-c", "import os, pathlib; from kdcache.offline import convert;"
         "staging = convert.staging_directory(pathlib.Path('dst'));"
         "(staging / 'shard-000000.h5').write_bytes(bytes(4096)); print(staging.name, flush=True);"
         "os.kill(os.getpid(), 9)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    stale = tmp_path / killed.stdout.strip()
    assert stale.is_dir() and leftovers(tmp_path, "dst") == [stale.name]
    running = convert.staging_directory(tmp_path / "dst")  # this process's: still running
    legacy = tmp_path / ".dst.convert-0123abcd"  # named before the names held a process id
    legacy.mkdir()

    assert run(source["dir"], tmp_path / "dst", "--targets", "topk:2") == 0
    err = capsys.readouterr().err
    assert f"cache-convert: removed {stale}, left by a conversion into {tmp_path / 'dst'} that was stopped (process " in err, err
    assert f"warning: {running} is a staging directory of process {os.getpid()} on " in err
    assert f"warning: {legacy} is a staging directory of an earlier run; remove it if no conversion is running" in err
    assert not stale.exists() and running.is_dir() and legacy.is_dir()
    assert leftovers(tmp_path, "dst") == sorted(["dst", running.name, legacy.name])
    assert CacheReader(tmp_path / "dst").num_samples == ROWS


@pytest.mark.parametrize("where", ["cwd", "parent", "holds-src"])
def test_dst_cannot_be_the_current_directory_an_ancestor_or_hold_src(source, tmp_path, monkeypatch, capsys, where):
    """Issue 20: DST ``.`` (empty) converted everything, then failed to rename onto it. Now it is
    refused in one line before SRC is read."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    src = source["dir"]
    if where == "holds-src":
        src = tmp_path / "outer" / "cache"
        shutil.copytree(source["dir"], src)
    dst = {"cwd": ".", "parent": "..", "holds-src": str(tmp_path / "outer")}[where]
    read = []
    monkeypatch.setattr(convert, "CacheReader", lambda *a, **k: read.append(a) or CacheReader(*a, **k))
    assert run(src, dst, "--targets", "topk:2") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cache-convert: error: {dst}: ") and err.count("\n") == 1, err
    expected = "holds SRC" if where == "holds-src" else "the current directory or one of its ancestors"
    assert expected in err and read == [], err
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here"] and list(work.iterdir()) == []
