"""The recipe of ``offline-distill --task lm`` for what the user leaves out (no torch here: the
command's help text shows these values).

As for classification (``offline.recipe``), the rule aims at a number of optimiser steps and turns
it into whole epochs of the cache at hand, within [min_epochs, max_epochs]; lr, batch size
(sequences), schedule and alpha are one value for every cache. They were chosen on a validation
split of the transfer set only (never the eval set): ``python -m bench.lm_sweep``, whose
docstring has the command and the figures.
"""

from __future__ import annotations

from ..recipe import RecipeRule

LM_RULE = RecipeRule(lr=3e-3, steps=1000, min_epochs=1, max_epochs=50, batch_size=32, schedule="warmup-cosine", alpha=0.5)
DEFAULT_STUDENT = "gpt:layers=2,dim=128,heads=4"
