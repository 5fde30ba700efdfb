"""The streaming dataset: exactly one pass per epoch across ranks and workers, reshuffled per
epoch, bounded buffers, and refusal to mix incompatible caches."""


import numpy as np
import pytest
import torch
from digits import PREPROCESSING

from kdcache.offline.cache import CacheError, CacheMeta, CacheWriter
from kdcache.offline.dataset import ShardStream, open_caches


def make_cache(directory, sizes, *, fingerprint="a" * 64, num_classes=10, id_prefix="s"):
    meta = CacheMeta(fingerprint, "t", num_classes, (4, 4), "uint8", PREPROCESSING)
    rng = np.random.default_rng(len(sizes))
    next_id = 0
    with CacheWriter(directory, meta) as writer:
        for size in sizes:  # one shard per entry, of uneven sizes
            ids = [f"{id_prefix}{i}" for i in range(next_id, next_id + size)]
            next_id += size
            writer.append(ids, rng.integers(0, 255, (size, 4, 4), dtype=np.uint8), rng.normal(size=(size, num_classes)).astype(np.float32))
            writer.flush_shard()
    return directory


def collect(directory, *, rank, world, workers, epoch=0, batch_size=16, seed=0):
    readers, meta = open_caches([str(directory)])
    stream = ShardStream.from_readers(readers, meta, batch_size=batch_size, with_ids=True, shuffle_buffer=64, seed=seed, rank=rank, world_size=world)
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    batches = list(loader)
    return [i for b in batches for i in b["ids"]], batches, stream


def test_two_ranks_two_workers_see_each_sample_once(tmp_path):
    directory = make_cache(tmp_path / "c", [300, 17, 128, 250, 5, 200, 100])
    total = 1000
    ids = []
    for rank in range(2):
        rank_ids, batches, stream = collect(directory, rank=rank, world=2, workers=2)
        assert len(batches) == stream.num_batches(2)
        assert all(b["inputs"].dtype == torch.uint8 and b["logits"].shape[1] == 10 for b in batches)
        ids += rank_ids
    assert len(ids) == total and len(set(ids)) == total


def test_each_epoch_is_a_new_order_and_reproducible(tmp_path):
    directory = make_cache(tmp_path / "c", [200, 150, 250])
    first, _, _ = collect(directory, rank=0, world=1, workers=0, epoch=0)
    again, _, _ = collect(directory, rank=0, world=1, workers=0, epoch=0)
    second, _, _ = collect(directory, rank=0, world=1, workers=0, epoch=1)
    assert first == again
    assert sorted(first) == sorted(second) and first != second


