"""Views: seeds, the counter-based generator and the augmentation policies, each checked against
an independent per-sample reference (pure Python integers, np.pad, F.interpolate)."""

from __future__ import annotations

import hashlib
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.offline.cache.views import (
    AugmentPolicy,
    PolicyError,
    RandomResizedCrop,
    below,
    check_policy,
    parse_policy,
    philox,
    philox4x32,
    uniform24,
    uniform53,
    view_seeds,
)

M32 = 0xFFFFFFFF


def reference_philox(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 in Python integers, written from the paper's round function."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def reference_words(seed: int, counter: int) -> tuple[int, ...]:
    seed &= (1 << 64) - 1
    return reference_philox((counter, 0, 0, 0), (seed & M32, seed >> 32))


def reference_seed(salt: int, sample_id: str, view: int) -> int:
    message = salt.to_bytes(8, "little") + sample_id.encode() + view.to_bytes(4, "little")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, person=b"kdcache-views").digest(), "little") & ((1 << 63) - 1)


# ---- seeds ----


def test_view_seeds_follow_the_documented_derivation_and_pinned_values():
    seeds = view_seeds(7, ["a", "b", 3], 4)
    assert seeds.dtype == np.int64 and seeds.shape == (3, 4)
    for row, sample_id in enumerate(["a", "b", "3"]):
        for view in range(4):
            assert seeds[row, view] == reference_seed(7, sample_id, view)
    # Pinned: these are in caches on disk. If this fails, the derivation changed; it must not.
    assert view_seeds(0, ["a", "b", 3], 3).tolist() == [
        [2973451689805953507, 5393305160186463198, 4300530660770806755],
        [3016775244158760389, 6560244842414991438, 3302819913681297368],
        [7482110800552563910, 2273515734240931522, 699190981350068052],
    ]


def test_view_seeds_are_deterministic_and_distinct_across_ids_views_and_salts():
    ids = [f"sample-{i}" for i in range(64)]
    seeds = view_seeds(1, ids, 8)
    assert np.array_equal(seeds, view_seeds(1, ids, 8))
    assert np.array_equal(seeds[:, :3], view_seeds(1, ids, 3)), "the first views do not depend on V"
    assert np.array_equal(seeds[10:11], view_seeds(1, ids[10:11], 8)), "a row does not depend on the other ids"
    other_salt = view_seeds(2, ids, 8)
    assert len(np.unique(np.concatenate([seeds.ravel(), other_salt.ravel()]))) == 2 * seeds.size
    assert (seeds >= 0).all()
    assert np.array_equal(view_seeds(0, [5, 6], 2), view_seeds(0, ["5", "6"], 2)), "integer ids are their decimal string"


@pytest.mark.parametrize("salt, views", [(-1, 2), (1 << 64, 2), (0, 0)])
def test_view_seeds_refuse_a_bad_salt_or_view_count(salt, views):
    with pytest.raises(ValueError, match="salt|views"):
        view_seeds(salt, ["a"], views)


# ---- the generator ----

# Random123's kat_vectors for philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_gives_random123s_known_answers_in_numpy_torch_and_python(counter, key, expected):
    assert reference_philox(counter, key) == expected
    as_numpy = philox4x32([np.int64(c) for c in counter], [np.int64(k) for k in key])
    as_torch = philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in as_numpy) == expected
    assert tuple(int(w) for w in as_torch) == expected


def test_philox_agrees_across_numpy_torch_and_python_for_any_int64_seed():
    rng = np.random.default_rng(0)
    seeds = np.concatenate([rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 200, dtype=np.int64), [0, -1, 2**63 - 1]])
    for counter in (0, 1, 20, 2**31):
        from_numpy = np.stack(philox(seeds, counter))
        from_torch = torch.stack(philox(torch.from_numpy(seeds), counter)).numpy()
        assert np.array_equal(from_numpy, from_torch)
        assert from_numpy.min() >= 0 and from_numpy.max() <= M32
        for i in (0, 7, 200, 201, 202):
            assert tuple(from_numpy[:, i]) == reference_words(int(seeds[i]), counter)


