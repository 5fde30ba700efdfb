"""Encoding on the teacher's device (offline/cache/device.py) gives what the numpy encoding gives:
the fields the service journals and stores are the ones a cache-convert or a replay would write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.offline.cache import CacheMeta, make_layout
from kdcache.offline.cache.tokens import FULL_VOCAB_LIMIT, PerToken, token_seeds


def fields_match(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(a[name].astype(np.float64), b[name].astype(np.float64), atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("classes", [10, 1000, 70_000])
@pytest.mark.parametrize("spec", ["full", "topk:5", "sampled:32"])
def test_device_encoding_matches_the_numpy_encoding(spec, classes):
    rng = np.random.default_rng(classes)
    logits = (rng.normal(size=(48, classes)) * 3).astype(np.float32)
    layout = make_layout(spec, num_classes=classes, temperature=2.0, seed=1, dtype="float16")
    seeds = rng.integers(0, 2**62, size=48)
    fields_match(layout.encode(logits, seeds), layout.encode_tensor(torch.from_numpy(logits), seeds))


def test_per_view_encoding_on_the_device():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3, 20)).astype(np.float32)
    layout = make_layout("sampled:8", views=3, num_classes=20, seed=4)
    seeds = rng.integers(0, 2**62, size=(6, 3))
    fields_match(layout.encode(logits, seeds), layout.encode_tensor(torch.from_numpy(logits), seeds))


@pytest.mark.parametrize("spec", ["topk:4", "sampled:16", "full"])
def test_per_token_encoding_keeps_valid_tokens_and_zeros_the_padding(spec):
    rng = np.random.default_rng(1)
    meta = CacheMeta("a" * 64, "lm", 50, (12,), "int64", logits_layout=spec, task="lm", target_seed=3)
    layout = meta.layout
    assert isinstance(layout, PerToken) and layout.fields(50)["lengths"] == ((), np.dtype(np.uint32))
    logits = rng.normal(size=(5, 12, 50)).astype(np.float32)
    lengths = np.array([1, 12, 7, 3, 12])
    seeds = meta.draw_seeds([f"s{i}" for i in range(5)])
    host = layout.encode(logits, seeds, lengths)
    # On the device the batch runs at its longest sequence; the fields come back at the cache's L.
    fields_match(host, layout.encode_tensor(torch.from_numpy(logits), seeds, lengths))
    for name, values in host.items():
        if name != "lengths":
            assert not values[0, 1:].any() and not values[3, 3:].any(), name  # padding holds zeros
    assert layout.problem(host) is None
    decoded = layout.decode(host)
    assert decoded.shape == (5, 12, 50) and not decoded[2, 7:].any()
    inner = make_layout(spec, num_classes=50, seed=3)
    token = None if seeds is None else token_seeds(np.asarray(seeds), 12)[2, :7]
    first = next(iter(inner.fields(50)))
    np.testing.assert_array_equal(host[first][2, :7], inner.encode(logits[2, :7], token)[first])


def test_token_seeds_are_the_same_in_numpy_and_torch_and_differ_by_position():
    seeds = np.array([0, 1, 2**61 + 12345], dtype=np.int64)
    host = token_seeds(seeds, 6)
    np.testing.assert_array_equal(host, token_seeds(torch.from_numpy(seeds), 6).numpy())
    assert host.shape == (3, 6) and len(np.unique(host)) == 18 and (host >= 0).all()


def test_full_per_token_logits_are_refused_for_a_large_vocabulary():
    with pytest.raises(ValueError, match="full is for vocabularies up to 4,096"):
        CacheMeta("a" * 64, "lm", FULL_VOCAB_LIMIT + 1, (8,), "int64", logits_layout="full", task="lm")
    CacheMeta("a" * 64, "lm", FULL_VOCAB_LIMIT, (8,), "int64", logits_layout="full", task="lm")
