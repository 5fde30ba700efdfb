"""Soft-target statistics, and the warnings they raise about a bad setup. Numpy only.

A teacher given inputs it was not trained on (0..255 where it expects 0..1, a missing
normalisation) still answers, but its soft targets are near one-hot: distilling them teaches
little beyond the labels, and nothing fails. Three numbers over a bounded sample of targets
catch it: the mean top-1 probability, the mean entropy (nats), and, where labels exist, how often
the teacher's top-1 agrees with the label. ``cache-inspect`` reports them at the serving
temperature, ``offline-distill`` at its distillation temperature, and ``teacher-serve`` over the
first ``SERVICE_SAMPLES`` samples it computes; each prints ``soft_target_warnings``.

Rows come as logits whose softmax at T is the distribution: a cache's stored fields decoded by
its layout (``TargetLayout.decode``: full logits as they are, top-k and sampled targets as the
log of the stored distribution times T_s), or the logits the service stores (``served``). A
cache with views ([B, V, C]) counts every view, each against its sample's label. On a
``sampled:N`` cache the statistics describe the stored frequencies, whose top-1 is at least 1/N
and comes out above the teacher's own when N is small (``sampled:1`` is one-hot by design).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .layout import TargetLayout

# Near one-hot: above this mean top-1 probability the soft targets carry little beyond the labels.
NEAR_ONE_HOT = 0.99
# Low agreement: a teacher worth distilling agrees with most labels of its own task.
LOW_AGREEMENT = 0.5
MIN_SAMPLES = 20  # samples before the near-one-hot warning is given
MIN_LABELLED = 100  # labelled samples before the agreement warning is given
# Distributions (samples × views) a cache's statistics read, fewer with many classes: enough for
# two digits of each figure, and a fraction of a second on any cache.
SAMPLE_TARGETS = 20_000
SAMPLE_VALUES = 50_000_000  # at most this many logits
SERVICE_SAMPLES = 1_000  # samples teacher-serve looks at, once
_SLICE = 4096  # rows worked on at once, to bound the float64 temporaries


def sample_size(views: int, num_classes: int) -> int:
    """How many samples of a cache with ``views`` views over ``num_classes`` classes to read."""
    targets = min(SAMPLE_TARGETS, max(1, SAMPLE_VALUES // max(1, num_classes)))
    return max(1, targets // max(1, views))


@dataclass(frozen=True)
class SoftTargetStats:
    temperature: float
    samples: int  # samples the figures cover
    mean_top1: float | None  # None: no samples
    mean_entropy: float | None  # nats
    labelled: int  # of ``samples``, those with a label
    label_agreement: float | None  # None: no labelled samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``mean top-1 0.568, entropy 1.23 nats, top-1 agrees with the label on 97.1% (at T=4, over 4,000 samples)``."""
        if self.mean_top1 is None:
            return "no samples"
        agreement = (
            f", top-1 agrees with the label on {self.label_agreement:.1%}"
            + (f" of {self.labelled:,} labelled" if self.labelled != self.samples else "")
            if self.label_agreement is not None
            else ", no labels"
        )
        return (
            f"mean top-1 {self.mean_top1:.3f}, entropy {self.mean_entropy:.2f} nats{agreement} "
            f"(at T={self.temperature:g}, over {self.samples:,} samples)"
        )