def test_floats_from_words_are_exact_and_uniform():
    words = np.array([0, 0xFF, 0x100, M32], dtype=np.int64)
    assert uniform24(words).tolist() == [0.0, 0.0, 2.0**-24, 1 - 2.0**-24]
    assert uniform24(words).dtype == np.float32 and uniform24(torch.from_numpy(words)).dtype == torch.float32
    assert uniform53(np.int64(M32), np.int64(M32)) == 1 - 2.0**-53
    assert uniform53(np.int64(0), np.int64(1 << 6)) == 2.0**-53
    w0, w1, w2, _ = philox(np.arange(100_000, dtype=np.int64), 3)
    for draws in (uniform24(w0), uniform53(w1, w2)):
        assert draws.min() >= 0 and draws.max() < 1
        assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.var() - 1 / 12) < 0.002
    counts = np.bincount(below(w0, 7), minlength=7)
    assert counts.shape == (7,) and abs(counts / len(w0) - 1 / 7).max() < 0.01
    assert np.array_equal(uniform53(w1, w2), uniform53(torch.from_numpy(w1), torch.from_numpy(w2)).numpy())


# ---- random-crop ----


def reference_crop(sample: np.ndarray, seed: int, padding: int, flip: bool) -> np.ndarray:
    w0, w1, w2, _ = reference_words(seed, 0)
    dy, dx = (w0 * (2 * padding + 1)) >> 32, (w1 * (2 * padding + 1)) >> 32
    pad = [(0, 0)] * (sample.ndim - 2) + [(padding, padding)] * 2
    height, width = sample.shape[-2:]
    view = np.pad(sample, pad)[..., dy : dy + height, dx : dx + width]
    return view[..., ::-1] if flip and w2 >> 31 else view


def some_seeds(count: int, start: int = 0) -> torch.Tensor:
    return torch.from_numpy(view_seeds(start, [str(i) for i in range(count)], 1)[:, 0])


@pytest.mark.parametrize("spec", ["random-crop:3", "random-crop-flip:2", "random-crop:0"])
@pytest.mark.parametrize("shape, dtype", [((9, 11), torch.uint8), ((3, 8, 6), torch.float32)])
def test_random_crop_is_a_slice_of_the_padded_input_at_the_generators_offsets(spec, shape, dtype):
    policy = parse_policy(spec)
    inputs = (torch.rand(16, *shape) * 255).to(dtype)
    seeds = some_seeds(16)
    views = policy(inputs, seeds)
    assert views.dtype == dtype and views.shape == inputs.shape
    padding, flip = int(spec.rpartition(":")[2]), "flip" in spec
    for sample, seed, view in zip(inputs, seeds, views, strict=True):
        assert np.array_equal(view.numpy(), reference_crop(sample.numpy(), int(seed), padding, flip))


def test_random_crop_views_depend_on_the_seed_only_not_on_the_batch():
    policy = parse_policy("random-crop-flip:4")
    inputs = torch.randint(0, 256, (32, 1, 12, 12), dtype=torch.uint8)
    seeds = some_seeds(32)
    views = policy(inputs, seeds)
    order = torch.randperm(32)
    assert torch.equal(policy(inputs[order], seeds[order]), views[order])
    assert torch.equal(policy(inputs[5:6], seeds[5:6]), views[5:6])
    same_input = inputs[:1].expand(32, -1, -1, -1)
    distinct = {policy(same_input, seeds)[i].numpy().tobytes() for i in range(32)}
    assert len(distinct) >= 25, "different seeds give different views"


def test_random_crop_flip_flips_about_half_and_shares_the_crop_offsets():
    seeds = some_seeds(400)
    inputs = torch.arange(400 * 36, dtype=torch.float32).reshape(400, 6, 6)
    cropped = parse_policy("random-crop:2")(inputs, seeds)
    flipped = parse_policy("random-crop-flip:2")(inputs, seeds)
    mirrored = torch.tensor([torch.equal(f, c.flip(-1)) and not torch.equal(f, c) for f, c in zip(flipped, cropped, strict=True)])
    unchanged = torch.tensor([torch.equal(f, c) for f, c in zip(flipped, cropped, strict=True)])
    assert (mirrored | unchanged).all()
    assert 0.4 < mirrored.float().mean() < 0.6


# ---- random-resized-crop ----


