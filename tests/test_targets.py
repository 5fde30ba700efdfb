"""Compressed target layouts (``topk:K``, ``sampled:N``): their encodings against their
definitions, their soft terms against the formulas written out here independently, the sampled
term's gradient against the full one (statistically: unbiased, and a biased variant is caught),
and the trainer's refusals (another temperature, mse, mixed layouts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdcache.offline.cache import CacheMeta, CacheWriter
from kdcache.offline.cache.layout import PerView, Sampled, TopK, index_dtype, make_layout
from kdcache.offline.cache.rng import draw_seeds
from kdcache.offline.losses import distillation_loss, soft_term
from kdcache.offline.train import TrainConfig, TrainError, train

T = 2.0


def softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logits(rows: int = 6, classes: int = 12, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, classes)) * 3).astype(np.float32)


def tensors(fields: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in fields.items()}


# ---- encodings ----


@pytest.mark.parametrize(("classes", "dtype"), [(2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_indices_are_the_narrowest_unsigned_integer_never_a_float(classes, dtype):
    assert index_dtype(classes) == np.dtype(dtype)
    fields = TopK(1, classes=classes).fields(classes)
    assert fields["topk_indices"][1] == np.dtype(dtype)
    assert Sampled(3, classes=classes).fields(classes)["sample_indices"][1] == np.dtype(dtype)


def test_topk_holds_the_k_largest_logits_their_classes_and_the_log_tail_mass():
    v = logits()
    layout = make_layout("topk:4", num_classes=12, temperature=T, dtype="float16")
    fields = layout.encode(v)
    order = np.argsort(-v, axis=1)[:, :4]
    np.testing.assert_array_equal(fields["topk_indices"], order)
    np.testing.assert_array_equal(fields["topk_values"], np.take_along_axis(v, order, 1).astype(np.float16))
    p = softmax(v, T)
    tail = 1 - np.take_along_axis(p, order, 1).sum(1)
    np.testing.assert_allclose(np.exp(fields["tail_logmass"]), tail, rtol=1e-5)
    assert layout.row_bytes(12) == 4 * 2 + 4 * 1 + 4
    # what a cache hit answers: the K classes' probabilities exactly, the tail spread evenly
    hit = softmax(layout.decode(fields), T)
    np.testing.assert_allclose(np.take_along_axis(hit, order, 1), np.take_along_axis(p, order, 1), atol=2e-3)  # float16 values
    np.testing.assert_allclose(hit.sum(1), 1, rtol=1e-6)
    rest = np.ones_like(p, dtype=bool)
    np.put_along_axis(rest, order, False, axis=1)
    np.testing.assert_allclose(hit[rest].reshape(6, 8), np.repeat(tail[:, None] / 8, 8, 1), rtol=1e-3)
    assert layout.problem(fields) is None
    fields["topk_values"][0, 0] = np.nan
    assert "non-finite" in layout.problem(fields)


def test_sampled_draws_follow_the_soft_targets_and_are_a_function_of_the_id():
    v = logits(rows=2, classes=5)
    layout = make_layout("sampled:20000", num_classes=5, temperature=T, seed=7)
    seeds = draw_seeds(7, ["a", "b"], 1)[:, 0]
    fields = layout.encode(v, seeds)
    assert fields["sample_counts"].dtype == np.uint16 and fields["sample_indices"].shape == (2, 5)
    np.testing.assert_array_equal(fields["sample_counts"].sum(1), 20000)
    frequencies = np.zeros((2, 5))
    np.add.at(frequencies, (np.arange(2)[:, None].repeat(5, 1), fields["sample_indices"].astype(int)), fields["sample_counts"] / 20000)
    np.testing.assert_allclose(frequencies, softmax(v, T), atol=0.015)  # 20,000 draws: a few standard errors
    # the same id draws the same classes in any batch; another seed draws others
    alone = layout.encode(v[1:], seeds[1:])
    np.testing.assert_array_equal(alone["sample_counts"][0], fields["sample_counts"][1])
    other = make_layout("sampled:20000", num_classes=5, temperature=T, seed=8).encode(v, draw_seeds(8, ["a", "b"], 1)[:, 0])
    assert not np.array_equal(other["sample_counts"], fields["sample_counts"])
    with pytest.raises(ValueError, match="draw seed"):
        layout.encode(v)


def test_sampled_keeps_distinct_classes_most_drawn_first_with_empty_slots_zero():
    layout = make_layout("sampled:6", num_classes=4, seed=0)
    v = np.array([[10.0, 0, 0, 0]], dtype=np.float32)  # all mass on class 0
    fields = layout.encode(v, np.array([3]))
    np.testing.assert_array_equal(fields["sample_indices"], [[0, 0, 0, 0]])
    np.testing.assert_array_equal(fields["sample_counts"], [[6, 0, 0, 0]])
    decoded = softmax(layout.decode(fields))
    np.testing.assert_allclose(decoded, [[1, 0, 0, 0]], atol=1e-30)
    fields["sample_counts"][0, 1] = 1
    assert "do not add up" in layout.problem(fields)


def test_layouts_per_view_encode_each_view_and_keep_shapes():
    v = np.stack([logits(seed=1), logits(seed=2)], axis=1)  # [6, 2, 12]
    for spec in ("topk:3", "sampled:5"):
        layout = make_layout(spec, views=2, num_classes=12, temperature=T, seed=1)
        assert isinstance(layout, PerView) and layout.spec == spec
        seeds = draw_seeds(1, [str(i) for i in range(6)], 2)
        fields = layout.encode(v, seeds)
        for name, (shape, dtype) in layout.fields(12).items():
            assert fields[name].shape == (6, *shape) and fields[name].dtype == dtype
        inner = layout.inner.encode(v[:, 1], seeds[:, 1])
        for name in inner:
            np.testing.assert_array_equal(fields[name][:, 1], inner[name])
        assert layout.decode(fields).shape == (6, 2, 12)
        np.testing.assert_array_equal(layout.served(v), v)  # fresh answers are the teacher's own logits


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topk:12", "K < C"),
        ("topk:0", "K >= 1"),
        ("sampled:0", "N >= 1"),
        ("topk", "integer K"),
        ("ranked:3", "unknown"),
        ("full:2", "no number"),
    ],
)
def test_bad_layouts_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        CacheMeta("f", "t", 12, (3,), "float32", logits_layout=spec)


# ---- soft terms against their definitions ----


def test_topk_bucket_term_is_the_kl_over_k_plus_one_buckets():
    v, z = logits(), torch.from_numpy(logits(seed=5)).double()
    layout = make_layout("topk:3", num_classes=12, temperature=T)
    got = soft_term("topk", "bucket")(z, tensors(layout.target(layout.encode(v))), T).numpy()
    p, q = softmax(v, T), softmax(z.numpy(), T)
    idx = np.argsort(-v, 1)[:, :3]
    p_b = np.concatenate([np.take_along_axis(p, idx, 1), 1 - np.take_along_axis(p, idx, 1).sum(1, keepdims=True)], 1)
    q_b = np.concatenate([np.take_along_axis(q, idx, 1), 1 - np.take_along_axis(q, idx, 1).sum(1, keepdims=True)], 1)
    np.testing.assert_allclose(got, (p_b * np.log(p_b / q_b)).sum(1), rtol=1e-5)


def test_topk_uniform_term_spreads_the_tail_evenly():
    v, z = logits(), torch.from_numpy(logits(seed=5)).double()
    layout = make_layout("topk:3", num_classes=12, temperature=T)
    got = soft_term("topk", "uniform")(z, tensors(layout.target(layout.encode(v))), T).numpy()
    p, q = softmax(v, T), softmax(z.numpy(), T)
    idx = np.argsort(-v, 1)[:, :3]
    head = np.take_along_axis(p, idx, 1)
    spread = np.repeat(((1 - head.sum(1)) / 9)[:, None], 12, 1)
    np.put_along_axis(spread, idx, head, 1)
    np.testing.assert_allclose(got, (spread * np.log(spread / q)).sum(1), rtol=1e-5)


def test_topk_with_every_class_but_one_is_full_kd():
    v, z = logits(), torch.from_numpy(logits(seed=5)).double()
    layout = make_layout("topk:11", num_classes=12, temperature=T)
    fields = tensors(layout.target(layout.encode(v)))
    full = soft_term("full")(z, torch.from_numpy(v).double(), T)
    for tail in ("bucket", "uniform"):
        torch.testing.assert_close(soft_term("topk", tail)(z, fields, T), full)


def test_sampled_term_is_the_cross_entropy_against_the_frequencies_and_the_loss_keeps_t_squared_and_labels():
    v, z = logits(), torch.from_numpy(logits(seed=5)).double()
    layout = make_layout("sampled:9", num_classes=12, temperature=T, seed=3)
    fields = layout.encode(v, np.arange(6))
    frequencies = np.zeros((6, 12))
    np.add.at(frequencies, (np.arange(6)[:, None].repeat(9, 1), fields["sample_indices"].astype(int)), fields["sample_counts"] / 9)
    expected = -(frequencies * np.log(softmax(z.numpy(), T))).sum(1)
    got = soft_term("sampled")(z, tensors(fields), T)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    labels = torch.tensor([0, 1, -1, 3, 4, 5])
    loss = distillation_loss(z, tensors(fields), labels, T, 0.7, targets="sampled")
    hard = torch.nn.functional.cross_entropy(z, labels.clamp(min=0), reduction="none") * (labels >= 0)
    torch.testing.assert_close(loss, (0.7 * T**2 * got + 0.3 * hard).mean())
    with pytest.raises(ValueError, match="full logits"):
        distillation_loss(z, tensors(fields), labels, T, 0.7, kind="mse", targets="sampled")


def _biased_ce(z: torch.Tensor, target: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """A plausible but biased use of the same draws: each distinct class drawn weighs the same."""
    log_q = torch.log_softmax(z / temperature, dim=-1)
    present = (target["sample_counts"] > 0).to(z.dtype)
    return -(present / present.sum(-1, keepdim=True) * log_q.gather(-1, target["sample_indices"].long())).sum(-1)


@pytest.mark.parametrize(("term", "unbiased"), [(soft_term("sampled"), True), (_biased_ce, False)])
def test_the_sampled_gradient_is_an_unbiased_estimate_of_the_full_gradient(term, unbiased):
    """Mean of the sampled term's gradient over R independent samplings, against the full KD
    gradient: within 5 standard errors (per coordinate, from the samplings' own spread) for the
    real term, and far outside for a biased variant."""
    v = logits(rows=4, classes=8, seed=11)
    z = torch.from_numpy(logits(rows=4, classes=8, seed=12)).double().requires_grad_()
    full = torch.autograd.grad(soft_term("full")(z, torch.from_numpy(v).double(), T).sum(), z)[0].numpy()
    layout = Sampled(4, temperature=T, classes=8)
    rounds = 4000
    seeds = draw_seeds(0, [str(i) for i in range(rounds * 4)], 1)[:, 0]
    fields = tensors(layout.encode(np.tile(v, (rounds, 1)), seeds))  # round r is rows 4r..4r+3
    z_rounds = z.detach().repeat(rounds, 1).requires_grad_()
    grads = torch.autograd.grad(term(z_rounds, fields, T).sum(), z_rounds)[0].numpy().reshape(rounds, 4, 8)
    error = np.abs(grads.mean(0) - full)
    standard_error = grads.std(0, ddof=1) / np.sqrt(rounds) + 1e-12
    if unbiased:
        assert (error / standard_error).max() < 5.0, (error / standard_error).max()
    else:
        assert (error / standard_error).max() > 10.0, (error / standard_error).max()


# ---- the trainer ----


def write_cache(directory, spec: str = "full", temperature: float = T, rows: int = 64, classes: int = 6, **extra) -> CacheMeta:
    rng = np.random.default_rng(0)
    meta = CacheMeta("f" * 64, "t", classes, (4,), "float32", serving_temperature=temperature, logits_layout=spec, **extra)
    with CacheWriter(directory, meta) as writer:
        writer.append([f"s{i}" for i in range(rows)], rng.random((rows, 4), dtype=np.float32), rng.normal(size=(rows, classes)).astype(np.float32),
                      rng.integers(0, classes, rows))  # fmt: skip
    return meta


def quick(caches, out, **options) -> TrainConfig:
    return TrainConfig(
        caches=[str(c) for c in caches], epochs=1, batch_size=16, out=str(out), workers=0, progress=False, export=False, **options
    )


def test_a_sparse_cache_trains_at_its_serving_temperature_and_refuses_another(tmp_path, capsys):
    write_cache(tmp_path / "top", "topk:2")
    summary = train(quick([tmp_path / "top"], tmp_path / "run"))
    assert summary["temperature"] == T
    assert "T=2.0" in capsys.readouterr().out
    with pytest.raises(TrainError, match=r"cannot be re-tempered: --temperature must be 2 \(or omitted\), got 4"):
        train(quick([tmp_path / "top"], tmp_path / "run2", temperature=4.0))
    with pytest.raises(TrainError, match="--loss mse needs full logits"):
        train(quick([tmp_path / "top"], tmp_path / "run3", loss="mse"))
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run3").exists()
    # full logits: any temperature, default 4
    write_cache(tmp_path / "full")
    assert train(quick([tmp_path / "full"], tmp_path / "run4"))["temperature"] == 4.0


def test_caches_of_different_layouts_or_serving_temperatures_are_not_mixed(tmp_path):
    write_cache(tmp_path / "full")
    write_cache(tmp_path / "top2", "topk:2")
    write_cache(tmp_path / "top3", "topk:3")
    write_cache(tmp_path / "top2-t3", "topk:2", temperature=3.0)
    for pair, message in [
        (("full", "top2"), "logits_layout is 'topk:2', expected 'full'"),
        (("top2", "top3"), "logits_layout is 'topk:3', expected 'topk:2'"),
        (("top2", "top2-t3"), "different serving temperatures"),
    ]:
        with pytest.raises((TrainError, Exception), match=message):
            train(quick([tmp_path / name for name in pair], tmp_path / f"run-{'-'.join(pair)}", allow_mixed_teachers=True))
        assert not (tmp_path / f"run-{'-'.join(pair)}").exists()


def test_a_cache_refuses_appends_in_another_layout(tmp_path):
    meta = write_cache(tmp_path / "c", "sampled:4", target_seed=5)
    for other in (dataclasses.replace(meta, logits_layout="topk:2"), dataclasses.replace(meta, target_seed=6)):
        with pytest.raises(Exception, match="logits_layout|layout"):
            CacheWriter(tmp_path / "c", other)


def test_journal_replay_and_any_batching_give_the_same_sampled_targets(tmp_path):
    """The journal holds the encoded targets and replay appends them as they are; the draws depend
    on the ids, not on how the samples were batched."""
    from kdcache.offline.cache import CacheReader
    from kdcache.offline.journal import Journal, encode_record
    from kdcache.service.store import CacheStore

    meta = CacheMeta("f" * 64, "t", 9, (3,), "float32", serving_temperature=T, logits_layout="sampled:8", target_seed=21)
    rng = np.random.default_rng(4)
    ids = [f"s{i}" for i in range(30)]
    x, v, y = rng.random((30, 3), dtype=np.float32), rng.normal(size=(30, 9)).astype(np.float32) * 2, rng.integers(0, 9, 30)
    (tmp_path / "replayed").mkdir()
    journal = Journal(tmp_path / "replayed")
    for part in (slice(0, 7), slice(7, 30)):
        journal.append(encode_record(meta, ids[part], x[part], meta.layout.encode(v[part], meta.draw_seeds(ids[part])), y[part]), len(ids[part]))
    journal.sync()
    journal.close()
    store = CacheStore(tmp_path / "replayed", meta)
    assert store.recovery.restored_samples == 30
    store.close()
    with CacheWriter(tmp_path / "direct", meta) as writer:
        for part in (slice(0, 19), slice(19, 30)):
            writer.append(ids[part], x[part], v[part], y[part])
    fields = ("ids", "sample_indices", "sample_counts")
    replayed, direct = CacheReader(tmp_path / "replayed").read(fields), CacheReader(tmp_path / "direct").read(fields)
    for name in fields:
        np.testing.assert_array_equal(replayed[name], direct[name])


def test_numpys_philox_gives_the_bits_of_the_split_products_that_torch_uses():
    from kdcache.offline.cache.rng import philox, philox4x32

    seeds = np.random.default_rng(0).integers(0, 1 << 63, size=(64, 1), dtype=np.int64)
    counters = np.arange(9, dtype=np.int64)[None, :]
    zero = seeds & 0
    split = philox4x32((counters + zero, zero, zero, zero), (seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF))
    for fast, reference, on_torch in zip(philox(seeds, counters), split, philox(torch.from_numpy(seeds), torch.from_numpy(counters)), strict=True):
        np.testing.assert_array_equal(fast, reference)
        np.testing.assert_array_equal(on_torch.numpy(), reference)
