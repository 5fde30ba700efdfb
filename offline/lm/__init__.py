"""Language-model students trained on token caches: ``offline-distill --task lm``.

defaults   the recipe rule and the default student (no torch: the help text shows them)
student    gpt:layers=L,dim=D,heads=H (a small built-in GPT) and hf:CONFIG_DIR students
loss       the per-token soft term of the cache's layout plus the next-token cross-entropy
vocab      the student's vocabulary against the cache's (--allow-vocab-padding scans the cache)
evaluate   held-out perplexity, and top-1 agreement with the teacher on a cache
train      the loop, its outputs (student.pt or student/, metrics.json)
"""
