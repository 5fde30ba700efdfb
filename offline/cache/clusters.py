"""Clusters of classes, for Hinton et al.'s specialists (section 5): how they are written and read.

A cluster is a set of class indices in [0, C). A specialist model is trained on one cluster
(``offline-distill --specialist CLASSES``), and a generalist with its specialists is served as
one teacher (``teacher-serve --ensemble specialists``). Both name a cluster the same way:

    3,5,8              the classes themselves, comma-separated;
    @clusters.json:2   cluster 2 (counted from 0) of a file that ``cache-inspect --clusters K
                       --json`` wrote: a JSON object whose ``clusters`` is a list of lists of
                       class indices (``names`` beside it, when the cache records label names).

A clusters file is data from anywhere: it is read with a size bound, every entry must be a
plain integer (not a bool, a float or a string), and its clusters must be disjoint. Every
problem is a ``ClusterError`` (a ``CacheError``) in one line naming the file or the text.

Both sides import this module: the trainer and the service.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .contract import CacheError

MAX_CLUSTERS_BYTES = 64 << 20  # a clusters file larger than this is refused unread
# A specialist's output head (offline-distill --specialist-head): dustbin, the cluster's K
# classes and one for every other class (K + 1 outputs, output j < K is classes[j]); full, all C.
HEADS = ("dustbin", "full")
CLASSES_FORMS = "class indices joined by commas (3,5,8) or @FILE:K, cluster K of a clusters file that cache-inspect --clusters --json wrote"


class ClusterError(CacheError):
    """A cluster or clusters file that cannot be used; one line naming it and what was expected."""


def _index(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClusterError(f"{where}: class {value!r} is not an integer")
    return value


def check_cluster(where: str, classes: Sequence[Any], num_classes: int | None) -> tuple[int, ...]:
    """``classes`` as a tuple of distinct ints in [0, num_classes) (any ints when None), in the
    order given; ClusterError for an empty cluster, a repeat or a class out of range."""
    if not classes:
        raise ClusterError(f"{where}: an empty cluster; give at least one class")
    out = tuple(_index(where, c) for c in classes)
    for c in out:
        if c < 0 or (num_classes is not None and c >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, C)"
            raise ClusterError(f"{where}: class {c} is outside {bound}")
    seen: set[int] = set()
    for c in out:
        if c in seen:
            raise ClusterError(f"{where}: class {c} is given twice")
        seen.add(c)
    return out


def check_disjoint(clusters: Sequence[Sequence[int]], names: Sequence[str] | None = None, where: str = "clusters") -> None:
    """ClusterError when two clusters share a class; ``names`` names the clusters in the message."""
    owner: dict[int, int] = {}
    for i, cluster in enumerate(clusters):
        for c in cluster:
            j = owner.setdefault(int(c), i)
            if j != i:
                first = names[j] if names is not None else f"cluster {j}"
                second = names[i] if names is not None else f"cluster {i}"
                raise ClusterError(f"{where}: overlapping clusters: class {c} is in both {first} and {second}; clusters must be disjoint")


def read_clusters_file(path: str | Path, num_classes: int | None = None) -> list[tuple[int, ...]]:
    """Every cluster of a clusters file, checked: a JSON object with ``clusters``, a list of
    non-empty lists of distinct class indices in [0, num_classes), disjoint."""
    where = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_CLUSTERS_BYTES:
            raise ClusterError(f"{where}: {size:,} bytes; a clusters file is at most {MAX_CLUSTERS_BYTES:,}")
        with open(path, "rb") as fh:
            text = fh.read(MAX_CLUSTERS_BYTES + 1)
    except OSError as exc:
        raise ClusterError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ClusterError(f"{where}: not JSON ({str(exc)[:120]})") from None
    if not isinstance(document, dict) or not isinstance(document.get("clusters"), list):
        raise ClusterError(f"{where}: not a clusters file: expected a JSON object with 'clusters', a list of lists of class indices")
    clusters = []
    for k, cluster in enumerate(document["clusters"]):
        if not isinstance(cluster, list):
            raise ClusterError(f"{where}: cluster {k} is not a list of class indices")
        clusters.append(check_cluster(f"{where}: cluster {k}", cluster, num_classes))
    check_disjoint(clusters, where=where)
    return clusters


def parse_classes(text: str, num_classes: int | None = None) -> tuple[int, ...]:
    """A cluster named as ``3,5,8`` or ``@FILE:K`` → its classes, checked against ``num_classes``
    (and, from a file, against the file's other clusters)."""
    text = str(text).strip()
    if text.startswith("@"):
        path, colon, number = text[1:].rpartition(":")
        if not colon or not path:
            raise ClusterError(f"{text!r}: expected @FILE:K, cluster K of a clusters file")
        try:
            k = int(number)
        except ValueError:
            raise ClusterError(f"{text!r}: the cluster number {number!r} is not an integer") from None
        clusters = read_clusters_file(path, num_classes)
        if not 0 <= k < len(clusters):
            raise ClusterError(f"{text!r}: {path} holds {len(clusters)} cluster(s), numbered 0 to {len(clusters) - 1}")
        return clusters[k]
    parts = [p.strip() for p in text.split(",")]
    try:
        classes = [int(p) for p in parts]
    except ValueError:
        raise ClusterError(f"{text!r}: expected {CLASSES_FORMS}") from None
    return check_cluster(repr(text), classes, num_classes)


__all__ = ["CLASSES_FORMS", "HEADS", "ClusterError", "check_cluster", "check_disjoint", "parse_classes", "read_clusters_file"]
