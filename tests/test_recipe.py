"""offline-distill's default recipe (offline/recipe.py): epochs from the cache's sample count,
the per-step schedule, what the user gives taken as given, and the recipe printed and recorded;
``--label-fraction``: a seeded fraction of the samples keeps its labels, the same in every epoch
and batch order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from digits import write_cache

from kdcache.offline.cache.ids import normalize_ids
from kdcache.offline.dataset import ShardStream, keeps_label, open_caches
from kdcache.offline.recipe import DEFAULT_RULE, Recipe, RecipeRule, lr_factor
from kdcache.offline.train import TrainConfig, TrainError, train


def test_epochs_aim_at_a_step_budget_within_bounds():
    rule = RecipeRule(steps=3000, min_epochs=10, max_epochs=200, batch_size=64)
    assert rule.epochs_for(4000, 64) == math.ceil(3000 / 63)  # 63 steps an epoch
    assert rule.epochs_for(1_000_000, 64) == 10  # a big cache: at least min_epochs
    assert rule.epochs_for(100, 64) == 200  # a tiny one: at most max_epochs
    recipe = rule.recipe(4000)
    assert recipe.epochs * math.ceil(4000 / 64) >= 3000 > (recipe.epochs - 1) * math.ceil(4000 / 64)


def test_given_settings_are_kept_and_named():
    recipe = DEFAULT_RULE.recipe(4000, lr=0.05, epochs=3, batch_size=None, alpha=0.0)
    assert (recipe.lr, recipe.epochs, recipe.alpha) == (0.05, 3, 0.0)
    assert recipe.batch_size == DEFAULT_RULE.batch_size and recipe.schedule == DEFAULT_RULE.schedule
    assert recipe.given == ("lr", "epochs", "alpha")
    line = recipe.describe()
    assert line.startswith("recipe: lr 0.05, 3 epochs") and "given --lr, --epochs, --alpha" in line
    record = recipe.to_dict()
    assert record["given"] == ["lr", "epochs", "alpha"] and record["rule"]["steps"] == DEFAULT_RULE.steps
    with pytest.raises(TypeError, match="not a recipe setting"):
        DEFAULT_RULE.recipe(10, momentum=0.9)


def test_schedules():
    total = 1000
    warm = [lr_factor("warmup-cosine", step, total) for step in range(total)]
    assert warm[0] == pytest.approx(1 / 50) and max(warm) == pytest.approx(1.0) and warm[-1] < 1e-4
    assert warm.index(max(warm)) == 49  # 5% of the steps ramp up
    cosine = [lr_factor("cosine", step, total) for step in range(total)]
    assert cosine[0] == 1.0 and cosine[-1] < 1e-4 and all(a >= b for a, b in zip(cosine, cosine[1:], strict=False))
    assert {lr_factor("constant", step, total) for step in range(0, total, 97)} == {1.0}


def test_keeps_label_is_a_seeded_fraction_by_id():
    ids = normalize_ids(np.arange(20000))
    kept = keeps_label(ids, 0.1, 0)
    assert abs(kept.mean() - 0.1) < 0.01
    assert np.array_equal(kept, keeps_label(ids, 0.1, 0))  # deterministic
    assert not np.array_equal(kept, keeps_label(ids, 0.1, 1))  # the seed picks others
    assert np.array_equal(keeps_label(ids[::-1], 0.1, 0), kept[::-1])  # a function of the id, not the position
    assert (keeps_label(ids, 0.2, 0) >= kept).all()  # nested: a larger fraction keeps a superset
    assert keeps_label(ids, 1.0, 0).all()


def _labelled_ids(stream: ShardStream, epoch: int) -> set[str]:
    stream.set_epoch(epoch)
    return {str(i) for batch in stream for i, label in zip(batch["ids"], batch["labels"].tolist(), strict=True) if label >= 0}


def test_label_fraction_keeps_the_same_samples_in_every_epoch_and_batch(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (600, 8, 8)).astype(np.uint8)
    write_cache(tmp_path / "c", x, rng.normal(size=(600, 10)).astype(np.float32), rng.integers(0, 10, 600))
    readers, meta = open_caches([str(tmp_path / "c")])
    small = ShardStream.from_readers(readers, meta, batch_size=16, with_ids=True, label_fraction=0.25, label_seed=3)
    large = ShardStream.from_readers(readers, meta, batch_size=128, seed=9, with_ids=True, label_fraction=0.25, label_seed=3)
    kept = _labelled_ids(small, 0)
    assert kept == _labelled_ids(small, 1) == _labelled_ids(large, 0)
    assert 0.15 < len(kept) / 600 < 0.35
    # Without ids asked for, batches have none, and the labels are masked all the same.
    plain = ShardStream.from_readers(readers, meta, batch_size=600, label_fraction=0.25, label_seed=3)
    plain.set_epoch(0)
    batch = next(iter(plain))
    assert "ids" not in batch and int((batch["labels"] >= 0).sum()) == len(kept)


def test_offline_distill_prints_and_records_its_recipe(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, (300, 8, 8)).astype(np.uint8)
    write_cache(tmp_path / "c", x, rng.normal(size=(300, 10)).astype(np.float32), rng.integers(0, 10, 300))
    config = TrainConfig(caches=[str(tmp_path / "c")], student="mlp-small", epochs=2, out=str(tmp_path / "run"), device="cpu",
                         progress=False, export=False, label_fraction=0.5)  # fmt: skip
    summary = train(config)
    out = capsys.readouterr().out
    assert f"recipe: lr {DEFAULT_RULE.lr:g}, 2 epochs" in out and "given --epochs" in out
    assert "keeping those of a seeded 50% of the samples" in out
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert recorded["recipe"] == summary["recipe"]
    assert recorded["recipe"]["given"] == ["epochs"] and recorded["recipe"]["batch_size"] == DEFAULT_RULE.batch_size
    assert recorded["epochs"] == 2 and recorded["lr"] == DEFAULT_RULE.lr and recorded["label_fraction"] == 0.5
    assert isinstance(Recipe.KNOBS, tuple)
    with pytest.raises(TrainError, match="--label-fraction must lie in"):
        train(TrainConfig(caches=[str(tmp_path / "c")], label_fraction=0.0))