def reference_box(seed: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, written per sample in Python floats."""
    area = height * width
    log_low, log_high = math.log(3 / 4), math.log(4 / 3)

    def u53(high: int, low: int) -> float:
        return ((high >> 5) * 2**26 + (low >> 6)) * 2.0**-53

    flip = reference_words(seed, 20)[0] >> 31
    for attempt in range(10):
        s0, s1, s2, s3 = reference_words(seed, attempt)
        target_area = area * (0.08 + 0.92 * u53(s0, s1))
        aspect = math.exp(log_low + (log_high - log_low) * u53(s2, s3))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            o0, o1, _, _ = reference_words(seed, 10 + attempt)
            return (o0 * (height - h + 1)) >> 32, (o1 * (width - w + 1)) >> 32, h, w, flip
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


@pytest.mark.parametrize("height, width", [(28, 28), (8, 8), (2, 50), (40, 3), (1, 1)])
def test_random_resized_crop_boxes_match_torchvisions_procedure(height, width):
    seeds = some_seeds(300)
    boxes = RandomResizedCrop().boxes(seeds, height, width)
    expected = torch.tensor([reference_box(int(s), height, width) for s in seeds])
    assert torch.equal(boxes, expected)
    if (height, width) == (28, 28):
        assert 0.35 < boxes[:, 4].float().mean() < 0.65
        assert len({tuple(b) for b in boxes.tolist()}) > 250


def reference_resized_crop(sample: torch.Tensor, seed: int) -> torch.Tensor:
    height, width = sample.shape[-2:]
    top, left, h, w, flip = reference_box(seed, height, width)
    crop = sample.reshape(1, -1, height, width)[..., top : top + h, left : left + w].float()
    view = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return (view.flip(-1) if flip else view).reshape(sample.shape)


def test_random_resized_crop_matches_crop_then_interpolate_per_sample():
    policy = parse_policy("random-resized-crop")
    seeds = some_seeds(40)
    inputs = torch.rand(40, 3, 16, 12)
    views = policy(inputs, seeds)
    assert views.shape == inputs.shape and views.dtype == torch.float32
    expected = torch.stack([reference_resized_crop(x, int(s)) for x, s in zip(inputs, seeds, strict=True)])
    torch.testing.assert_close(views, expected, rtol=1e-5, atol=1e-6)  # the stated tolerance for float32


def test_random_resized_crop_keeps_uint8_rounding_to_nearest():
    policy = parse_policy("random-resized-crop")
    seeds = some_seeds(40)
    inputs = torch.randint(0, 256, (40, 10, 10), dtype=torch.uint8)
    views = policy(inputs, seeds)
    assert views.dtype == torch.uint8 and views.shape == inputs.shape
    expected = torch.stack([reference_resized_crop(x, int(s)) for x, s in zip(inputs, seeds, strict=True)]).round().clamp(0, 255)
    difference = (views.float() - expected).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99  # off by one only at .5 ties


def test_random_resized_crop_depends_on_the_seed_only_not_on_the_batch():
    policy = parse_policy("random-resized-crop")
    seeds = some_seeds(24)
    inputs = torch.rand(24, 2, 9, 9, dtype=torch.float64)
    views = policy(inputs, seeds)
    assert views.dtype == torch.float64
    assert torch.equal(policy(inputs, seeds), views)
    order = torch.randperm(24)
    assert torch.equal(policy(inputs[order], seeds[order]), views[order])
    assert torch.equal(policy(inputs[3:4], seeds[3:4]), views[3:4])
    assert not torch.equal(policy(inputs, some_seeds(24, start=1)), views)


# ---- parsing, records and the contract check ----


def test_none_is_the_identity_and_every_policy_describes_itself():
    inputs = torch.rand(2, 4, 4)
    for spec in (None, "", "none"):
        policy = parse_policy(spec)
        assert policy(inputs, torch.tensor([1, 2])) is inputs
        assert policy.describe() == {"name": "none", "params": {}, "version": 1}
    assert parse_policy("random-crop-flip:3").describe() == {"name": "random-crop-flip", "params": {"padding": 3}, "version": 1}
    for spec in ("none", "random-crop:2", "random-crop-flip:0", "random-resized-crop"):
        record = parse_policy(spec).describe()
        assert parse_policy(record).describe() == record
    with pytest.raises(PolicyError, match="does not match"):
        parse_policy({"name": "random-crop", "params": {"padding": 2}, "version": 2})


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("rotate", "unknown augmentation policy 'rotate'"),
        ("random-rotate:3", "unknown augmentation policy"),
        ("random-crop:-1", "at least 0, got -1"),
        ("random-crop:x", "whole number of pixels, got 'x'"),
        ("random-crop", "needs a padding"),
        ("random-crop-flip:", "needs a padding"),
        ("random-resized-crop:0.5", "takes no parameters"),
        ("kd_no_such_module:make", "cannot import kd_no_such_module"),
    ],
)
def test_bad_specs_give_a_one_line_policy_error(spec, problem):
    with pytest.raises(PolicyError, match=problem) as caught:
        parse_policy(spec)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_a_padding_too_large_for_the_inputs_is_refused_by_the_check():
    check_policy(parse_policy("random-crop:27"), [28, 28], "float32")
    with pytest.raises(PolicyError, match="pads more than inputs of 28x28 allow"):
        check_policy(parse_policy("random-crop:28"), [28, 28], "float32")
    with pytest.raises(PolicyError, match=r"needs samples of shape \[H, W\] or \[C, H, W\], got \[10\]"):
        check_policy(parse_policy("random-resized-crop"), [10], "float32")


USER_POLICIES = """
import torch
from kdcache.offline.cache.views import RandomCrop, below, philox

def good():
    def shift(inputs, seeds):
        steps = below(philox(seeds, 0)[0], 3) - 1
        return torch.stack([x.roll(int(s), dims=-1) for x, s in zip(inputs, steps)])
    shift.version = 3
    return shift

def a_policy():
    return RandomCrop(1)

def grows():
    return lambda inputs, seeds: torch.cat([inputs, inputs], dim=-1)

def casts():
    return lambda inputs, seeds: inputs.float()

def random():
    return lambda inputs, seeds: inputs + torch.rand(inputs.shape).to(inputs.dtype)

def batch_mean():
    return lambda inputs, seeds: inputs - inputs.mean(dim=0, keepdim=True)

def fails():
    def broken(inputs, seeds):
        raise RuntimeError("no\\nsuch\\nthing")
    return broken

def not_callable():
    return 42

def raises():
    raise OSError("missing weights")

NOT_A_FACTORY = 1
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "kd_user_policies.py").write_text(textwrap.dedent(USER_POLICIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kd_user_policies"
    import sys

    sys.modules.pop("kd_user_policies", None)


def test_a_user_policy_that_keeps_the_contract_passes_and_is_recorded(user_module):
    policy = parse_policy(f"{user_module}:good")
    check_policy(policy, [3, 5, 5], "float32")
    assert policy.describe() == {"name": f"{user_module}:good", "params": {}, "version": 3}
    assert parse_policy(policy.describe()).describe() == policy.describe()
    wrapped = parse_policy(f"{user_module}:a_policy")
    assert isinstance(wrapped, AugmentPolicy) and wrapped.describe()["params"] == {"padding": 1}
    check_policy(wrapped, [6, 6], np.uint8)


@pytest.mark.parametrize(
    "factory, problem",
    [
        ("grows", r"into \[3, 4, 10\] torch.float32; a view must keep the input's shape and dtype"),
        ("casts", "a view must keep the input's shape and dtype"),
        ("random", "is not deterministic"),
        ("batch_mean", "depends on the other samples in its batch"),
        ("fails", r"failed on inputs .* \(RuntimeError: no such thing\)"),
    ],
)
def test_a_user_policy_that_breaks_the_contract_is_refused_by_the_check(user_module, factory, problem):
    dtype = "float32" if factory != "casts" else "uint8"
    with pytest.raises(PolicyError, match=problem) as caught:
        check_policy(parse_policy(f"{user_module}:{factory}"), [4, 5], dtype)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "factory, problem",
    [
        ("not_callable", r"not_callable\(\) returned int"),
        ("raises", "OSError: missing weights"),
        ("NOT_A_FACTORY", "no callable"),
        ("nope", "no callable"),
    ],
)
def test_a_user_factory_that_cannot_be_built_gives_a_policy_error(user_module, factory, problem):
    with pytest.raises(PolicyError, match=problem):
        parse_policy(f"{user_module}:{factory}")


def test_seeds_must_be_one_per_sample():
    with pytest.raises(PolicyError, match="one per sample"):
        parse_policy("random-crop:1")(torch.zeros(3, 4, 4), torch.tensor([1, 2]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_on_cuda_equal_the_cpus():
    seeds = some_seeds(64)
    for spec, dtype in (("random-crop:4", torch.uint8), ("random-crop-flip:4", torch.float32), ("random-resized-crop", torch.uint8)):
        inputs = (torch.rand(64, 3, 32, 32) * 255).to(dtype)
        policy = parse_policy(spec)
        on_cpu, on_cuda = policy(inputs, seeds), policy(inputs.cuda(), seeds.cuda())
        assert on_cuda.device.type == "cuda"
        if spec.startswith("random-crop"):
            assert torch.equal(on_cuda.cpu(), on_cpu)
        else:
            assert (on_cuda.cpu().float() - on_cpu.float()).abs().max() <= 1
    inputs = torch.rand(64, 3, 32, 32)
    policy = parse_policy("random-resized-crop")
    torch.testing.assert_close(policy(inputs.cuda(), seeds.cuda()).cpu(), policy(inputs, seeds), rtol=1e-5, atol=1e-6)
    check_policy(policy, [3, 32, 32], "float32", device="cuda")
