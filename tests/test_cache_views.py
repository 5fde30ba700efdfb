"""A cache with augmented views (issue 13, the cache and trainer side): rows hold the raw sample
once, the seeds of its V views and V rows of teacher logits; the trainer replays each view from
its seed and trains against that view's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdcache.offline.cache import CacheError, CacheMeta, CacheReader, CacheWriter, Preprocessing
from kdcache.offline.cache.views import parse_policy, view_seeds
from kdcache.offline.dataset import ShardStream, open_caches
from kdcache.offline.losses import Objective
from kdcache.offline.step import step_on_inputs, train_step

PREPROCESSING = Preprocessing(scale=1 / 16)
CLASSES, VIEWS, SALT = 5, 4, 1234


def teacher(inputs: torch.Tensor) -> torch.Tensor:
    """A fixed teacher, in float64 so that its float32 logits do not depend on the batch around a sample."""
    weight = torch.linspace(-1, 1, 64 * CLASSES, dtype=torch.float64).reshape(64, CLASSES)
    return (PREPROCESSING.apply(inputs).double().reshape(len(inputs), -1) @ weight).float()


def meta_for(policy: str = "random-crop:1", views: int = VIEWS, salt: int = SALT) -> CacheMeta:
    return CacheMeta(
        "ab" * 32, "views-test", CLASSES, (8, 8), "uint8", PREPROCESSING,
        views_per_id=views, augment=parse_policy(policy).describe(), view_salt=salt,
    )  # fmt: skip


def write_views_cache(directory, n: int = 96, policy: str = "random-crop:1", views: int = VIEWS, max_samples: int = 40):
    """What teacher-serve --views V --augment POLICY stores: each id's V views made from its seeds."""
    meta = meta_for(policy, views)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(n, 8, 8)).astype(np.uint8)
    labels = rng.integers(0, CLASSES, size=n)
    ids = np.array([f"s{i}" for i in range(n)], dtype=object)
    seeds = view_seeds(SALT, ids, views)
    augment = parse_policy(policy)
    logits = np.stack([teacher(augment(torch.from_numpy(x), torch.from_numpy(seeds[:, v]))).numpy() for v in range(views)], axis=1)
    with CacheWriter(directory, meta, max_samples=max_samples) as writer:
        writer.append(ids, x, logits if views > 1 else logits[:, 0], labels)
    return {"x": x, "labels": labels, "ids": ids, "seeds": seeds, "logits": logits, "meta": meta}


def test_a_views_cache_stores_the_sample_once_with_its_view_seeds_and_logits(tmp_path):
    written = write_views_cache(tmp_path)
    reader = CacheReader(tmp_path)
    assert reader.meta == written["meta"] and reader.meta.views_per_id == VIEWS
    stored = reader.read(("ids", "inputs", "view_seeds", "logits"))
    order = np.argsort([int(i[1:]) for i in stored["ids"]])
    np.testing.assert_array_equal(stored["inputs"][order], written["x"])
    np.testing.assert_array_equal(stored["view_seeds"][order], written["seeds"])
    np.testing.assert_array_equal(stored["logits"][order], written["logits"])
    assert stored["logits"].shape == (96, VIEWS, CLASSES)
    assert reader.verify() == []


def test_the_trainer_replays_exactly_the_view_the_teacher_saw(tmp_path):
    written = write_views_cache(tmp_path)
    reader = CacheReader(tmp_path)
    index = {sample_id: i for i, sample_id in enumerate(written["ids"])}
    stream = ShardStream.from_readers([reader], reader.meta, batch_size=16, seed=7, with_ids=True)
    seen: dict[str, list[int]] = {}
    for epoch in range(VIEWS):
        stream.set_epoch(epoch)
        for batch in stream:
            rows = np.array([index[i] for i in batch["ids"]])
            views = batch["view"].numpy()
            np.testing.assert_array_equal(batch["view_seed"].numpy(), written["seeds"][rows, views])
            np.testing.assert_array_equal(batch["logits"].numpy(), written["logits"][rows, views])
            # The replayed input, bit for bit: the teacher's logits on it are the stored ones.
            assert batch["inputs"].dtype == torch.uint8
            torch.testing.assert_close(teacher(batch["inputs"]), batch["logits"], rtol=0, atol=0)
            for sample_id, view in zip(batch["ids"], views.tolist(), strict=True):
                seen.setdefault(sample_id, []).append(view)
    # V epochs: every sample took every one of its views once, in the order (e + o_i) mod V.
    assert all(sorted(views) == list(range(VIEWS)) for views in seen.values())
    assert all(views == [(views[0] + e) % VIEWS for e in range(VIEWS)] for views in seen.values())
    assert len({views[0] for views in seen.values()}) > 1  # the offsets differ between samples


