"""The cache package's building blocks on their own: the storage backend, the target layout,
the row index and the crash points."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdcache.offline.cache import CacheError, CacheMeta, CacheReader, CacheWriter, FullLogits, LocalStorage, faults, make_layout
from kdcache.offline.cache.keys import RowIndex
from kdcache.offline.cache.storage import PreconditionFailed


def test_local_put_is_atomic_and_leaves_no_temporary_file(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put("a.bin", b"first")
    storage.put("a.bin", b"second")
    assert storage.read_bytes("a.bin") == b"second"
    assert sorted(storage.list()) == ["a.bin"]
    assert storage.size("a.bin") == 6
    assert storage.partial_puts() == []


def test_a_failed_put_removes_its_temporary_file_and_keeps_the_old_file(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put("a.bin", b"old")
    (tmp_path / "b.bin").mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        storage.put("b.bin", b"new")
    assert storage.partial_puts() == []
    assert storage.read_bytes("a.bin") == b"old"


def test_put_if_match_refuses_a_file_changed_since_it_was_read(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put_if_match("manifest.json", b"v1", None)
    seen = storage.etag("manifest.json")
    with pytest.raises(PreconditionFailed, match="changed by another writer"):
        storage.put_if_match("manifest.json", b"v2", None)  # expected absent, but it exists
    storage.put("manifest.json", b"v1-by-someone-else")
    with pytest.raises(PreconditionFailed):
        storage.put_if_match("manifest.json", b"v2", seen)
    storage.put_if_match("manifest.json", b"v3", storage.etag("manifest.json"))
    assert storage.read_bytes("manifest.json") == b"v3"


def test_partial_puts_are_listed_and_discarded(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / ".shard-000003.h5.tmp").write_bytes(b"torn")
    assert storage.partial_puts() == ["shard-000003.h5"]
    storage.discard_partial("shard-000003.h5")
    assert storage.partial_puts() == []


def test_the_writer_lease_is_exclusive_until_released(tmp_path):
    storage = LocalStorage(tmp_path)
    lease = storage.lease()
    with pytest.raises(CacheError, match="another writer holds"):
        LocalStorage(tmp_path).lease()
    lease.release()
    LocalStorage(tmp_path).lease().release()


def test_a_missing_directory_is_named():
    with pytest.raises(CacheError, match="no such cache directory"):
        CacheReader("/nonexistent/cache-dir")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_full_logits_round_trip_as_the_cache_holds_them(dtype):
    layout = FullLogits(dtype)
    logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 10
    fields = layout.encode(logits)
    assert list(fields) == ["logits"] and fields["logits"].dtype == np.dtype(dtype)
    served = layout.served(logits)
    assert served.dtype == np.float32
    np.testing.assert_array_equal(served, logits.astype(dtype).astype(np.float32))
    assert layout.row_bytes(7) == 7 * np.dtype(dtype).itemsize
    assert layout.problem(fields) is None
    fields["logits"][2, 3] = np.nan
    assert layout.problem(fields) == "non-finite teacher logits"
    assert make_layout("full", dtype=dtype) == layout


def test_unknown_layouts_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown target layout"):
        make_layout("ranked:3", dtype="float32")
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        FullLogits("int8")
    with pytest.raises(CacheError, match="logits layout 'ranked:3' is not supported"):
        CacheMeta.from_dict({"teacher_fingerprint": "f", "teacher_name": "t", "num_classes": 2, "input_shape": [1],
                             "input_dtype": "uint8", "logits_layout": "ranked:3"}, "m")  # fmt: skip


def test_row_bytes_and_columns_come_from_the_layout():
    meta = CacheMeta("f" * 64, "t", 10, (8, 8), "uint8", logits_dtype="float16")
    assert meta.row_bytes() == 64 + 8 + 10 * 2
    assert list(meta.columns()) == ["ids", "inputs", "labels", "logits"]


def test_the_temperature_rule_is_recorded_and_old_caches_get_it_from_their_name():
    meta = CacheMeta("f" * 64, "t", 3, (2,), "uint8", serving_temperature=2.0, temperature_rule="serving")
    raw = meta.to_dict()
    assert raw["temperature"] == 2.0 and "serving_temperature" not in raw and raw["temperature_rule"] == "serving"
    assert CacheMeta.from_dict(raw, "m") == meta
    legacy = {k: v for k, v in raw.items() if k != "temperature_rule"}
    assert CacheMeta.from_dict({**legacy, "teacher_name": "ensemble-arithmetic(a,b)"}, "m").temperature_rule == "serving"
    assert CacheMeta.from_dict(legacy, "m").temperature_rule == "any"
    with pytest.raises(ValueError, match="temperature_rule"):
        CacheMeta("f" * 64, "t", 3, (2,), "uint8", temperature_rule="sometimes")


def test_row_index_numbers_rows_across_published_and_open_shards():
    index = RowIndex()
    index.add(["a", "b"])
    index.seal()
    index.add(["c"])
    np.testing.assert_array_equal(index.lookup(["c", "a", "zz", "b"]), [2, 0, -1, 1])
    np.testing.assert_array_equal(index.contains(["a", "zz"]), [True, False])
    index.drop_open()
    assert "c" not in index and len(index) == 2
    index.add(["d", "c"])
    np.testing.assert_array_equal(index.lookup(["d", "c"]), [2, 3])
    index.publish(2)
    assert index.published == 4


def test_every_crash_point_is_a_named_constant_reached_somewhere():
    """Each point in CRASH_POINTS is a module constant, and the source reaches each one by that name."""
    from pathlib import Path

    names = {value: name for name, value in vars(faults).items() if name.isupper() and isinstance(value, str)}
    assert set(faults.CRASH_POINTS) <= set(names)
    root = Path(__file__).resolve().parent.parent
    source = "\n".join(p.read_text() for folder in ("offline", "service") for p in (root / folder).rglob("*.py"))
    for point in faults.CRASH_POINTS:
        assert f"faults.{names[point]}" in source, f"no call site reaches {names[point]}"


def test_the_writer_dies_at_an_armed_crash_point_and_the_cache_recovers(tmp_path):
    """KDCACHE_CRASH_AT=shard-renamed: the shard is published under its name, the manifest
    does not list it yet; the next writer adopts it."""
    code = (
        "import numpy as np\n"
        "from kdcache.offline.cache import CacheMeta, CacheWriter\n"
        f"meta = CacheMeta('f' * 64, 't', 3, (2,), 'uint8')\n"
        f"w = CacheWriter({str(tmp_path)!r}, meta, max_samples=4)\n"
        "w.append([str(i) for i in range(4)], np.zeros((4, 2), np.uint8), np.zeros((4, 3), np.float32))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KDCACHE_CRASH_AT": faults.SHARD_RENAMED}, timeout=120)
    assert result.returncode == -9
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == []
    assert (tmp_path / "shard-000000.h5").exists()
    meta = CacheMeta("f" * 64, "t", 3, (2,), "uint8")
    with CacheWriter(tmp_path, meta) as writer:
        assert len(writer) == 4
    assert CacheReader(tmp_path).num_samples == 4


def test_ids_that_are_not_utf8_are_named():
    from kdcache.offline.cache import normalize_ids

    with pytest.raises(ValueError, match=r"id #1 is not valid UTF-8"):
        normalize_ids(np.array([b"ok", b"\xff\xfe"], dtype=object))
