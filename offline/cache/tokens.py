"""Per-token targets: the target layout of a language model's cache.

A row of such a cache is one token sequence: ``inputs`` [L] (the token ids, padded with 0 after
the sequence), and, from ``PerToken``, ``lengths`` (its token count) and every field of the
inner layout with a token axis after the row axis (``topk_values`` [N, L, K], ``tail_logmass``
[N, L]). Position t holds the teacher's distribution of the token after token t. Rows are padded
to the cache's L rather than ragged: every reader, the shuffle buffer and the lookup keep their
row model, and a transfer set packed to L tokens (``teacher-push --seq-len``) pads nothing
(docs/benchmarks.md § Language models measures both). Padding positions hold zeros.

A sampled layout draws each token from its own seed, ``token_seeds(row seed, L)``, so that a
sequence's draws depend on its id and its tokens' logits alone, whatever the batch.

``full`` holds V logits per token: it is refused above ``FULL_VOCAB_LIMIT`` classes (README §
Language models says why).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .layout import FullLogits, TargetLayout
from .rng import philox

# Full logits per token: V float16 values, 2·V bytes. Above 4,096 classes that is more than 8 KiB
# per token, 80x the top-16 budget; a top-k or sampled layout keeps what distillation uses.
FULL_VOCAB_LIMIT = 4096
_TOKEN_COUNTER = 1 << 31  # the counters of the token seeds (a 32-bit word), far from any draw's (0..N-1 < 65536)


def token_seeds(seeds: Any, length: int) -> Any:
    """One draw seed per token, [B, L] int64, from one per row (numpy or torch, [B])."""
    row = seeds.reshape(-1, 1)
    counter = (np.arange(length, dtype=np.int64) + _TOKEN_COUNTER)[None, :]
    if not isinstance(row, np.ndarray):
        import torch

        counter = torch.as_tensor(counter, device=row.device)
    words = philox(row, counter)
    return ((words[0] << 31) | (words[1] >> 1)) & ((1 << 62) - 1)


def valid_mask(lengths: np.ndarray, length: int) -> np.ndarray:
    """[B, L] bool: the positions within each row's length."""
    return np.arange(length)[None, :] < np.asarray(lengths, dtype=np.int64)[:, None]


class PerToken(TargetLayout):
    """Sequences of up to ``length`` tokens, with the inner layout's targets per token."""

    def __init__(self, inner: TargetLayout, length: int) -> None:
        if length < 1:
            raise ValueError(f"a token cache needs a sequence length >= 1, got {length}")
        self.inner, self.length = inner, int(length)
        self.name = inner.name  # type: ignore[misc]
        self.fixed_temperature = inner.fixed_temperature  # type: ignore[misc]
        self.randomized = inner.randomized  # type: ignore[misc]

    @property
    def spec(self) -> str:
        return self.inner.spec

    def check(self, num_classes: int) -> None:
        self.inner.check(num_classes)
        if isinstance(self.inner, FullLogits) and num_classes > FULL_VOCAB_LIMIT:
            raise ValueError(
                f"full logits of a {num_classes:,}-token vocabulary are {2 * num_classes:,} bytes or more per token; "
                f"full is for vocabularies up to {FULL_VOCAB_LIMIT:,}: use topk:K or sampled:N"
            )

    def fields(self, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        per_token = {name: ((self.length, *shape), dtype) for name, (shape, dtype) in self.inner.fields(num_classes).items()}
        return {"lengths": ((), np.dtype(np.uint32)), **per_token}

    def _lengths(self, batch: int, lengths: np.ndarray | None) -> np.ndarray:
        if lengths is None:
            return np.full(batch, self.length, dtype=np.uint32)
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,) or lengths.min(initial=1) < 1 or lengths.max(initial=1) > self.length:
            raise ValueError(f"lengths must be {batch} token counts in [1, {self.length}]")
        return lengths.astype(np.uint32)

    def _scatter(self, flat: dict[str, np.ndarray], mask: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"lengths": lengths}
        for name, values in flat.items():
            full = np.zeros((*mask.shape, *values.shape[1:]), dtype=values.dtype)
            full[mask] = values
            out[name] = full
        return out

    def encode(self, logits: np.ndarray, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Logits [B, L, V] (and a draw seed per row) → the fields, each valid token encoded."""
        batch = len(logits)
        lengths = self._lengths(batch, lengths)
        mask = valid_mask(lengths, self.length)
        token = None if seeds is None else token_seeds(np.asarray(seeds, dtype=np.int64), self.length)[mask]
        return self._scatter(self.inner.encode(np.asarray(logits)[:, : self.length][mask], token), mask, lengths)

    def encode_tensor(self, logits: Any, seeds: np.ndarray | None = None, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """As ``encode``, on the logits' device: only the valid tokens' encoded fields cross."""
        import torch

        batch = len(logits)
        lengths = self._lengths(batch, lengths)
        mask = valid_mask(lengths, self.length)
        device_mask = torch.as_tensor(mask[:, : logits.shape[1]], device=logits.device)
        token = None if seeds is None else token_seeds(np.asarray(seeds, dtype=np.int64), self.length)[mask]
        return self._scatter(self.inner.encode_tensor(logits[device_mask], token), mask, lengths)

    def decode(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """[B, L, V] float32 logits; padding positions are zeros."""
        mask = valid_mask(np.asarray(fields["lengths"]), self.length)
        flat = self.inner.decode(self.valid_tokens(fields)[1])
        out = np.zeros((*mask.shape, flat.shape[-1]), dtype=np.float32)
        out[mask] = flat
        return out

    def valid_tokens(self, fields: Mapping[str, np.ndarray]) -> tuple[TargetLayout, dict[str, np.ndarray]]:
        """The inner layout and its fields of every valid token, [T, ...] in row-major order."""
        mask = valid_mask(np.asarray(fields["lengths"]), self.length)
        return self.inner, {name: np.asarray(values)[mask] for name, values in fields.items() if name != "lengths"}

    def served(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float32)

    def target(self, batch: Mapping[str, Any]) -> Any:
        """``{"mask": [B, L] bool, "inner": the inner layout's target of the valid tokens, in
        row-major order}``: the loss takes the student's logits at ``mask``."""
        import torch

        lengths = np.asarray(batch["lengths"], dtype=np.int64)
        mask = valid_mask(lengths, self.length)
        inner = {name: _take(batch[name], mask) for name in self.inner.fields(1) if name in batch}
        return {"mask": torch.from_numpy(mask), "inner": self.inner.target(inner)}

    def problem(self, fields: Mapping[str, np.ndarray]) -> str | None:
        lengths = np.asarray(fields["lengths"], dtype=np.int64)
        if lengths.size and (lengths.min() < 1 or lengths.max() > self.length):
            return f"a sequence length outside [1, {self.length}]"
        return self.inner.problem(self.valid_tokens(fields)[1])

    def _key(self) -> tuple[Any, ...]:
        return (self.inner, self.length)


def _take(values: Any, mask: np.ndarray) -> Any:
    """The valid tokens of a batch field (a torch tensor or a numpy array) [B, L, ...] → [T, ...]."""
    if isinstance(values, np.ndarray):
        return values[mask]
    import torch

    return values[torch.from_numpy(mask).to(values.device)]
