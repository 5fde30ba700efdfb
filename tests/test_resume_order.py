"""Issue 23, deterministic order and resume: the order of an epoch's samples is a function of
(seed, epoch, the caches) alone, the same for any number of DataLoader workers and ranks; ranks
take slices of each global batch, so every sample is trained on once per epoch; and a run
stopped mid-epoch (``--checkpoint-every``) resumes to the same weights, or on another world
size in the same order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from digits import PREPROCESSING

from kdcache.offline import train
from kdcache.offline.cache import CacheMeta, CacheWriter
from kdcache.offline.cli import distill_main
from kdcache.offline.dataset import ShardStream, Split, open_caches, plan_epoch
from kdcache.offline.lm import train as lm_train
from kdcache.offline.outputs import Checkpoint

SIZES = [70, 9, 45, 90, 31]  # uneven shards: 245 samples
WINDOW, BLOCK = 40, 16  # small shuffle windows of small blocks: batches straddle windows


def make_cache(directory, sizes=SIZES, num_classes=10):
    meta = CacheMeta("a" * 64, "t", num_classes, (4, 4), "uint8", PREPROCESSING)
    rng = np.random.default_rng(0)
    first = 0
    with CacheWriter(directory, meta) as writer:
        for size in sizes:
            ids = [f"s{i}" for i in range(first, first + size)]
            first += size
            logits = rng.normal(size=(size, num_classes)).astype(np.float32)
            writer.append(ids, rng.integers(0, 16, (size, 4, 4), dtype=np.uint8), logits, logits.argmax(1))
            writer.flush_shard()
    return str(directory)


def stream_of(cache, *, rank=0, world=1, batch_size=8, seed=3):
    readers, meta = open_caches([cache])
    return ShardStream.from_readers(
        readers, meta, batch_size=batch_size, seed=seed, shuffle_buffer=WINDOW, block_rows=BLOCK, with_ids=True, rank=rank, world_size=world
    )  # fmt: skip


def ids(batches):
    return [list(batch["ids"]) for batch in batches]


def epoch_ids(cache, epoch, *, rank=0, world=1, start=0, **kwargs):
    stream = stream_of(cache, rank=rank, world=world, **kwargs)
    stream.set_epoch(epoch, start)
    return ids(stream)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The students are tiny: one thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("order") / "c")


# ---- the order ----


@pytest.mark.parametrize("seed", range(12))
def test_an_epoch_is_a_permutation_of_its_samples_in_chunk_aligned_blocks(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 300, rng.integers(1, 8)).tolist()
    repeats = [rng.integers(0, 3, size) for size in sizes] if seed % 2 else None
    plan = plan_epoch(
        sizes, epoch=2, seed=seed, block_rows=32, window_rows=50, shuffle=True, counts=None if repeats is None else repeats.__getitem__
    )  # fmt: skip
    rows = Counter((b.shard, row) for b in plan.blocks for row in range(b.start, b.stop))
    assert rows == Counter((shard, row) for shard, size in enumerate(sizes) for row in range(size))
    assert all(b.stop - b.start <= 32 and b.start % 32 == 0 for b in plan.blocks)
    expected = sum(sizes) if repeats is None else int(sum(r.sum() for r in repeats))
    positions = np.concatenate([plan.positions(i) for i in range(len(plan.blocks))] or [np.zeros(0, int)])
    assert plan.samples == expected and sorted(positions.tolist()) == list(range(expected))
    windows = [plan.window_end(w) - plan.offsets[plan.windows[w]] for w in range(len(plan.windows) - 1)]
    assert all(size >= 50 for size in windows[:-1])


@pytest.mark.parametrize(("samples", "start", "batch_size", "world"), [(245, 0, 8, 2), (245, 48, 8, 3), (17, 0, 4, 5), (3, 0, 2, 4)])
def test_each_global_batch_is_shared_by_the_ranks_the_short_last_one_evenly(samples, start, batch_size, world):
    split = Split(start, samples, batch_size, world)
    owners = split.owners(np.arange(samples))
    assert (owners[:start] == -1).all() and (owners[start:] >= 0).all()
    for batch in range(split.num_batches):
        first = start + batch * split.global_batch
        sizes = np.bincount(owners[first : split.end(batch)], minlength=world)
        full = split.end(batch) - first == split.global_batch
        assert (sizes == batch_size).all() if full else sizes.max() - sizes.min() <= 1 and list(sizes) == sorted(sizes, reverse=True)
    assert [split.rank_batches(r) for r in range(world)] == [
        len({(p - start) // split.global_batch for p in np.flatnonzero(owners == r)}) for r in range(world)
    ]


def test_the_batches_are_the_same_for_any_number_of_workers(cache):
    for world in (1, 2):
        for rank in range(world):
            stream = stream_of(cache, rank=rank, world=world)
            in_process, two_workers = stream.loader(0), stream.loader(2)  # persistent workers follow set_epoch
            for epoch, start in ((0, 0), (1, 0), (1, 4 * 8 * world)):
                stream.set_epoch(epoch, start)
                expected = ids(stream)
                assert len(expected) == stream.num_batches() == len(two_workers)
                assert ids(in_process) == expected and ids(two_workers) == expected
            # A plain DataLoader over the stream: each worker yields its turn of the same batches.
            assert ids(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)) == expected


@pytest.mark.parametrize(("world", "then"), [(2, 3), (3, 1)])
def test_ranks_take_slices_of_the_global_order_and_another_world_size_continues_it(cache, world, then):
    """W ranks' k-th batches, laid end to end, are the k-th global batch of the one-process
    order; after 3 global batches on W ranks, ``then`` ranks continue it from that position."""
    for epoch in (0, 1):
        order = [i for batch in epoch_ids(cache, epoch) for i in batch]
        assert sorted(order) == sorted(f"s{i}" for i in range(sum(SIZES)))
        stopped = 3 * 8 * world
        before = [epoch_ids(cache, epoch, rank=r, world=world)[:3] for r in range(world)]
        after = [epoch_ids(cache, epoch, rank=r, world=then, start=stopped) for r in range(then)]
        assert all(len(batch) == 8 for part in before + after[:-1] for batch in part[:-1])
        rest = [i for k in range(len(after[0])) for part in after if k < len(part) for i in part[k]]
        assert [i for k in range(3) for part in before for i in part[k]] + rest == order


# ---- resuming mid-epoch ----


def distill(*args):
    return distill_main([str(a) for a in args])


def stop_at(monkeypatch, module, call):
    """Interrupt ``module.train_step`` at its ``call``-th call, as a kill between two steps would."""
    original, calls = module.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", step)
    return original


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(cache, tmp_path, monkeypatch):
    """31 steps per epoch of 8; checkpoints every 5 steps; stopped during step 38, it resumes
    from step 35, 4 steps into epoch 2, with 2 DataLoader workers instead of none: the same
    weights bit for bit (torch.equal), dropout included (mlp-teacher)."""
    args = ["--cache", cache, "--student", "mlp-teacher", "--epochs", 2, "--batch-size", 8, "--lr", "1e-3", "--seed", 4,
            "--shuffle-buffer", WINDOW, "--checkpoint-every", 5, "--no-export", "--no-progress", "--no-verify-checksums"]  # fmt: skip
    assert distill(*args, "--out", tmp_path / "straight", "--workers", 0) == 0
    original = stop_at(monkeypatch, train, 38)
    assert distill(*args, "--out", tmp_path / "stopped", "--workers", 0) == 130
    checkpoint = Checkpoint.load(tmp_path / "stopped" / "checkpoint.pt", torch.device("cpu"))
    assert (checkpoint.epoch, checkpoint.steps, checkpoint.sample_in_epoch) == (1, 35, 4 * 8)
    monkeypatch.setattr(train, "train_step", original)
    assert distill(*args, "--out", tmp_path / "stopped", "--workers", 2, "--resume") == 0
    straight, resumed = (torch.load(tmp_path / run / "student.pt", weights_only=True)["state_dict"] for run in ("straight", "stopped"))
    assert same_weights(straight, resumed)
    history = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "stopped")
    ]
    assert [h["samples"] for h in history[1]] == [sum(SIZES)] * 2
    assert [h["train_loss"] for h in history[1]] == pytest.approx([h["train_loss"] for h in history[0]], rel=1e-9)


def test_a_checkpoint_from_before_positions_resumes_at_its_epochs_end(cache, tmp_path, monkeypatch):
    args = ["--cache", cache, "--student", "mlp-small", "--epochs", 2, "--batch-size", 8, "--no-export", "--no-progress"]
    assert distill(*args, "--out", tmp_path / "straight") == 0
    original = stop_at(monkeypatch, train, 33)  # 2 steps into epoch 2, no --checkpoint-every
    assert distill(*args, "--out", tmp_path / "stopped") == 130
    path = tmp_path / "stopped" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["steps"], state["sample_in_epoch"]) == (1, 31, 0)
    torch.save({key: state[key] for key in ("model", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "epoch", "history", "config")}, path)
    monkeypatch.setattr(train, "train_step", original)
    assert distill(*args, "--out", tmp_path / "stopped", "--resume") == 0
    straight, resumed = (torch.load(tmp_path / run / "student.pt", weights_only=True)["state_dict"] for run in ("straight", "stopped"))
    assert same_weights(straight, resumed)


def test_a_run_stopped_mid_epoch_is_not_resumed_in_another_order(cache, tmp_path, monkeypatch, capsys):
    args = ["--cache", cache, "--epochs", 1, "--batch-size", 8, "--checkpoint-every", 2, "--no-export", "--no-progress", "--out", tmp_path]
    stop_at(monkeypatch, train, 4)
    assert distill(*args) == 130
    capsys.readouterr()
    assert distill(*args, "--resume", "--seed", 1) == 2
    assert (
        "stopped after 16 samples of epoch 1, in an order of samples that this run does not have: seed 0 (now 1)" in capsys.readouterr().err
    )


def token_cache(directory, n=48, vocab=32, length=8):
    meta = CacheMeta("ab" * 32, "bigram", vocab, (length,), "int64", logits_layout="topk:4", task="lm", tokenizer_fingerprint="cd" * 32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (n, length))
    lengths = rng.integers(2, length + 1, n)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    with CacheWriter(directory, meta, max_samples=20) as writer:
        writer.append([f"s{i}" for i in range(n)], tokens, rng.normal(size=(n, length, vocab)).astype(np.float32), lengths=lengths)
    return str(directory)


def test_a_language_model_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """6 steps per epoch of 8 sequences, checkpoints every 4: stopped during step 10, resumed
    from step 8, 2 steps into epoch 2."""
    args = ["--cache", token_cache(tmp_path / "c"), "--task", "lm", "--student", "gpt:layers=1,dim=16,heads=2,dropout=0.1",
            "--epochs", 2, "--batch-size", 8, "--shuffle-buffer", 16, "--checkpoint-every", 4, "--no-progress", "--no-verify-checksums"]  # fmt: skip
    assert distill(*args, "--out", tmp_path / "straight") == 0
    original = stop_at(monkeypatch, lm_train, 10)
    assert distill(*args, "--out", tmp_path / "stopped") == 130
    checkpoint = Checkpoint.load(tmp_path / "stopped" / "checkpoint.pt", torch.device("cpu"))
    assert (checkpoint.epoch, checkpoint.steps, checkpoint.sample_in_epoch) == (1, 8, 2 * 8)
    monkeypatch.setattr(lm_train, "train_step", original)
    assert distill(*args, "--out", tmp_path / "stopped", "--resume", "--workers", 1) == 0
    straight, resumed = (torch.load(tmp_path / run / "student.pt", weights_only=True)["state_dict"] for run in ("straight", "stopped"))
    assert same_weights(straight, resumed)


# ---- torchrun ----


def traced(directory, rank):
    path = directory / f"ids-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_two_ranks_see_each_sample_once_per_epoch_and_continue_a_one_process_run_in_its_order(cache, tmp_path, monkeypatch):
    """A run on one process stopped after 3 steps (its checkpoint at step 3) is resumed by
    torchrun on two CPU processes (gloo), each writing the ids it trains on (KDCACHE_TRACE_IDS):
    epoch 1 from sample 24 and epoch 2 are the one-process order, each global batch the two
    ranks' slices end to end, every sample once per epoch."""
    out, single, double = tmp_path / "run", tmp_path / "single", tmp_path / "double"
    single.mkdir(), double.mkdir()
    args = ["--cache", cache, "--student", "mlp-small", "--epochs", 2, "--batch-size", 8, "--seed", 3, "--shuffle-buffer", WINDOW,
            "--checkpoint-every", 3, "--no-export", "--no-progress", "--out", out]  # fmt: skip
    monkeypatch.setenv(train.TRACE_ENV, str(single))
    stop_at(monkeypatch, train, 4)
    assert distill(*args) == 130
    env = {**os.environ, "OMP_NUM_THREADS": "1", train.TRACE_ENV: str(double)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kdcache.offline.cli",
         *map(str, args), "--resume"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after 24 of its samples" in proc.stdout and "on 1 process(es), this run on 2" in proc.stdout
    steps = {rank: traced(double, rank) for rank in (0, 1)}
    for epoch in (0, 1):
        seen = [i for e, _, batch in traced(single, 0) if e == epoch for i in batch]
        ends = sorted({end for rank in (0, 1) for e, end, _ in steps[rank] if e == epoch})
        for end in ends:
            seen += [i for rank in (0, 1) for e, at, batch in steps[rank] if (e, at) == (epoch, end) for i in batch]
        assert Counter(seen) == Counter(f"s{i}" for i in range(sum(SIZES)))  # every sample once
        assert seen == reference_order(cache, epoch)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["train_samples"] == 2 * sum(SIZES)


def reference_order(cache, epoch):
    """The one-process order as the trainer's stream makes it (its default block size)."""
    readers, meta = open_caches([cache])
    stream = ShardStream.from_readers(readers, meta, batch_size=8, seed=3, shuffle_buffer=WINDOW, with_ids=True)
    stream.set_epoch(epoch)
    return [i for batch in stream for i in batch["ids"]]
