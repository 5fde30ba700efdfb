"""The cache format, through its public API and with plain h5py: round trips, shard rollover,
the manifest, dedup, the writer lock, crash recovery, version refusal, chunking, transfer sets."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from kdcache.offline.cache import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CacheError,
    CacheMeta,
    CacheReader,
    CacheWriter,
    Preprocessing,
    ShardHandle,
    read_transfer_set,
)

FINGERPRINT = "ab" * 32
PREPROCESSING = Preprocessing(scale=1 / 16, mean=(0.5,), std=(2.0,))


def make_meta(**overrides) -> CacheMeta:
    fields = dict(
        teacher_fingerprint=FINGERPRINT, teacher_name="test-teacher", num_classes=10, input_shape=(8, 8),
        input_dtype="uint8", preprocessing=PREPROCESSING, serving_temperature=2.5,
    )  # fmt: skip
    fields.update(overrides)
    return CacheMeta(**fields)


def make_batch(n: int, seed: int = 0, num_classes: int = 10, shape: tuple[int, ...] = (8, 8)):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    labels = rng.integers(-1, num_classes, size=n).astype(np.int64)
    return inputs, logits, labels


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def shard_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("shard-*.h5"))


def write(directory: Path, n: int, *, meta: CacheMeta | None = None, start: int = 0, batch: int = 37, **writer_kwargs) -> dict:
    """Append ids start..start+n in batches of ``batch`` and close; returns what was written."""
    inputs, logits, labels = make_batch(n, seed=start)
    ids = np.arange(start, start + n)
    with CacheWriter(directory, meta or make_meta(), **writer_kwargs) as writer:
        for lo in range(0, n, batch):
            writer.append(ids[lo : lo + batch], inputs[lo : lo + batch], logits[lo : lo + batch], labels[lo : lo + batch])
    return {"ids": [str(i) for i in ids], "inputs": inputs, "logits": logits, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_int_ids(tmp_path):
    written = write(tmp_path, 100)
    data = CacheReader(tmp_path).read()
    assert data["ids"].tolist() == written["ids"]
    assert all(isinstance(i, str) for i in data["ids"])
    assert data["inputs"].dtype == np.uint8
    np.testing.assert_array_equal(data["inputs"], written["inputs"])
    assert data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], written["labels"])
    assert (data["labels"] == -1).any(), "the batch should contain unknown labels"
    assert data["logits"].dtype == np.float32
    np.testing.assert_array_equal(data["logits"], written["logits"])


def test_round_trip_str_ids_and_missing_labels(tmp_path):
    inputs, logits, _ = make_batch(5)
    ids = ["a", "b/c", "ünïcode", "sha:0f", "42"]
    with CacheWriter(tmp_path, make_meta()) as writer:
        assert writer.append(ids, inputs, logits) == 5  # labels omitted: all unknown
    data = CacheReader(tmp_path).read()
    assert data["ids"].tolist() == ids
    np.testing.assert_array_equal(data["labels"], np.full(5, -1, dtype=np.int64))
    with h5py.File(tmp_path / "shard-000000.h5", "r") as h5:
        assert [v.decode("utf-8") for v in h5["ids"][:]] == ids


def test_int_and_str_ids_are_the_same_id(tmp_path):
    inputs, logits, labels = make_batch(3)
    with CacheWriter(tmp_path, make_meta()) as writer:
        assert writer.append(np.array([7, 8, 9], dtype=np.int32), inputs, logits, labels) == 3
        assert "7" in writer
        assert writer.append(["7", "8", "10"], inputs, logits, labels) == 1
    assert CacheReader(tmp_path).read(("ids",))["ids"].tolist() == ["7", "8", "9", "10"]


def test_round_trip_float16_logits(tmp_path):
    written = write(tmp_path, 50, meta=make_meta(logits_dtype="float16"))
    reader = CacheReader(tmp_path)
    assert reader.meta.logits_dtype == "float16"
    data = reader.read()
    assert data["logits"].dtype == np.float16
    np.testing.assert_array_equal(data["logits"], written["logits"].astype(np.float16))
    with h5py.File(tmp_path / "shard-000000.h5", "r") as h5:
        assert h5["logits"].dtype == np.float16
        assert h5.attrs["logits_dtype"] == "float16"


def test_float32_inputs_keep_their_dtype(tmp_path):
    meta = make_meta(input_shape=(3, 4), input_dtype="float32")
    x = np.random.default_rng(1).normal(size=(6, 3, 4)).astype(np.float32)
    logits = np.zeros((6, 10), dtype=np.float32)
    with CacheWriter(tmp_path, meta) as writer:
        writer.append(range(6), x, logits)
        with pytest.raises(ValueError, match="float64"):
            writer.append(range(6, 12), x.astype(np.float64), logits)
    data = CacheReader(tmp_path).read()
    assert data["inputs"].dtype == np.float32
    np.testing.assert_array_equal(data["inputs"], x)


def test_shard_is_readable_with_plain_h5py(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    written = write(tmp_path, 20)
    with h5py.File(tmp_path / "shard-000000.h5", "r") as h5:
        assert set(h5.keys()) == {"ids", "inputs", "labels", "logits"}
        attrs = dict(h5.attrs)
        assert int(attrs["schema_version"]) == SCHEMA_VERSION
        assert attrs["teacher_fingerprint"] == FINGERPRINT
        assert attrs["teacher_name"] == "test-teacher"
        assert int(attrs["num_classes"]) == 10
        assert json.loads(attrs["input_shape"]) == [8, 8]
        assert attrs["input_dtype"] == "uint8"
        assert json.loads(attrs["preprocessing"]) == {"scale": 1 / 16, "mean": [0.5], "std": [2.0]}
        assert float(attrs["temperature"]) == 2.5
        assert attrs["format"] == "kd-cache"
        assert attrs["logits_layout"] == "full"
        assert int(attrs["views_per_id"]) == 1
        created = dt.datetime.fromisoformat(attrs["created_at"])
        assert created.tzinfo is not None
        assert before <= created <= dt.datetime.now(dt.timezone.utc)
        assert h5["ids"].shape == (20,)
        assert h5["inputs"].shape == (20, 8, 8) and h5["inputs"].dtype == np.uint8
        assert h5["labels"].shape == (20,) and h5["labels"].dtype == np.int64
        assert h5["logits"].shape == (20, 10) and h5["logits"].dtype == np.float32
        np.testing.assert_array_equal(h5["inputs"][:], written["inputs"])
        np.testing.assert_array_equal(h5["labels"][:], written["labels"])
        assert [v.decode() for v in h5["ids"][:]] == written["ids"]


@pytest.mark.parametrize("name", ["[v2] teacher", "{resnet}", ""])
def test_teacher_name_round_trips_verbatim(tmp_path, name):
    write(tmp_path, 5, meta=make_meta(teacher_name=name))
    reader = CacheReader(tmp_path)
    assert reader.meta.teacher_name == name
    assert reader.read(("ids",))["ids"].tolist() == [str(i) for i in range(5)]


def test_meta_round_trips_through_the_manifest(tmp_path):
    meta = make_meta()
    write(tmp_path, 5, meta=meta)
    assert CacheReader(tmp_path).meta == meta
    assert manifest(tmp_path)["meta"] == meta.to_dict()


def test_shard_handle_reads_row_ranges(tmp_path):
    written = write(tmp_path, 40)
    handle = ShardHandle(tmp_path / "shard-000000.h5")
    try:
        rows = handle.read(10, 25, ("ids", "inputs", "logits", "labels"))
    finally:
        handle.close()
    assert rows["ids"].tolist() == written["ids"][10:25]
    np.testing.assert_array_equal(rows["inputs"], written["inputs"][10:25])
    np.testing.assert_array_equal(rows["logits"], written["logits"][10:25])
    np.testing.assert_array_equal(rows["labels"], written["labels"][10:25])
    with pytest.raises(CacheError, match="shard-000000.h5"):
        ShardHandle(tmp_path / "shard-000000.h5").read(0, 1, ("no_such_dataset",))


def test_bad_batches_are_rejected(tmp_path):
    inputs, logits, labels = make_batch(4)
    with CacheWriter(tmp_path, make_meta()) as writer:
        with pytest.raises(ValueError, match="sample shape"):
            writer.append(range(4), inputs[:, :4], logits, labels)
        with pytest.raises(ValueError, match="logits have shape"):
            writer.append(range(4), inputs, logits[:, :9], labels)
        with pytest.raises(ValueError, match="NaN"):
            writer.append(range(4), inputs, np.full_like(logits, np.nan), labels)
        with pytest.raises(ValueError, match="labels must lie"):
            writer.append(range(4), inputs, logits, np.array([0, 1, 2, 10]))
        with pytest.raises(ValueError, match="3 ids for 4 samples"):
            writer.append(range(3), inputs, logits, labels)
        assert len(writer) == 0
    assert manifest(tmp_path)["num_samples"] == 0


# ---------------------------------------------------------------------------------------------
# Rollover and the manifest


def check_manifest_matches_files(directory: Path) -> list[dict]:
    m = manifest(directory)
    entries = m["shards"]
    assert [e["name"] for e in entries] == shard_files(directory)
    for entry in entries:
        path = directory / entry["name"]
        assert entry["sha256"] == sha256(path)
        assert entry["bytes"] == path.stat().st_size
        with h5py.File(path, "r") as h5:
            assert entry["num_samples"] == h5["ids"].shape[0]
    assert m["num_samples"] == sum(e["num_samples"] for e in entries)
    assert m["schema_version"] == SCHEMA_VERSION
    return entries


def test_rollover_by_max_samples(tmp_path):
    written = write(tmp_path, 230, max_samples=50, batch=37)
    entries = check_manifest_matches_files(tmp_path)
    assert [e["num_samples"] for e in entries] == [50, 50, 50, 50, 30]
    assert shard_files(tmp_path) == [f"shard-{i:06d}.h5" for i in range(5)]
    assert CacheReader(tmp_path).read(("ids",))["ids"].tolist() == written["ids"]


def test_rollover_by_max_bytes(tmp_path):
    meta = make_meta()
    row = meta.row_bytes()
    assert row == 64 + 8 + 10 * 4
    written = write(tmp_path, 95, meta=meta, max_bytes=10 * row + row // 2, batch=23)
    entries = check_manifest_matches_files(tmp_path)
    # Each shard holds as many whole rows as fit in max_bytes, and no more.
    assert [e["num_samples"] for e in entries] == [10] * 9 + [5]
    assert CacheReader(tmp_path).read(("ids",))["ids"].tolist() == written["ids"]


def test_max_bytes_smaller_than_a_row_gives_one_row_per_shard(tmp_path):
    write(tmp_path, 3, max_bytes=1)
    assert [e["num_samples"] for e in check_manifest_matches_files(tmp_path)] == [1, 1, 1]


def test_flush_shard_publishes_and_reader_sees_only_published(tmp_path):
    inputs, logits, labels = make_batch(30)
    with CacheWriter(tmp_path, make_meta(), max_samples=100) as writer:
        writer.append(range(20), inputs[:20], logits[:20], labels[:20])
        assert writer.pending_rows == 20
        # The open shard is in memory: nothing of it is on disk before publication.
        assert list(tmp_path.glob(".shard-*")) == []
        reader = CacheReader(tmp_path)
        assert reader.num_samples == 0 and reader.shards == []
        assert reader.unlisted_files() == []
        info = writer.flush_shard()
        assert info is not None and info.num_samples == 20 and info.name == "shard-000000.h5"
        assert writer.flush_shard() is None
        assert CacheReader(tmp_path).num_samples == 20
        writer.append(range(20, 30), inputs[20:], logits[20:], labels[20:])
    entries = check_manifest_matches_files(tmp_path)
    assert [e["num_samples"] for e in entries] == [20, 10]
    assert not list(tmp_path.glob("*.tmp"))
    assert CacheReader(tmp_path).verify() == []


def test_empty_writer_publishes_an_empty_manifest(tmp_path):
    with CacheWriter(tmp_path / "new" / "cache", make_meta()):
        pass
    reader = CacheReader(tmp_path / "new" / "cache")
    assert reader.num_samples == 0 and reader.shards == []
    assert reader.read()["inputs"].shape == (0, 8, 8)


# ---------------------------------------------------------------------------------------------
# Dedup


def test_dedup_within_a_session(tmp_path):
    inputs, logits, labels = make_batch(10)
    with CacheWriter(tmp_path, make_meta(), max_samples=4) as writer:
        assert writer.append(range(10), inputs, logits, labels) == 10
        shards_before = writer.shards
        assert writer.append(range(10), inputs, logits, labels) == 0
        assert writer.pending_rows == 2
        assert writer.shards == shards_before
        assert writer.append(range(5, 12), *(a[:7] for a in make_batch(7, seed=9))) == 2
        assert len(writer) == 12
    data = CacheReader(tmp_path).read(("ids",))
    assert data["ids"].tolist() == [str(i) for i in range(12)]


def test_dedup_after_reopening(tmp_path):
    write(tmp_path, 60, max_samples=25)
    files_before = {p.name: sha256(p) for p in tmp_path.glob("shard-*.h5")}
    manifest_before = manifest(tmp_path)["shards"]
    inputs, logits, labels = make_batch(60, seed=1)
    with CacheWriter(tmp_path, make_meta(), max_samples=25) as writer:
        assert len(writer) == 60 and "0" in writer and "59" in writer and "60" not in writer
        assert writer.append(np.arange(60), inputs, logits, labels) == 0
        assert writer.append([str(i) for i in range(30)], inputs[:30], logits[:30], labels[:30]) == 0
        assert writer.pending_rows == 0
    assert {p.name: sha256(p) for p in tmp_path.glob("shard-*.h5")} == files_before
    assert manifest(tmp_path)["shards"] == manifest_before
    with CacheWriter(tmp_path, make_meta(), max_samples=25) as writer:
        assert writer.append(np.arange(55, 70), inputs[:15], logits[:15], labels[:15]) == 10
    ids = CacheReader(tmp_path).read(("ids",))["ids"].tolist()
    assert ids == [str(i) for i in range(70)]


def test_duplicate_ids_within_a_batch_raise(tmp_path):
    inputs, logits, labels = make_batch(3)
    with CacheWriter(tmp_path, make_meta()) as writer:
        with pytest.raises(ValueError, match="unique"):
            writer.append(["a", "b", "a"], inputs, logits, labels)
        with pytest.raises(ValueError, match="unique"):
            writer.append([1, "1", 2], inputs, logits, labels)
        assert len(writer) == 0 and writer.pending_rows == 0
    assert CacheReader(tmp_path).num_samples == 0


# ---------------------------------------------------------------------------------------------
# One writer per directory; one teacher per cache


def test_second_writer_is_refused_while_the_first_is_open(tmp_path):
    first = CacheWriter(tmp_path, make_meta())
    try:
        with pytest.raises(CacheError, match="another writer"):
            CacheWriter(tmp_path, make_meta())
        first.append(range(3), *make_batch(3))
    finally:
        first.close()
    with CacheWriter(tmp_path, make_meta()) as second:
        assert len(second) == 3


def test_lock_is_released_after_abort(tmp_path):
    writer = CacheWriter(tmp_path, make_meta())
    writer.append(range(3), *make_batch(3))
    writer.abort()
    assert not list(tmp_path.glob("*.tmp"))
    with CacheWriter(tmp_path, make_meta()) as again:
        assert len(again) == 0


def test_writer_context_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError), CacheWriter(tmp_path, make_meta()) as writer:
        writer.append(range(3), *make_batch(3))
        raise RuntimeError("boom")
    assert not list(tmp_path.glob("*.tmp"))
    assert CacheReader(tmp_path).num_samples == 0


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"teacher_fingerprint": "cd" * 32}, "teacher_fingerprint"),
        ({"num_classes": 11}, "num_classes"),
        ({"input_shape": (4, 16)}, "input_shape"),
        ({"logits_dtype": "float16"}, "logits_dtype"),
        ({"preprocessing": Preprocessing()}, "preprocessing"),
    ],
)
def test_reopening_with_another_teacher_is_refused(tmp_path, overrides, problem):
    write(tmp_path, 10)
    with pytest.raises(CacheError, match=problem) as excinfo:
        CacheWriter(tmp_path, make_meta(**overrides))
    assert "another teacher or input contract" in str(excinfo.value)
    # The failed writer released the lock and changed nothing.
    with CacheWriter(tmp_path, make_meta()) as writer:
        assert len(writer) == 10


def test_adopting_a_foreign_shard_is_refused(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write(ours, 10)
    write(theirs, 10, meta=make_meta(teacher_fingerprint="cd" * 32), start=100)
    (theirs / "shard-000000.h5").rename(ours / "shard-000001.h5")
    with pytest.raises(CacheError, match=r"shard-000001\.h5.*teacher_fingerprint"):
        CacheWriter(ours, make_meta())


# ---------------------------------------------------------------------------------------------
# Recovery after a crash


def test_stray_tmp_shard_is_removed_on_writer_start(tmp_path):
    write(tmp_path, 30, max_samples=20)
    stray = tmp_path / ".shard-000002.h5.tmp"
    stray.write_bytes(b"half-written shard")
    (tmp_path / ".manifest.json.tmp").write_text('{"half": ')
    reader = CacheReader(tmp_path)
    assert reader.unlisted_files() == [".shard-000002.h5.tmp"]
    assert reader.num_samples == 30
    with CacheWriter(tmp_path, make_meta(), max_samples=20) as writer:
        assert not stray.exists()
        assert not list(tmp_path.glob("*.tmp"))
        assert len(writer) == 30
        writer.append(range(30, 35), *make_batch(5))
    assert check_manifest_matches_files(tmp_path)[-1]["num_samples"] == 5
    assert CacheReader(tmp_path).unlisted_files() == []


def test_shard_missing_from_the_manifest_is_adopted(tmp_path):
    written = write(tmp_path, 70, max_samples=25)
    # Simulate a crash between the rename of the last shard and the manifest update.
    m = manifest(tmp_path)
    dropped = m["shards"].pop()
    assert dropped["name"] == "shard-000002.h5"
    m["num_samples"] -= dropped["num_samples"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    reader = CacheReader(tmp_path)
    assert reader.num_samples == 50
    assert reader.unlisted_files() == ["shard-000002.h5"]
    with CacheWriter(tmp_path, make_meta(), max_samples=25) as writer:
        assert len(writer) == 70
        assert "69" in writer
        # Adoption is published at once, before any new append.
        assert [e["name"] for e in manifest(tmp_path)["shards"]] == shard_files(tmp_path)
        assert writer.append(range(65, 75), *make_batch(10)) == 5
    entries = check_manifest_matches_files(tmp_path)
    assert entries[2] == dropped
    assert [e["num_samples"] for e in entries] == [25, 25, 20, 5]
    reader = CacheReader(tmp_path)
    assert reader.verify() == [] and reader.unlisted_files() == []
    assert reader.read(("ids",))["ids"].tolist() == written["ids"] + [str(i) for i in range(70, 75)]


def test_missing_manifest_is_rebuilt_by_a_writer(tmp_path):
    write(tmp_path, 50, max_samples=20)
    before = manifest(tmp_path)["shards"]
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(CacheError, match="missing, but 3 shard file"):
        CacheReader(tmp_path)
    with CacheWriter(tmp_path, make_meta()) as writer:
        assert len(writer) == 50
    assert manifest(tmp_path)["shards"] == before
    assert CacheReader(tmp_path).verify() == []


def test_reader_errors_name_the_directory(tmp_path):
    with pytest.raises(CacheError, match="no such cache directory"):
        CacheReader(tmp_path / "nope")
    with pytest.raises(CacheError, match="empty cache directory"):
        CacheReader(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CacheError, match="unreadable manifest"):
        CacheReader(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "something-else", "shards": []}))
    with pytest.raises(CacheError, match="not a kd-cache manifest"):
        CacheReader(tmp_path)


# ---------------------------------------------------------------------------------------------
# Versions and layouts this code does not know


def edit_manifest(directory: Path, edit) -> None:
    m = manifest(directory)
    edit(m)
    (directory / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["top", "meta"])
def test_newer_schema_version_is_refused(tmp_path, where):
    write(tmp_path, 10)

    def bump(m):
        (m if where == "top" else m["meta"])["schema_version"] = SCHEMA_VERSION + 1

    edit_manifest(tmp_path, bump)
    for opener in (lambda: CacheReader(tmp_path), lambda: CacheWriter(tmp_path, make_meta())):
        with pytest.raises(CacheError) as excinfo:
            opener()
        message = str(excinfo.value)
        assert MANIFEST_NAME in message
        assert f"schema version {SCHEMA_VERSION + 1}" in message
        assert "upgrade" in message


def test_unknown_logits_layout_is_refused(tmp_path):
    write(tmp_path, 10)
    edit_manifest(tmp_path, lambda m: m["meta"].update(logits_layout="ranked:3"))
    with pytest.raises(CacheError, match=r"manifest\.json.*logits layout 'ranked:3' is not supported"):
        CacheReader(tmp_path)
    with pytest.raises(CacheError, match="logits layout 'ranked:3'"):
        CacheWriter(tmp_path, make_meta())


def test_a_manifest_whose_views_per_id_disagrees_with_its_shards_is_refused(tmp_path):
    """Caches with views are supported (tests/test_cache_views.py); a manifest that claims views
    its shards do not hold is refused, naming the shard."""
    write(tmp_path, 10)
    edit_manifest(tmp_path, lambda m: m["meta"].update(views_per_id=2))
    with pytest.raises(CacheError, match=r"shard-000000\.h5: views_per_id is 1, expected 2"):
        CacheReader(tmp_path)


def test_shard_with_newer_schema_or_layout_is_refused(tmp_path):
    """The shard's own attributes are checked too, not only the manifest's copy."""
    write(tmp_path, 10)
    path = tmp_path / "shard-000000.h5"
    with h5py.File(path, "r+") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION + 1
    # Keep the manifest's size/checksum consistent so only the version is wrong.
    edit_manifest(tmp_path, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=sha256(path)))
    with pytest.raises(CacheError, match=rf"shard-000000\.h5.*schema version {SCHEMA_VERSION + 1}"):
        CacheReader(tmp_path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION
        h5.attrs["logits_layout"] = "ranked:3"
    edit_manifest(tmp_path, lambda m: m["shards"][0].update(bytes=path.stat().st_size, sha256=sha256(path)))
    with pytest.raises(CacheError, match=r"shard-000000\.h5.*logits layout 'ranked:3'"):
        CacheReader(tmp_path)


# ---------------------------------------------------------------------------------------------
# Chunking


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((8, 8), "uint8"), ((3, 32, 32), "uint8"), ((1, 256, 256), "float32"), ((5,), "float32")],
)
def test_datasets_are_chunked_by_whole_rows(tmp_path, shape, dtype):
    meta = make_meta(input_shape=shape, input_dtype=dtype)
    full = meta.chunk_rows()
    item_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    assert full == min(16384, max(16, (1 << 20) // item_bytes))
    n = full + 5 if full <= 64 else 40  # a shard of more than one chunk where that stays small
    x = np.zeros((n, *shape), dtype=dtype)
    with CacheWriter(tmp_path, meta, max_samples=n) as writer:
        writer.append(range(n), x, np.zeros((n, 10), dtype=np.float32))
    with h5py.File(tmp_path / "shard-000000.h5", "r") as h5:
        rows = int(h5.attrs["chunk_rows"])
        # A shard smaller than one chunk is rewritten with one chunk of its own size.
        assert rows == (full if n >= full else n)
        assert h5["ids"].chunks == (rows,)
        assert h5["inputs"].chunks == (rows, *shape)
        assert h5["labels"].chunks == (rows,)
        assert h5["logits"].chunks == (rows, 10)
        assert h5["ids"].shape == (n,)
        for name in ("ids", "inputs", "labels", "logits"):
            assert h5[name].maxshape[0] is None
            assert h5[name].shape[0] == n


# ---------------------------------------------------------------------------------------------
# Transfer sets


def test_read_transfer_set(tmp_path):
    path = tmp_path / "set.npz"
    inputs, _, labels = make_batch(6)
    np.savez(path, inputs=inputs, labels=labels.astype(np.int32), ids=np.arange(6))
    arrays = read_transfer_set(path)
    np.testing.assert_array_equal(arrays["inputs"], inputs)
    assert arrays["inputs"].dtype == np.uint8
    assert arrays["labels"].dtype == np.int64
    assert arrays["ids"].tolist() == [str(i) for i in range(6)]


def test_read_transfer_set_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(CacheError, match="no such file") as excinfo:
        read_transfer_set(missing)
    assert str(missing) in str(excinfo.value)

    no_inputs = tmp_path / "no_inputs.npz"
    np.savez(no_inputs, labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(CacheError, match="no 'inputs' array") as excinfo:
        read_transfer_set(no_inputs)
    assert str(no_inputs) in str(excinfo.value)
    assert "labels" in str(excinfo.value)

    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, inputs=np.zeros((4, 8, 8), dtype=np.uint8), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(CacheError, match="labels must be 4 integers") as excinfo:
        read_transfer_set(bad_labels)
    assert str(bad_labels) in str(excinfo.value)

    float_labels = tmp_path / "float_labels.npz"
    np.savez(float_labels, inputs=np.zeros((4, 8, 8), dtype=np.uint8), labels=np.zeros(4))
    with pytest.raises(CacheError, match="labels must be 4 integers") as excinfo:
        read_transfer_set(float_labels)
    assert str(float_labels) in str(excinfo.value)

    not_npz = tmp_path / "garbage.npz"
    not_npz.write_bytes(b"this is not a zip file")
    with pytest.raises(CacheError, match="not a readable .npz") as excinfo:
        read_transfer_set(not_npz)
    assert str(not_npz) in str(excinfo.value)


def test_small_shards_are_not_mostly_empty_chunks(tmp_path):
    meta = make_meta(input_shape=(8, 8), input_dtype="uint8")
    n = 100
    with CacheWriter(tmp_path, meta, max_samples=n) as writer:
        writer.append(range(n), np.ones((n, 8, 8), np.uint8), np.ones((n, 10), np.float32), np.arange(n) % 10)
    reader = CacheReader(tmp_path)
    assert reader.total_bytes / n < 4 * meta.row_bytes()
    data = reader.read()
    assert data["ids"].tolist() == [str(i) for i in range(n)] and (data["labels"] == np.arange(n) % 10).all()


def test_lookup_and_read_logits_across_published_and_open_shards(tmp_path):
    meta = CacheMeta(teacher_fingerprint="f" * 64, teacher_name="t", num_classes=3, input_shape=(2,), input_dtype="uint8")
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 255, (50, 2), dtype=np.uint8)
    logits = rng.normal(size=(50, 3)).astype(np.float32)
    ids = [f"s{i}" for i in range(50)]
    writer = CacheWriter(tmp_path / "c", meta, max_samples=20)
    writer.append(ids[:45], inputs[:45], logits[:45])  # two published shards of 20, 5 rows open
    assert writer.pending_rows == 5
    query = ["s44", "s0", "missing", "s21", "s19", "s3"]
    rows = writer.lookup(query)
    assert rows[2] == -1
    found = rows >= 0
    expected = logits[[int(q[1:]) for q, ok in zip(query, found, strict=True) if ok]]
    np.testing.assert_array_equal(writer.read_logits(rows[found]), expected)
    writer.close()
    reopened = CacheWriter(tmp_path / "c", meta, max_samples=20)  # the index is rebuilt from the shards
    rows = reopened.lookup(ids[:45])
    np.testing.assert_array_equal(reopened.read_logits(rows), logits[:45])
    reopened.append(ids[45:], inputs[45:], logits[45:])
    np.testing.assert_array_equal(reopened.read_logits(reopened.lookup(ids)), logits)
    reopened.close()


def test_staged_and_written_rows_of_the_open_shard_read_back_alike(tmp_path):
    """Appends are staged and reach HDF5 in pieces of at least one chunk; hits must see both."""
    meta = CacheMeta(teacher_fingerprint="f" * 64, teacher_name="t", num_classes=4, input_shape=(1 << 16,), input_dtype="uint8")
    assert meta.chunk_rows() == 16
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(25, 4)).astype(np.float32)
    inputs = np.zeros((25, 1 << 16), dtype=np.uint8)
    with CacheWriter(tmp_path / "c", meta) as writer:
        for start, stop in ((0, 10), (10, 20), (20, 25)):  # 10 staged; 20 written at once; 5 staged
            writer.append([f"s{i}" for i in range(start, stop)], inputs[start:stop], logits[start:stop])
        assert writer.pending_rows == 25
        np.testing.assert_array_equal(writer.read_logits(writer.lookup([f"s{i}" for i in range(25)])), logits)
    np.testing.assert_array_equal(CacheReader(tmp_path / "c").read(("logits",))["logits"], logits)