def test_persistent_workers_follow_set_epoch(tmp_path):
    directory = make_cache(tmp_path / "c", [200, 150, 250])
    readers, meta = open_caches([str(directory)])
    stream = ShardStream.from_readers(readers, meta, batch_size=32, with_ids=True, shuffle_buffer=64, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        orders.append([i for b in loader for i in b["ids"]])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    reference, _, _ = collect(directory, rank=0, world=1, workers=2, epoch=1, batch_size=32)
    assert orders[1] == reference


def test_shuffle_mixes_within_a_worker_and_batches_are_full(tmp_path):
    directory = make_cache(tmp_path / "c", [256, 256])
    ids, batches, _ = collect(directory, rank=0, world=1, workers=0, batch_size=32)
    assert [len(b["ids"]) for b in batches] == [32] * 16
    positions = [int(i[1:]) for i in ids]
    assert positions != sorted(positions)
    # the first batch draws from more than one chunk-aligned block
    assert len({p // 64 for p in positions[:32]}) > 1


def test_mixed_teachers_refused_unless_allowed(tmp_path):
    a = make_cache(tmp_path / "a", [50], fingerprint="a" * 64)
    b = make_cache(tmp_path / "b", [50], fingerprint="b" * 64, id_prefix="t")
    with pytest.raises(CacheError, match="--allow-mixed-teachers"):
        open_caches([str(a), str(b)])
    readers, _ = open_caches([str(a), str(b)], allow_mixed_teachers=True)
    assert sum(r.num_samples for r in readers) == 100


def test_different_class_counts_never_mix(tmp_path):
    a = make_cache(tmp_path / "a", [50])
    b = make_cache(tmp_path / "b", [50], num_classes=5, id_prefix="t")
    for allow in (False, True):
        with pytest.raises(CacheError, match="num_classes"):
            open_caches([str(a), str(b)], allow_mixed_teachers=allow)


def test_a_refused_mix_names_only_the_differences_and_their_reasons(tmp_path):
    def cache(name, classes=6, shape=(4,), **fields):
        meta = CacheMeta("a" * 64, "t", classes, shape, "float32", PREPROCESSING, **fields)
        rng = np.random.default_rng(0)
        with CacheWriter(tmp_path / name, meta) as writer:
            writer.append([f"{name}{i}" for i in range(8)], rng.random((8, *shape), dtype=np.float32), rng.normal(size=(8, classes)))
        return str(tmp_path / name)

    full, topk = cache("full"), cache("topk", logits_layout="topk:2")
    with pytest.raises(CacheError) as refused:
        open_caches([full, topk])
    assert str(refused.value) == (
        f"{topk}: cannot be mixed with {full}: logits_layout is 'topk:2', expected 'full' (each target layout has its own soft "
        "term; cache-convert re-encodes a cache of full logits into another layout)"
    )
    other = cache("other", classes=5, shape=(2, 2))
    with pytest.raises(CacheError) as refused:
        open_caches([full, other])
    message = str(refused.value)
    assert "num_classes is 5, expected 6 (soft targets over different class counts" in message
    assert "; input_shape is (2, 2), expected (4,) (inputs of different shapes cannot share a batch)" in message
    assert "layout" not in message and "dtype" not in message


def rows_by_id(directory):
    from kdcache.offline.cache import CacheReader

    stored = CacheReader(directory).read(("ids", "inputs", "logits", "labels"))
    return {i: (stored["inputs"][k], stored["logits"][k], stored["labels"][k]) for k, i in enumerate(stored["ids"])}


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_keeps_its_own_inputs_logits_and_labels(tmp_path, shuffle):
    # Small blocks, a small shuffle window and a batch size that divides nothing: the rows left
    # over after each window's whole batches move to the front of the buffer many times.
    directory = make_cache(tmp_path / "c", [300, 17, 128, 250, 5])
    readers, meta = open_caches([str(directory)])
    stream = ShardStream.from_readers(
        readers, meta, batch_size=23, shuffle=shuffle, shuffle_buffer=50, block_rows=16, with_ids=True, rank=0, world_size=1
    )
    expected = rows_by_id(directory)
    seen = []
    for batch in stream:
        for k, sample_id in enumerate(batch["ids"]):
            inputs, logits, label = expected[sample_id]
            assert np.array_equal(batch["inputs"][k].numpy(), inputs)
            assert np.array_equal(batch["logits"][k].numpy(), logits)
            assert batch["labels"][k].item() == label
        seen += list(batch["ids"])
    assert sorted(seen) == sorted(expected)
    if not shuffle:
        assert seen == [f"s{i}" for i in range(700)]


def test_float16_and_float32_logits_from_two_caches_share_a_batch_as_float32(tmp_path):
    meta32 = CacheMeta("a" * 64, "t", 10, (4, 4), "uint8", PREPROCESSING)
    meta16 = CacheMeta("a" * 64, "t", 10, (4, 4), "uint8", PREPROCESSING, logits_dtype="float16")
    rng = np.random.default_rng(0)
    for name, meta in (("c16", meta16), ("c32", meta32)):
        with CacheWriter(tmp_path / name, meta) as writer:
            writer.append([f"{name}-{i}" for i in range(40)], rng.integers(0, 255, (40, 4, 4), dtype=np.uint8), rng.normal(size=(40, 10)).astype(np.float32))
    readers, meta = open_caches([str(tmp_path / "c16"), str(tmp_path / "c32")])
    stream = ShardStream.from_readers(readers, meta, batch_size=80, shuffle=False, with_ids=True, rank=0, world_size=1)
    (batch,) = list(stream)
    assert batch["logits"].dtype == torch.float32
    expected = {**rows_by_id(tmp_path / "c16"), **rows_by_id(tmp_path / "c32")}
    for k, sample_id in enumerate(batch["ids"]):
        assert np.array_equal(batch["logits"][k].numpy(), expected[sample_id][1].astype(np.float32))