def test_offline_from_e_views_reproduces_online_kd_with_the_same_views(tmp_path):
    """E epochs from a cache with V = E views against a teacher in the loop on the same views
    in the same order: the same student weights."""
    epochs = VIEWS
    write_views_cache(tmp_path)
    reader = CacheReader(tmp_path)
    stream = ShardStream.from_readers([reader], reader.meta, batch_size=16, seed=3)
    objective = Objective(temperature=4.0, alpha=0.9)

    def student() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    offline, offline_opt = student()
    online, online_opt = student()
    cpu = torch.device("cpu")
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for batch in stream:
            train_step(offline, offline_opt, batch, meta=reader.meta, objective=objective, device=cpu)
            # Online: the teacher runs on the view in the loop; nothing is read from the cache but the input.
            inputs = PREPROCESSING.apply(batch["inputs"])
            step_on_inputs(online, online_opt, inputs, teacher(batch["inputs"]), batch["labels"], objective=objective)
    for a, b in zip(offline.state_dict().values(), online.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # And the views mattered: a run without augmentation ends elsewhere.
    assert any(not torch.equal(p, q) for p, q in zip(offline.state_dict().values(), student()[0].state_dict().values(), strict=True))


def test_a_single_view_cache_with_a_policy_replays_it(tmp_path):
    write_views_cache(tmp_path, policy="random-crop-flip:2", views=1)
    reader = CacheReader(tmp_path)
    assert reader.meta.views_per_id == 1 and reader.meta.has_views
    stream = ShardStream.from_readers([reader], reader.meta, batch_size=32, seed=0)
    for batch in stream:
        assert batch["logits"].shape[1:] == (CLASSES,) and (batch["view"] == 0).all()
        torch.testing.assert_close(teacher(batch["inputs"]), batch["logits"], rtol=0, atol=0)


def test_writers_and_trainers_refuse_another_policy_or_view_count(tmp_path):
    write_views_cache(tmp_path / "a")
    for other in (meta_for(views=2), meta_for(policy="random-crop:2"), meta_for(salt=1)):
        with pytest.raises(CacheError, match="another teacher or input contract"):
            CacheWriter(tmp_path / "a", other)
    with CacheWriter(tmp_path / "a", meta_for()) as writer, pytest.raises(ValueError, match=r"expected \[2, 4, 5\]"):
        writer.append(["new1", "new2"], np.zeros((2, 8, 8), np.uint8), np.zeros((2, CLASSES), np.float32))
    write_views_cache(tmp_path / "b", views=2)
    with pytest.raises(CacheError, match="views_per_id is 2, expected 4"):
        open_caches([str(tmp_path / "a"), str(tmp_path / "b")])
    write_views_cache(tmp_path / "c", policy="random-crop:2")
    with pytest.raises(CacheError, match="augment"):
        open_caches([str(tmp_path / "a"), str(tmp_path / "c")])


def test_offline_distill_trains_on_views_and_cache_inspect_shows_them(tmp_path):
    write_views_cache(tmp_path / "cache")
    bin_dir = f"{sys.executable.rsplit('/', 1)[0]}"
    inspect = subprocess.run([f"{bin_dir}/cache-inspect", str(tmp_path / "cache"), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(inspect.stdout)
    assert summary["views_per_id"] == VIEWS and summary["augment"]["name"] == "random-crop"
    text = subprocess.run([f"{bin_dir}/cache-inspect", str(tmp_path / "cache")], capture_output=True, text=True, check=True).stdout
    assert "4 per sample" in text and "random-crop (padding=1)" in text
    run = subprocess.run(
        [f"{bin_dir}/offline-distill", "--cache", str(tmp_path / "cache"), "--epochs", "2", "--out", str(tmp_path / "run"),
         "--no-progress", "--no-export", "--student", "mlp-small"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_samples"] == 2 * 96
    # It says what it trains on: the views and the policy, in its output and in metrics.json.
    assert "views: 4 per sample, policy random-crop (padding=1)" in run.stdout
    assert metrics["views"] == {"per_sample": VIEWS, "policy": summary["augment"]}
