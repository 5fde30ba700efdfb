"""Clusters of confusable classes from a cache (``offline.clustering``, ``cache-inspect --clusters``):
known groups of confusable classes are recovered from every layout and from a cache of views;
the covariance and the confusion shares against numpy on the same predictions; the --json output
is a clusters file (``offline.cache.clusters``); label names; and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.offline import clustering
from kdcache.offline.cache import CacheMeta, CacheReader, CacheWriter
from kdcache.offline.cache.clusters import parse_classes, read_clusters_file
from kdcache.offline.cli import inspect_main
from kdcache.offline.clustering import ClusteringError, cluster_classes, confusion_sums, kmeans

T = 2.0
CLASSES = 8
GROUPS = [(0, 1, 2), (3, 4)]  # confused among themselves; 5, 6 and 7 are predicted confidently
EXPECTED = [(0, 1, 2), (3, 4), (5,), (6,), (7,)]  # the groups by confusion covered, then the rest by class
NAMES = ["cat", "lynx", "puma", "crow", "rook", "eel", "fig", "gnu"]


def teacher_logits(n: int, views: int = 1, seed: int = 0) -> np.ndarray:
    """Each sample's class and its group get most of the mass; a little noise on every class."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, CLASSES, n)
    logits = rng.normal(scale=0.5, size=(n, views, CLASSES))
    for row, c in enumerate(classes):
        group = next((g for g in GROUPS if c in g), (c,))
        logits[row, :, list(group)] += 6.0
        logits[row, :, c] += 1.0
    logits = logits.astype(np.float32)
    return logits if views > 1 else logits[:, 0]


def write_cache(directory, logits, layout: str = "full", names: list[str] | None = None, max_samples: int = 64):
    views = logits.shape[1] if logits.ndim == 3 else 1
    augment = None
    if views > 1:
        from kdcache.offline.cache.views import parse_policy

        augment = parse_policy("random-crop:1").describe()
    meta = CacheMeta(
        "ab" * 32, "cluster-test", CLASSES, (2,), "float32", serving_temperature=T, logits_layout=layout,
        views_per_id=views, augment=augment, view_salt=5 if views > 1 else 0, target_seed=1,
    )  # fmt: skip
    n = len(logits)
    with CacheWriter(directory, meta, max_samples=max_samples, label_names=names) as writer:
        if n:
            writer.append([f"s{i}" for i in range(n)], np.zeros((n, 2), np.float32), logits, np.full(n, -1))
    return directory


def predictions(directory) -> np.ndarray:
    """Every stored prediction, decoded and softmaxed here: [samples × views, C] in float64."""
    reader = CacheReader(directory)
    layout = reader.meta.layout
    decoded = layout.decode(reader.read(tuple(layout.fields(CLASSES)))).reshape(-1, CLASSES).astype(np.float64) / T
    p = np.exp(decoded - decoded.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["spectral", "covariance"])
@pytest.mark.parametrize(("layout", "views"), [("full", 1), ("topk:3", 1), ("sampled:64", 1), ("full", 3)])
def test_the_confusable_groups_are_recovered_from_every_layout_and_from_views(tmp_path, monkeypatch, layout, views, method):
    cache = write_cache(tmp_path / "c", teacher_logits(300, views=views), layout)  # 5 shards
    clustered = []  # the matrix whose columns K-means is given
    monkeypatch.setattr(clustering, "kmeans", lambda points, k, **kw: clustered.append(points) or kmeans(points, k, **kw))
    result = cluster_classes(CacheReader(cache), 5, method=method)
    assert result.clusters == EXPECTED and result.method == method
    assert result.samples == 300 and result.predictions == 300 * views and result.temperature == T and result.names is None
    assert result.shares[0] > result.shares[1] > 0.05 and result.covered == pytest.approx(sum(result.shares))
    # The same figures as numpy's on the same predictions: the covariance (the paper's), and M's shares.
    p = predictions(cache)
    sums = confusion_sums(CacheReader(cache))
    assert sums.count == len(p)
    assert np.allclose(sums.covariance(), np.cov(p, rowvar=False, bias=True), atol=1e-12)
    moment = p.T @ p / len(p)
    off = moment - np.diag(np.diag(moment))
    assert result.shares == pytest.approx([off[np.ix_(c, c)].sum() / off.sum() for c in EXPECTED], abs=1e-9)
    if method == "covariance":
        assert np.allclose(clustered[0], np.cov(p, rowvar=False, bias=True), atol=1e-12)
        direct = kmeans(np.cov(p, rowvar=False, bias=True), 5)
        assert sorted(tuple(np.flatnonzero(direct == j)) for j in range(5)) == sorted(EXPECTED)
    else:  # the rows of the 5 leading eigenvectors of D^-1/2 A D^-1/2, unit length (compared sign-free, as U Uᵀ)
        degree = off.sum(axis=1)
        _, vectors = np.linalg.eigh(off / np.sqrt(np.outer(degree, degree)))
        rows = vectors[:, -5:] / np.linalg.norm(vectors[:, -5:], axis=1, keepdims=True)
        assert np.allclose(clustered[0] @ clustered[0].T, rows @ rows.T, atol=1e-8)