class SoftTargetAccumulator:
    """Running sums over the first ``limit`` samples (None: all) given to ``add``."""

    def __init__(self, temperature: float, limit: int | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.limit = limit
        self.samples = self.labelled = 0
        self._targets = self._labelled_targets = self._agreeing = 0
        self._top1 = self._entropy = 0.0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.samples >= self.limit

    def add(self, logits: np.ndarray, labels: np.ndarray | None = None) -> None:
        """``logits`` [B, C] or [B, V, C] whose softmax at this temperature is the soft targets,
        ``labels`` [B] (-1: unknown). Samples past the limit are ignored."""
        logits = np.asarray(logits)
        take = len(logits) if self.limit is None else max(0, min(len(logits), self.limit - self.samples))
        if take == 0:
            return
        labels = np.full(take, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)[:take]
        views = int(np.prod(logits.shape[1:-1], dtype=np.int64))
        rows = logits[:take].reshape(take * views, logits.shape[-1])
        row_labels = np.repeat(labels, views)
        for start in range(0, len(rows), _SLICE):
            self._add_rows(rows[start : start + _SLICE], row_labels[start : start + _SLICE])
        self.samples += take
        self.labelled += int((labels >= 0).sum())

    def add_stored(self, layout: TargetLayout, fields: Mapping[str, np.ndarray], labels: np.ndarray | None = None) -> None:
        """Rows of a cache's stored target fields, decoded by its layout; this accumulator's
        temperature must be one at which the layout's targets hold (T_s for a sparse layout).
        A token cache's rows count each valid token as one target (``PerToken.valid_tokens``)."""
        tokens = getattr(layout, "valid_tokens", None)
        if tokens is not None:
            inner, flat = tokens(fields)
            self.add(inner.decode(flat))
            return
        self.add(layout.decode(fields), labels)

    def _add_rows(self, logits: np.ndarray, labels: np.ndarray) -> None:
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        log_p = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        self._top1 += float(p.max(axis=1).sum())
        self._entropy += float(-(p * np.where(p > 0, log_p, 0.0)).sum())
        self._targets += len(p)
        known = labels >= 0
        if known.any():
            self._labelled_targets += int(known.sum())
            self._agreeing += int((np.argmax(log_p[known], axis=1) == labels[known]).sum())

    def stats(self) -> SoftTargetStats:
        return SoftTargetStats(
            temperature=self.temperature,
            samples=self.samples,
            mean_top1=self._top1 / self._targets if self._targets else None,
            mean_entropy=self._entropy / self._targets if self._targets else None,
            labelled=self.labelled,
            label_agreement=self._agreeing / self._labelled_targets if self._labelled_targets else None,
        )


def soft_target_warnings(stats: SoftTargetStats) -> list[str]:
    """What the statistics suggest is wrong with the setup, one sentence each (empty: nothing)."""
    warnings = []
    where = f"at T={stats.temperature:g}, over {stats.samples:,} samples"
    if stats.mean_top1 is not None and stats.samples >= MIN_SAMPLES and stats.mean_top1 > NEAR_ONE_HOT:
        warnings.append(
            f"the soft targets are near one-hot (mean top-1 probability {stats.mean_top1:.4f} {where}): they carry little "
            "beyond the labels; check the teacher's input contract (--input-scale, --normalize) or raise the temperature"
        )
    if stats.label_agreement is not None and stats.labelled >= MIN_LABELLED and stats.label_agreement < LOW_AGREEMENT:
        warnings.append(
            f"the teacher's top-1 agrees with the label on only {stats.label_agreement:.1%} of {stats.labelled:,} labelled samples "
            f"(at T={stats.temperature:g}): the teacher may see inputs prepared differently from its training (check "
            "--input-scale, --normalize), or the labels may number the classes differently from the teacher's (check label_names)"
        )
    return warnings


class SoftTargetWatch:
    """The service's check: statistics of the first ``samples`` samples the teacher computes,
    then ``report(warning)`` once for each warning, then nothing (``observe`` returns at once)."""

    def __init__(self, temperature: float, report: Callable[[str], None], samples: int = SERVICE_SAMPLES) -> None:
        self._accumulator = SoftTargetAccumulator(temperature, limit=samples)
        self._report = report
        self.done = False

    def observe(self, logits: np.ndarray, labels: np.ndarray | None = None) -> None:
        if self.done:
            return
        self._accumulator.add(logits, labels)
        if self._accumulator.full:
            self.done = True
            for warning in soft_target_warnings(self._accumulator.stats()):
                self._report(warning)


__all__ = [
    "LOW_AGREEMENT", "MIN_LABELLED", "MIN_SAMPLES", "NEAR_ONE_HOT", "SAMPLE_TARGETS", "SERVICE_SAMPLES",
    "SoftTargetAccumulator", "SoftTargetStats", "SoftTargetWatch", "sample_size", "soft_target_warnings",
]  # fmt: skip
