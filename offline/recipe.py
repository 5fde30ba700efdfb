"""The training recipe ``offline-distill`` uses for what the user leaves out: learning rate,
epochs, batch size, learning-rate schedule and alpha.

A fixed number of epochs is the wrong default for a tool whose caches range from a thousand to
millions of samples: ten epochs of 4,000 samples are 320 steps, too few for any student (issue
19's trial lost to labels only that way). The rule instead aims at a number of optimiser steps,
``STEPS``, and turns it into whole epochs for the cache at hand, within ``[MIN_EPOCHS,
MAX_EPOCHS]``. Everything else is one value for every cache.

Every constant of ``DEFAULT_RULE`` was chosen on validation splits only, over three problems
(the digits, digit pairs with C = 100, and 28×28 placed digits) and two students (``mlp`` and
``cnn-small``), by ``python -m kdcache.demo.sweep``; docs/benchmarks.md § Defaults has the
table and the test-split figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SCHEDULES = ("warmup-cosine", "cosine", "constant")
WARMUP_SHARE = 0.05  # of all steps, for warmup-cosine: a linear ramp from 0


@dataclass(frozen=True)
class RecipeRule:
    """How a recipe is made from a cache's sample count."""

    lr: float = 1e-2
    steps: int = 6000
    min_epochs: int = 10
    max_epochs: int = 200
    batch_size: int = 64
    schedule: str = "warmup-cosine"
    alpha: float = 0.9

    def epochs_for(self, samples: int, batch_size: int) -> int:
        steps_per_epoch = max(1, math.ceil(samples / batch_size))
        return min(self.max_epochs, max(self.min_epochs, math.ceil(self.steps / steps_per_epoch)))

    def recipe(self, samples: int, **given: Any) -> Recipe:
        """The recipe for a cache of ``samples`` samples, with the values in ``given`` (those not
        None) taken as they are."""
        given = {key: value for key, value in given.items() if value is not None}
        unknown = set(given) - set(Recipe.KNOBS)
        if unknown:
            raise TypeError(f"not a recipe setting: {', '.join(sorted(unknown))}")
        batch_size = int(given.get("batch_size", self.batch_size))
        values = {
            "lr": float(given.get("lr", self.lr)),
            "epochs": int(given.get("epochs", self.epochs_for(samples, batch_size))),
            "batch_size": batch_size,
            "schedule": str(given.get("schedule", self.schedule)),
            "alpha": float(given.get("alpha", self.alpha)),
        }
        return Recipe(**values, samples=samples, given=tuple(k for k in Recipe.KNOBS if k in given), rule=self)


DEFAULT_RULE = RecipeRule()


@dataclass(frozen=True)
class Recipe:
    lr: float
    epochs: int
    batch_size: int
    schedule: str
    alpha: float
    samples: int
    given: tuple[str, ...]  # the settings the user gave; the others come from the rule
    rule: RecipeRule = DEFAULT_RULE

    KNOBS = ("lr", "epochs", "batch_size", "schedule", "alpha")

    @property
    def steps(self) -> int:
        return self.epochs * max(1, math.ceil(self.samples / self.batch_size))

    def describe(self) -> str:
        """One line, e.g. ``recipe: lr 0.003, 47 epochs (2,961 steps), batch 64, warmup-cosine,
        alpha 0.9; chosen for 4,000 samples (--epochs given)``."""
        given = ", ".join("--" + knob.replace("_", "-") for knob in self.given)
        chosen = [knob for knob in self.KNOBS if knob not in self.given]
        why = (
            f"epochs for about {self.rule.steps:,} steps on {self.samples:,} samples" if "epochs" in chosen else f"{self.samples:,} samples"
        )
        return (
            f"recipe: lr {self.lr:g}, {self.epochs} epochs ({self.steps:,} steps), batch {self.batch_size}, "
            f"{self.schedule} schedule, alpha {self.alpha:g}"
            + (f"; default {why}" if chosen else "")
            + (f"; given {given}" if given else "")
        )

    def to_dict(self) -> dict[str, Any]:
        """What metrics.json records under ``recipe``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}
        out["given"] = list(self.given)
        out["steps"] = self.steps
        out["rule"] = asdict(self.rule)
        return out


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning rate's multiplier at ``step`` (0-based) of ``total_steps``."""
    if schedule == "constant":
        return 1.0
    total_steps = max(1, total_steps)
    warmup = max(1, round(WARMUP_SHARE * total_steps)) if schedule == "warmup-cosine" else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
