"""The recipe of ``offline-distill --task lm`` for what the user leaves out (no torch here: the
command's help text shows these values).

As for classification (``offline.recipe``), the rule aims at a number of optimiser steps and turns
it into whole epochs of the cache at hand, within [min_epochs, max_epochs]; lr, batch size
(sequences), schedule and alpha are one value for every cache. They were chosen on a validation
split of the transfer set only (never the eval set): ``python -m bench.lm_sweep`` (one seed;
python-stdlib, vocabulary 1,024, 64-token sequences, a GPT-2 4x256 teacher at validation
perplexity 37.0; the default student). Validation perplexity, 400 steps at batch 32 and lr 3e-3:
alpha 0 72.8, 0.25 65.4, 0.5 58.6, **0.75 55.3**, 1 62.4; at alpha 0.75, lr 1e-3 72.0 and 1e-2
92.0 against **3e-3**; at the same tokens, batch **16** (800 steps) 48.7 against 32 55.3 and 64
(200 steps) 69.5; more steps help (1,600 at batch 16: 40.1), the rule keeps 1,000 for time.
docs/benchmarks.md § Language models.
"""

from __future__ import annotations

from ..recipe import RecipeRule

LM_RULE = RecipeRule(lr=3e-3, steps=1000, min_epochs=1, max_epochs=50, batch_size=16, schedule="warmup-cosine", alpha=0.75)
DEFAULT_STUDENT = "gpt:layers=2,dim=128,heads=4"
