"""Specialists (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network",
sections 5 and 6.1), and a run that starts from another run's student (``--init``).

``offline-distill --specialist CLASSES [--specialist-head dustbin|full] --init student.pt``:

* The head. ``full`` (the default, chosen on validation): the C-way softmax, as section 6.1
  proposes; ``dustbin``: K + 1 outputs, output j < K is class ``classes[j]`` and output K is
  "any other class".
* The batches. A sample belongs to the cluster when its label (>= 0, as ``--label-fraction``
  keeps it) is in the cluster, else when the teacher's top class is (from the decoded stored
  targets). One pre-pass over the labels and targets (``membership``) gives the cluster
  fraction f; each epoch a row then enters the shuffle buffer floor(r) or ceil(r) times, drawn
  from (seed, epoch, shard, row), with mean r = 1/(2f) for the cluster's rows and 1/(2(1 - f))
  for the others (``Enrichment``, the stream's ``repeats``): an epoch is still about N samples,
  about half of them the cluster's, as the paper's batches were.
* The targets (dustbin head; ``PooledTargets``, the stream's ``transform``): p = softmax(v/T)
  over the C classes (a topk or sampled cache: its decoded distribution, at T = T_s), pooled
  into the K cluster probabilities and the sum of the rest, handed to the loss as the "logits"
  T·log(pooled p), so that the full-logits soft term KL(softmax(v'/T) || softmax(z/T)) applies
  unchanged; labels are mapped the same way (-1 stays -1). A full head trains on the cache's
  targets and labels as they are.
* The start (``--init``, ``warmstart.py``): a student.pt that offline-distill wrote, read as
  data, with the cache's input contract and classes. Every weight is copied; for a dustbin head the classifier (the last nn.Linear with C outputs) keeps
  the rows of the cluster's classes, and the dustbin row starts as the mean of the other rows,
  its bias the others' mean + log(C - K): the log-sum-exp the other C - K logits would have if
  they were all equal.

``prepare`` does all of it for ``train.open_run`` before anything is written; every problem is
a ``SpecialistError`` (or ``warmstart.InitError``) in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import models
from .cache import CacheError, CacheMeta, CacheReader, ShardHandle, ShardInfo, TargetLayout
from .cache.clusters import HEADS, ClusterError, parse_classes
from .cache.label_names import printable
from .cache.trust import Origin, describe_error
from .dataset import Columns, keeps_label
from .warmstart import load_generalist, read_init, settle_arch

if TYPE_CHECKING:
    from .train import TrainConfig

DEFAULT_HEAD = "full"  # chosen on validation: docs/benchmarks.md § Specialists
REPEAT_SALT = 0x5BEC  # beside (seed, epoch, shard): the enrichment's draws
PREPASS_VALUES = 1 << 22  # decoded target values per block of the membership pre-pass
SHOWN_CLASSES = 16  # the log line names at most this many of the cluster's classes
_TINY = float(np.finfo(np.float32).tiny)


class SpecialistError(Exception):
    """A --specialist or --init that cannot be used, explained in one line."""


@dataclass(frozen=True)
class Cluster:
    """The classes a specialist is trained on, in output order, and its head."""

    classes: tuple[int, ...]
    head: str
    classes_total: int  # C, the cache's classes

    @property
    def width(self) -> int:
        """The specialist's outputs: K + 1 (dustbin) or C (full)."""
        return len(self.classes) + 1 if self.head == "dustbin" else self.classes_total

    def record(self) -> dict[str, Any]:
        """What student.pt and metrics.json record (service/loading.py reads it)."""
        return {"classes": list(self.classes), "head": self.head, "classes_total": self.classes_total}

    def others(self) -> list[int]:
        inside = set(self.classes)
        return [c for c in range(self.classes_total) if c not in inside]

    def map_labels(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the head's outputs number them: class classes[j] → j, any other class → K
        (the dustbin), -1 (unknown) stays -1. A full head's are the cache's."""
        labels = np.asarray(labels).astype(np.int64)
        if self.head != "dustbin":
            return labels
        table = np.full(self.classes_total, len(self.classes), dtype=np.int64)
        table[list(self.classes)] = np.arange(len(self.classes))
        return np.where(labels >= 0, table[np.clip(labels, 0, self.classes_total - 1)], -1)


def read_cluster(text: str, head: str, num_classes: int) -> Cluster:
    """``--specialist TEXT`` (``3,5,8`` or ``@clusters.json:K``) for a cache of ``num_classes``."""
    if head not in HEADS:
        raise SpecialistError(f"--specialist-head must be one of {', '.join(HEADS)}, got {head!r}")
    try:
        classes = parse_classes(text, num_classes)
    except ClusterError as exc:
        raise SpecialistError(f"--specialist {exc} (the cache has {num_classes} classes)") from None
    if len(classes) >= num_classes:
        raise SpecialistError(
            f"--specialist {text}: names all {num_classes} classes of the cache; a specialist's cluster must leave classes "
            "out (for its dustbin, and for the other half of its batches)"
        )
    return Cluster(classes, head, num_classes)


# ---------------------------------------------------------------------------------------------
# The batches: who belongs to the cluster, and how often each row is seen


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    weights = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def top_classes(meta: CacheMeta, targets: Mapping[str, np.ndarray]) -> np.ndarray:
    """The teacher's top class of each row, from its decoded stored targets (a cache of views:
    of the views' mean distribution at the serving temperature)."""
    decoded = meta.layout.decode(targets)
    if decoded.ndim == 3:
        return softmax(decoded, meta.serving_temperature).mean(axis=1).argmax(axis=-1)
    return decoded.argmax(axis=-1)


def membership(
    shards: Sequence[ShardInfo], meta: CacheMeta, cluster: Cluster, *, label_fraction: float = 1.0, label_seed: int = 0,
    skip_corrupt: bool = False,
) -> list[np.ndarray]:  # fmt: skip
    """Whether each row of each shard belongs to the cluster: its label when it has one (kept by
    ``--label-fraction``), else the teacher's top class. One read of the labels and targets, in
    blocks; with ``skip_corrupt`` a damaged block's rows count as outside (the stream skips them)."""
    inside = np.zeros(meta.num_classes, dtype=bool)
    inside[list(cluster.classes)] = True
    fields = list(meta.layout.fields(meta.num_classes))
    reads = ["labels", *fields, *(["ids"] if label_fraction < 1 else [])]
    step = max(1, PREPASS_VALUES // (meta.num_classes * meta.views_per_id))
    found = []
    for info in shards:
        members = np.zeros(info.num_samples, dtype=bool)
        handle = ShardHandle(info.path)
        try:
            for start in range(0, info.num_samples, step):
                stop = min(info.num_samples, start + step)
                try:
                    block = handle.read(start, stop, reads)
                    labels = block["labels"].astype(np.int64)
                    targets = {name: block[name] for name in fields}
                    problem = (
                        "a label out of range" if ((labels < -1) | (labels >= meta.num_classes)).any() else meta.layout.problem(targets)
                    )
                    if problem:
                        raise CacheError(
                            f"{info.where}: {problem} in rows {start}:{stop} (the shard is corrupt; cache-inspect --verify checks it)"
                        )
                except CacheError:
                    if not skip_corrupt:
                        raise
                    continue
                if label_fraction < 1:
                    labels = np.where(keeps_label(block["ids"], label_fraction, label_seed), labels, -1)
                members[start:stop] = np.where(labels >= 0, inside[np.clip(labels, 0, None)], inside[top_classes(meta, targets)])
        finally:
            handle.close()
        found.append(members)
    return found


@dataclass
class Enrichment:
    """The stream's ``repeats`` (``dataset.Repeats``): each epoch row i of shard s enters the
    shuffle buffer floor(r) or ceil(r) times, ceil with probability r - floor(r), drawn from
    (seed, epoch, s, i); r = 1/(2f) for the cluster's rows and 1/(2(1 - f)) for the others."""

    members: list[np.ndarray]  # per shard, in the stream's order
    seed: int
    _memo: tuple[int, dict[int, np.ndarray]] = field(default_factory=lambda: (-1, {}), repr=False)  # one epoch's counts

    def __post_init__(self) -> None:
        self.samples = sum(len(m) for m in self.members)
        self.cluster_samples = sum(int(m.sum()) for m in self.members)
        if not 0 < self.cluster_samples < self.samples:
            raise ValueError("a cluster fraction in (0, 1) is needed")
        self.fraction = self.cluster_samples / self.samples
        self.rates = (1 / (2 * (1 - self.fraction)), 1 / (2 * self.fraction))  # (the others', the cluster's)

    def counts(self, shard: int, epoch: int) -> np.ndarray:
        memo_epoch, memo = self._memo
        if memo_epoch != epoch:
            memo = {}
            self._memo = (epoch, memo)
        if shard not in memo:
            rate = np.where(self.members[shard], self.rates[1], self.rates[0])
            whole = np.floor(rate)
            draws = np.random.default_rng([self.seed, epoch, shard, REPEAT_SALT]).random(len(rate))
            memo[shard] = (whole + (draws < rate - whole)).astype(np.int32)
        return memo[shard]


@dataclass(frozen=True)
class PooledTargets:
    """The stream's ``transform`` for a dustbin head: the layout's target fields become
    ``logits`` [B, K+1] = T·log(pooled p) (a floor of float32's tiny for a zero), p =
    softmax(decoded / T) over the C classes; the labels are mapped to the head's outputs."""

    cluster: Cluster
    layout: TargetLayout  # one view's (CacheMeta.target_layout)
    temperature: float

    def probabilities(self, targets: Mapping[str, np.ndarray]) -> np.ndarray:
        """[B, K+1] float64: the cluster's classes' probabilities and the sum of the others'."""
        p = softmax(self.layout.decode(targets), self.temperature)
        return np.concatenate([p[:, list(self.cluster.classes)], p[:, self.cluster.others()].sum(axis=1, keepdims=True)], axis=1)

    def __call__(self, columns: Columns) -> Columns:
        targets = {name: columns.pop(name) for name in self.layout.fields(self.cluster.classes_total)}
        pooled = self.probabilities(targets)
        columns["logits"] = (self.temperature * np.log(np.maximum(pooled, _TINY))).astype(np.float32)
        columns["labels"] = self.cluster.map_labels(columns["labels"])
        return columns


# ---------------------------------------------------------------------------------------------
# The start: a generalist's weights, with a dustbin head


def classifier(model: nn.Module, num_classes: int) -> str:
    """The name of the classifier: the last nn.Linear with ``num_classes`` outputs."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.out_features == num_classes]
    if not names:
        raise SpecialistError(
            f"--init: its model has no classifier (an nn.Linear with {num_classes} outputs) to give a dustbin; use --specialist-head full"
        )
    return names[-1]


def dustbin_state(generalist: nn.Module, cluster: Cluster) -> dict[str, torch.Tensor]:
    """The generalist's weights for a dustbin head: the classifier's rows of the cluster's
    classes, then a dustbin row, the mean of the other rows, with bias the others' mean + log(C - K)."""
    name = classifier(generalist, cluster.classes_total)
    state = dict(generalist.state_dict())
    classes, others = list(cluster.classes), cluster.others()
    weight = state[f"{name}.weight"]
    state[f"{name}.weight"] = torch.cat([weight[classes], weight[others].mean(dim=0, keepdim=True)])
    if f"{name}.bias" in state:
        bias = state[f"{name}.bias"]
        state[f"{name}.bias"] = torch.cat([bias[classes], (bias[others].mean() + math.log(len(others))).reshape(1)])
    return state


def initial_state(generalist: nn.Module, cluster: Cluster | None) -> dict[str, torch.Tensor]:
    """The weights a student starts from: the generalist's, with a dustbin head's classifier."""
    if cluster is not None and cluster.head == "dustbin":
        return dustbin_state(generalist, cluster)
    return dict(generalist.state_dict())


# ---------------------------------------------------------------------------------------------
# What a run changes


@dataclass
class Start:
    """What ``--specialist`` and ``--init`` change in a run: the student (arch, where it is
    trusted from, the weights it starts from), the meta it trains against (K + 1 classes and
    full targets for a dustbin head), and the stream's hooks."""

    arch: str
    origin: Origin
    meta: CacheMeta
    cluster: Cluster | None = None
    enrichment: Enrichment | None = None
    transform: PooledTargets | None = None
    init_path: str | None = None
    init_state: dict[str, torch.Tensor] | None = None

    def build_student(self) -> nn.Module:
        try:
            student = models.build(self.arch, self.meta.input_shape, self.meta.num_classes, self.origin)
        except models.ModelSpecError as exc:
            raise SpecialistError(str(exc)) from None
        if self.init_state is not None:
            try:
                student.load_state_dict(self.init_state)
            except RuntimeError as exc:
                raise SpecialistError(f"--init {self.init_path}: its weights do not fit the specialist ({describe_error(exc)})") from None
        return student

    @property
    def prior_shift(self) -> float:
        """log((1 - f) / f): what the enriched batches took from the logits of the classes outside
        the cluster (dustbin or others) relative to the cluster's; 0 without enrichment."""
        if self.enrichment is None:
            return 0.0
        f = self.enrichment.fraction
        return math.log((1 - f) / f)

    @torch.no_grad()
    def correct_prior(self, student: nn.Module) -> str | None:
        """Undo the enrichment's prior shift, as Hinton et al. (section 5) do: the batches held the
        cluster's samples at 1/(2f) times their share and the others at 1/(2(1 - f)), so the
        trained head over-predicts whichever side was oversampled by exactly that ratio. Adding
        ``prior_shift`` to the bias of the outputs outside the cluster (the dustbin, or the other
        classes of a full head) makes the specialist's probabilities those of the cache's mix
        again. Returns the line to log, or None when there is nothing to correct."""
        if self.cluster is None or self.enrichment is None:
            return None
        layer = student.get_submodule(classifier(student, self.cluster.width))
        if layer.bias is None:
            return f"warning: the specialist's classifier has no bias; its enriched prior (log odds {self.prior_shift:+.3f}) is left uncorrected"
        outside = [self.cluster.width - 1] if self.cluster.head == "dustbin" else self.cluster.others()
        layer.bias[outside] += self.prior_shift
        return f"prior: added {self.prior_shift:+.3f} = log((1 - f) / f) to the bias of the outputs outside the cluster, undoing the enrichment"

    def eval_set(self, eval_set: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval set with its labels as the head numbers them."""
        inputs, labels = eval_set
        return (inputs, labels) if self.cluster is None else (inputs, torch.from_numpy(self.cluster.map_labels(labels.numpy())))

    def record(self) -> dict[str, Any] | None:
        """student.pt's ``specialist``."""
        return None if self.cluster is None else {**self.cluster.record(), "prior_shift": self.prior_shift}

    def summary(self) -> dict[str, Any]:
        """What metrics.json adds: the cluster (with its fraction) and the --init file."""
        specialist = None
        if self.cluster is not None and self.enrichment is not None:
            e = self.enrichment
            specialist = {
                **self.cluster.record(), "cluster_fraction": e.fraction, "cluster_samples": e.cluster_samples, "samples": e.samples,
                "mean_repeats": {"cluster": e.rates[1], "others": e.rates[0]}, "prior_shift": self.prior_shift,
            }  # fmt: skip
        return {"specialist": specialist, "init": self.init_path}

    def describe(self, label_names: Sequence[str] | None) -> list[str]:
        """The log lines: what the specialist trains on, and what it starts from."""
        lines = []
        c, e = self.cluster, self.enrichment
        if c is not None and e is not None:
            named = ", ".join(
                f"{k} ({label_names[k]})" if label_names is not None and k < len(label_names) else str(k) for k in c.classes[:SHOWN_CLASSES]
            ) + (f", … ({len(c.classes)} in all)" if len(c.classes) > SHOWN_CLASSES else "")
            others = c.classes_total - len(c.classes)
            head = (
                f"head dustbin ({c.width} outputs: these and one for the other {others})"
                if c.head == "dustbin"
                else f"head full ({c.width} outputs)"
            )
            lines.append(
                f"specialist: classes {named} of {c.classes_total}; {head}; cluster fraction f={e.fraction:.3f} "
                f"({e.cluster_samples:,} of {e.samples:,} samples, by label or else the teacher's top class); batches enriched to about "
                f"half the cluster's: each of its samples {e.rates[1]:.2f}x per epoch on average, each other {e.rates[0]:.2f}x"
            )
        if self.init_path is not None:
            what = "every weight"
            if c is not None and c.head == "dustbin":
                what += f"; the classifier's rows of the cluster's classes, and a dustbin row from the mean of the other {c.classes_total - len(c.classes)}"
            lines.append(f"init: from {self.init_path} ({self.arch}): {what}")
        return [printable(line) for line in lines]


def prepare(cfg: TrainConfig, readers: Sequence[CacheReader], meta: CacheMeta) -> Start:
    """What ``cfg.specialist`` and ``cfg.init`` change, checked, before anything is written.
    ``cfg`` has its temperature settled (``TrainConfig.for_caches``)."""
    record = read_init(cfg.init, meta) if cfg.init else None
    arch, origin = settle_arch(cfg.student, record, cfg.init, cfg.trust_code)
    start = Start(arch, origin, meta, init_path=cfg.init)
    if cfg.specialist is not None:
        cluster = read_cluster(cfg.specialist, cfg.specialist_head, meta.num_classes)
        if cluster.head == "dustbin" and cfg.loss != "kl":
            raise SpecialistError(
                f"--loss {cfg.loss} matches the teacher's logits, and a dustbin head trains on pooled probabilities; use --loss kl"
            )
        shards = [s for r in readers for s in r.shards]  # in the stream's order
        members = membership(
            shards, meta, cluster, label_fraction=cfg.label_fraction, label_seed=cfg.label_seed, skip_corrupt=cfg.skip_corrupt
        )
        inside, total = sum(int(m.sum()) for m in members), sum(len(m) for m in members)
        if inside in (0, total):
            raise SpecialistError(
                f"--specialist {cfg.specialist}: {'no' if inside == 0 else 'every'} sample of the cache belongs to the cluster "
                f"(by its label, or else the teacher's top class); a specialist needs samples both in and outside it"
            )
        start = replace(start, cluster=cluster, enrichment=Enrichment(members, cfg.seed))
        if cluster.head == "dustbin":
            assert cfg.temperature is not None, "for_caches settles it"
            start.transform = PooledTargets(cluster, meta.target_layout, cfg.temperature)
            start.meta = replace(meta, num_classes=cluster.width, logits_layout="full", logits_dtype="float32")
    if record is not None:
        assert cfg.init is not None
        start.init_state = initial_state(load_generalist(cfg.init, record, arch, origin, meta), start.cluster)
    return start


__all__ = [
    "Cluster", "DEFAULT_HEAD", "Enrichment", "HEADS", "PooledTargets", "SpecialistError", "Start", "classifier", "dustbin_state",
    "membership", "prepare", "read_cluster", "top_classes",
]  # fmt: skip