def test_kmeans_is_deterministic_and_never_leaves_a_cluster_empty(tmp_path):
    cache = write_cache(tmp_path / "c", teacher_logits(400, seed=2), max_samples=400)
    assert cluster_classes(CacheReader(cache), 5).clusters == EXPECTED
    assert cluster_classes(CacheReader(cache), 5).clusters == EXPECTED
    whole = cluster_classes(CacheReader(cache), 1)
    assert whole.clusters == [tuple(range(CLASSES))] and whole.covered == pytest.approx(1.0)
    apart = cluster_classes(CacheReader(cache), CLASSES)
    assert sorted(apart.clusters) == [(c,) for c in range(CLASSES)] and apart.covered == 0.0
    # Fewer distinct points than clusters (classes never predicted have equal columns): K non-empty clusters anyway.
    points = np.zeros((6, 3))
    points[4, 0], points[5, 1] = 1.0, 2.0
    labels = kmeans(points, 4)
    assert sorted(np.bincount(labels, minlength=4)) == [1, 1, 1, 3] and np.array_equal(labels, kmeans(points, 4))


def test_json_is_a_clusters_file_and_names_appear(tmp_path, capsys):
    cache = write_cache(tmp_path / "c", teacher_logits(200), names=NAMES)
    assert inspect_main([str(cache), "--clusters", "5", "--json"]) == 0
    out = capsys.readouterr()
    document = json.loads(out.out)  # one object, nothing else
    assert out.err == ""
    assert document["clusters"] == [list(c) for c in EXPECTED]
    assert document["names"] == [[NAMES[c] for c in cluster] for cluster in EXPECTED]
    assert set(document) == {"clusters", "names", "confusion", "covered", "method", "temperature", "predictions", "cache"}
    assert document["temperature"] == T and document["predictions"] == 200 and document["cache"] == str(cache)
    assert document["covered"] == pytest.approx(sum(document["confusion"]))
    path = tmp_path / "clusters.json"
    path.write_text(out.out)
    assert read_clusters_file(path, CLASSES) == EXPECTED
    assert parse_classes(f"@{path}:1", CLASSES) == (3, 4)

    assert inspect_main([str(cache), "--clusters", "5"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith("clusters         5 of 8 classes, from 200 predictions at T=2")
    assert text[1].startswith("cluster 0        3 classes, ") and text[1].endswith("of the confusion: 0=cat, 1=lynx, 2=puma")
    assert text[2].endswith(": 3=crow, 4=rook") and text[3].startswith("cluster 2        1 class, 0.0% of the confusion: 5=eel")
    assert text[-1].startswith("covered          ") and len(text) == 7


def test_a_cache_without_names_has_no_names_key(tmp_path, capsys):
    cache = write_cache(tmp_path / "c", teacher_logits(100, views=2), layout="topk:2")
    assert inspect_main([str(cache), "--clusters", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "names" not in document and document["predictions"] == 200 and len(document["clusters"]) == 2


@pytest.mark.parametrize(
    ("k", "samples", "message"),
    [
        ("0", 20, "--clusters K must be between 1 and 8, the cache's classes; got 0"),
        ("9", 20, "--clusters K must be between 1 and 8, the cache's classes; got 9"),
        ("2", 0, "no published samples to cluster"),
        ("2", -4, "8 classes; --clusters takes at most 4 (a C × C float64 matrix)"),  # MAX_CLASSES lowered to 4
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, monkeypatch, k, samples, message):
    if samples < 0:
        monkeypatch.setattr(clustering, "MAX_CLASSES", 4)
        samples = -samples
    cache = write_cache(tmp_path / "c", teacher_logits(samples) if samples else np.zeros((0, CLASSES), np.float32))
    assert inspect_main([str(cache), "--clusters", k, "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("cache-inspect: error: ") and message in out.err
    with pytest.raises(ClusteringError):
        cluster_classes(CacheReader(cache), int(k))


def test_damaged_rows_name_the_shard(tmp_path, capsys):
    import h5py

    cache = write_cache(tmp_path / "c", teacher_logits(40), max_samples=20)
    with h5py.File(cache / "shard-000000.h5", "r+") as h5:  # damage no writer stores, the file's size kept
        h5["logits"][7, 3] = np.nan
    assert inspect_main([str(cache), "--clusters", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard-000000.h5: non-finite teacher logits in rows 0:20" in err
