"""Clusters of confusable classes, from a cache's soft targets: Hinton, Vinyals and Dean (2015),
"Distilling the Knowledge in a Neural Network", section 5 (specialists). Numpy only.

Every published row of a cache, every view of it, is one prediction p = softmax(decoded / T_s):
the layout's stored targets decoded (``TargetLayout.decode``) at the serving temperature T_s, the
one temperature at which every layout's targets hold. The rows are streamed in bounded blocks
and summed in float64, so memory is O(C²) whatever the cache's size:

    M   = E[p pᵀ]                 (C × C; off its diagonal, how often two classes share mass)
    Cov = M − E[p] E[p]ᵀ

Two methods (``--cluster-method``):

* ``covariance``, the paper's: K-means on the C columns of Cov (points in R^C): classes predicted
  together have similar columns. With a confident teacher each column is dominated by its own
  class's variance, and the answer tends to be one large cluster and K - 1 single classes
  (docs/benchmarks.md § Specialists).
* ``spectral`` (the default): normalised spectral clustering (Ng, Jordan and Weiss 2001) of the
  classes as a graph whose edge weights are the confusion A = M off its diagonal, symmetrised:
  the K leading eigenvectors of D^-1/2 A D^-1/2, rows normalised, then K-means. It groups the
  classes that share mass with each other, which is what a specialist needs.

K-means++ starts from a fixed seed, several restarts keep the lowest inertia, and a cluster left
empty is re-seeded from the point farthest from its centre, so the answer is deterministic and
has K non-empty clusters.

What a cluster is worth is the confusion it covers: the total confusion is Σ_{i≠j} M_ij, and a
cluster S covers Σ_{i≠j ∈ S} M_ij of it. The clusters are reported largest share first, their
classes ascending; ``cache-inspect DIR --clusters K --json`` writes them as the clusters file
that ``offline.cache.clusters`` reads (``@clusters.json:k``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import CacheError
from .cache.label_names import printable
from .cache.shard import ShardHandle

MAX_CLASSES = 4096  # the C × C float64 sums take 128 MiB each at this bound
RESTARTS = 10  # K-means runs from different K-means++ starts; the lowest inertia is kept
SEED = 0
MAX_ITERATIONS = 300  # Lloyd steps per run, at most (a run stops when no class moves)
_BLOCK_VALUES = 1 << 22  # decoded logits read at once (16 MiB of float32)
_SLICE = 4096  # predictions turned into float64 probabilities at once


class ClusteringError(ValueError):
    """A request the cache cannot answer (K out of range, too many classes, no samples); one line."""


class ConfusionSums:
    """Σ p and Σ p pᵀ in float64 over the predictions given to ``add``, at ``temperature``."""

    def __init__(self, num_classes: int, temperature: float) -> None:
        self.temperature = float(temperature)
        self.count = 0
        self.sum_p = np.zeros(num_classes)
        self.sum_outer = np.zeros((num_classes, num_classes))

    def add(self, logits: np.ndarray) -> None:
        """``logits`` [B, C] or [B, V, C] whose softmax at this temperature is the predictions."""
        logits = np.asarray(logits)
        rows = logits.reshape(-1, logits.shape[-1])
        for start in range(0, len(rows), _SLICE):
            z = rows[start : start + _SLICE].astype(np.float64) / self.temperature
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            self.sum_p += p.sum(axis=0)
            self.sum_outer += p.T @ p
            self.count += len(p)

    def second_moment(self) -> np.ndarray:
        """M = E[p pᵀ]."""
        return self.sum_outer / self.count

    def covariance(self) -> np.ndarray:
        """E[p pᵀ] − E[p] E[p]ᵀ."""
        mean = self.sum_p / self.count
        return self.second_moment() - np.outer(mean, mean)


def _blocks(reader: Any, fields: list[str]) -> Iterator[tuple[Any, int, dict[str, np.ndarray]]]:
    """Every published row, as (shard, first row, fields) blocks of whole chunks where they fit."""
    meta = reader.meta
    budget = max(1, _BLOCK_VALUES // (meta.views_per_id * meta.num_classes))
    chunk = meta.chunk_rows()
    rows = budget if budget < chunk else budget // chunk * chunk
    for info in reader.shards:
        handle = ShardHandle(info.path)
        try:
            for start in range(0, info.num_samples, rows):
                yield info, start, handle.read(start, min(start + rows, info.num_samples), fields)
        finally:
            handle.close()


def confusion_sums(reader: Any, progress: bool = False) -> ConfusionSums:
    """The sums over every published row of ``reader`` (a ``CacheReader``), every view, at T_s.
    Damaged rows raise ``CacheError`` naming the shard, as ``CacheReader.soft_target_stats``."""
    from tqdm import tqdm

    meta = reader.meta
    layout = meta.layout
    fields = list(layout.fields(meta.num_classes))
    sums = ConfusionSums(meta.num_classes, meta.serving_temperature)
    # Shown on a terminal only, and only once the work has lasted a second.
    disable = None if progress else True
    with tqdm(total=reader.num_samples, unit="sample", desc="clusters", file=sys.stderr, disable=disable, delay=1.0) as bar:
        for info, start, block in _blocks(reader, fields):
            rows = len(next(iter(block.values())))
            problem = layout.problem(block)
            if problem:
                raise CacheError(f"{info.where}: {problem} in rows {start}:{start + rows} (cache-inspect --verify checks the shard)")
            sums.add(layout.decode(block))
            bar.update(rows)
    return sums


# ---- K-means on the columns of the covariance ------------------------------------------------


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[N, K] squared Euclidean distances, never below 0."""
    d = (points**2).sum(axis=1)[:, None] - 2.0 * points @ centres.T + (centres**2).sum(axis=1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K-means++ (Arthur and Vassilvitskii, 2007): each centre drawn with probability ∝ D²."""
    chosen = [int(rng.integers(len(points)))]
    nearest = _squared_distances(points, points[chosen])[:, 0]
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            index = int(np.searchsorted(np.cumsum(nearest), rng.random() * total, side="right"))
            index = min(index, len(points) - 1)
        else:  # every point sits on a centre already: any point not chosen yet
            index = next(i for i in range(len(points)) if i not in chosen)
        chosen.append(index)
        nearest = np.minimum(nearest, _squared_distances(points, points[[index]])[:, 0])
    return points[chosen].copy()


def _fill_empty(points: np.ndarray, labels: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
    """Move into each empty cluster the point farthest from its centre, taken from a cluster that
    keeps at least one point (K ≤ N, so there always is one)."""
    labels = labels.copy()
    own = distances[np.arange(len(points)), labels]
    for empty in np.flatnonzero(np.bincount(labels, minlength=k) == 0):
        sizes = np.bincount(labels, minlength=k)
        movable = sizes[labels] > 1
        candidate = int(np.argmax(np.where(movable, own, -1.0)))
        labels[candidate] = empty
        own[candidate] = 0.0
    return labels


def _kmeans_once(points: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    centres = _kmeans_plus_plus(points, k, rng)
    labels = np.full(len(points), -1)
    for _ in range(MAX_ITERATIONS):
        distances = _squared_distances(points, centres)
        new = _fill_empty(points, np.argmin(distances, axis=1), distances, k)
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([points[labels == c].mean(axis=0) for c in range(k)])
    inertia = float(_squared_distances(points, centres)[np.arange(len(points)), labels].sum())
    return labels, inertia


def kmeans(points: np.ndarray, k: int, seed: int = SEED, restarts: int = RESTARTS) -> np.ndarray:
    """A cluster (0..k-1) per point: the lowest-inertia run of ``restarts`` K-means++ starts from
    ``seed``, every cluster non-empty. Deterministic for the same points."""
    points = np.asarray(points, dtype=np.float64)
    if not 1 <= k <= len(points):
        raise ClusteringError(f"K must be between 1 and {len(points)}, got {k}")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        labels, inertia = _kmeans_once(points, k, rng)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    assert best is not None
    return best


def spectral_points(moment: np.ndarray, k: int) -> np.ndarray:
    """The classes as points for K-means: rows of the K leading eigenvectors of the normalised
    confusion affinity D^-1/2 A D^-1/2 (A = M off its diagonal, symmetrised), each row scaled
    to unit length. A class that shares no mass with any other gets a zero row."""
    affinity = np.asarray(moment, dtype=np.float64).copy()
    np.fill_diagonal(affinity, 0.0)
    affinity = (affinity + affinity.T) / 2
    scale = 1 / np.sqrt(np.maximum(affinity.sum(axis=1), 1e-300))
    _, vectors = np.linalg.eigh(affinity * scale[:, None] * scale[None, :])
    points = vectors[:, -k:]
    return points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-300)


CLUSTER_METHODS = {
    "spectral": lambda sums, k: spectral_points(sums.second_moment(), k),
    "covariance": lambda sums, k: sums.covariance(),
}
DEFAULT_METHOD = "spectral"


def coverage(moment: np.ndarray, clusters: list[tuple[int, ...]]) -> tuple[list[float], float]:
    """Each cluster's share of the total confusion Σ_{i≠j} M_ij, and their sum (0 when the
    predictions are one-hot and there is no confusion to cover)."""
    off = np.asarray(moment, dtype=np.float64).copy()
    np.fill_diagonal(off, 0.0)
    total = off.sum()
    shares = [float(off[np.ix_(c, c)].sum() / total) if total > 0 else 0.0 for c in clusters]
    return shares, float(sum(shares))


# ---- the result ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clustering:
    clusters: list[tuple[int, ...]]  # largest share first, classes ascending
    shares: list[float]  # of the total confusion, per cluster
    covered: float  # their sum
    samples: int
    predictions: int  # samples × views
    temperature: float  # T_s
    num_classes: int
    method: str  # CLUSTER_METHODS
    names: list[list[str | None]] | None  # per cluster, where the cache records label names

    def to_json(self, directory: str) -> dict[str, Any]:
        """The clusters file (``offline.cache.clusters.read_clusters_file`` reads it)."""
        out: dict[str, Any] = {"clusters": [list(c) for c in self.clusters]}
        if self.names is not None:
            out["names"] = self.names
        out.update(
            confusion=self.shares, covered=self.covered, method=self.method, temperature=self.temperature, predictions=self.predictions
        )
        out["cache"] = directory
        return out

    def to_json_text(self, directory: str) -> str:
        """``to_json`` as one JSON object with a line per key (a cluster list stays on its line)."""
        items = self.to_json(directory).items()
        return "{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in items) + "\n}"

    def describe(self) -> list[str]:
        """The lines ``cache-inspect --clusters`` prints, escaped for a terminal."""
        views = f" ({self.samples:,} samples × {self.predictions // self.samples} views)" if self.predictions != self.samples else ""
        lines = [
            f"clusters         {len(self.clusters)} of {self.num_classes} classes, from {self.predictions:,} predictions{views} "
            f"at T={self.temperature:g} ({METHOD_TEXT[self.method]})"
        ]
        width = len(str(len(self.clusters) - 1))
        for index, (cluster, share) in enumerate(zip(self.clusters, self.shares, strict=True)):
            names = self.names[index] if self.names is not None else [None] * len(cluster)
            classes = ", ".join(str(c) if name is None else f"{c}={name}" for c, name in zip(cluster, names, strict=True))
            size = f"{len(cluster)} class{'es' if len(cluster) != 1 else ''}"
            lines.append(printable(f"{f'cluster {index:>{width}}':<16} {size}, {share:.1%} of the confusion: {classes}"))
        lines.append(f"covered          {self.covered:.1%} of the confusion (the rest lies between clusters)")
        return lines


METHOD_TEXT = {
    "spectral": "spectral clustering of their confusion",
    "covariance": "K-means on the columns of their covariance",
}


def cluster_classes(
    reader: Any, k: int, *, method: str = DEFAULT_METHOD, progress: bool = False, seed: int = SEED, restarts: int = RESTARTS
) -> Clustering:
    """K disjoint clusters of confusable classes from every published row of ``reader`` (a
    ``CacheReader``). ClusteringError for K outside [1, C], more than ``MAX_CLASSES`` classes or
    a cache without published samples; CacheError for damaged rows."""
    meta = reader.meta
    classes = meta.num_classes
    if classes > MAX_CLASSES:
        raise ClusteringError(f"{reader.directory}: {classes:,} classes; --clusters takes at most {MAX_CLASSES:,} (a C × C float64 matrix)")
    if not 1 <= k <= classes:
        raise ClusteringError(f"--clusters K must be between 1 and {classes}, the cache's classes; got {k}")
    if reader.num_samples == 0:
        raise ClusteringError(f"{reader.directory}: no published samples to cluster")
    if method not in CLUSTER_METHODS:
        raise ClusteringError(f"--cluster-method must be one of {', '.join(CLUSTER_METHODS)}, got {method!r}")
    sums = confusion_sums(reader, progress=progress)
    labels = kmeans(CLUSTER_METHODS[method](sums, k), k, seed=seed, restarts=restarts)
    clusters = [tuple(int(c) for c in np.flatnonzero(labels == j)) for j in range(k)]
    shares, _ = coverage(sums.second_moment(), clusters)
    order = sorted(range(k), key=lambda j: (-shares[j], clusters[j][0]))
    clusters, shares = [clusters[j] for j in order], [shares[j] for j in order]
    label_names = reader.label_names
    names = None if label_names is None else [[label_names[c] if c < len(label_names) else None for c in cluster] for cluster in clusters]
    return Clustering(
        clusters=clusters, shares=shares, covered=float(sum(shares)), samples=reader.num_samples, predictions=sums.count,
        temperature=meta.serving_temperature, num_classes=classes, method=method, names=names,
    )  # fmt: skip


__all__ = [
    "CLUSTER_METHODS",
    "DEFAULT_METHOD",
    "MAX_CLASSES",
    "spectral_points",
    "Clustering",
    "ClusteringError",
    "ConfusionSums",
    "cluster_classes",
    "confusion_sums",
    "coverage",
    "kmeans",
]
