"""How a teacher's members' logits become the one logit vector per sample that the cache stores.

offline-distill later turns a stored vector ``v`` into soft targets ``softmax(v / T)`` at a
temperature T of its own choosing. A ``Combiner`` owns the combination, the teacher fingerprint
it implies, and its temperature rule, which the cache records (``CacheMeta.temperature_rule``):

* ``SingleMember``: the member's raw logits ``z``. Rule "any".
* ``GeometricMean`` (the default ensemble): the mean of the members' logits, ``v = (1/M) Σ z_i``.
  Then ``softmax(v / T) ∝ Π softmax(z_i / T) ** (1/M)`` for EVERY T: the normalised geometric
  mean of the members' soft targets, at whatever temperature the student is trained. The stored
  values do not depend on the serving temperature, so neither does the fingerprint. Rule "any".
* ``ArithmeticMean``: ``v = T_s · log((1/M) Σ softmax(z_i / T_s))`` with T_s the serving
  temperature, computed stably as ``logsumexp_i(log_softmax(z_i / T_s)) - log M``. Then
  ``softmax(v / T_s)`` is exactly the mean of the members' probabilities (Hinton et al.'s ensemble
  average), but only at T = T_s: at any other T it is that mixture sharpened or flattened, not
  the mixture of the members' distributions at T. A mean of probabilities has no logit vector
  that is right at every temperature, so the serving temperature is part of what is stored: it
  enters the fingerprint, and the student should be distilled at T = T_s. Rule "serving": the
  service refuses other temperatures, and the trainer warns.
* ``Specialists`` (Hinton et al. 2015, section 5): a generalist and specialists, each trained on
  one cluster of confusable classes with the other classes merged into a dustbin
  (``offline-distill --specialist``). Only the specialists whose cluster meets the generalist's
  top n classes run on a sample; ``solve_specialists`` finds the q that minimises
  KL(p^g || q) + sum over the active m of KL(p^m || q restricted to m's cluster and dustbin), all
  at T_s, and v = T_s log q is stored. Like the arithmetic mean, exact only at T_s: rule "serving".

A combiner runs the members itself (``forward``): the means run every member on every sample,
the specialists only where they are active.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

ENSEMBLE_MODES = ("geometric", "arithmetic", "specialists")

# run(i, x): member i's logits [len(x), width_i] on the preprocessed inputs x.
RunMember = Callable[[int, torch.Tensor], torch.Tensor]


class CombinerError(ValueError):
    """Members that this combiner cannot combine; one line naming the member and what was expected."""


class Combiner(ABC):
    """The members' logits → the stored logits, with the fingerprint and temperature rule that go with it."""

    ensemble: ClassVar[str | None]  # the --ensemble mode, None for a single member
    temperature_rule: ClassVar[str]  # "any" or "serving", as CacheMeta.temperature_rule

    @abstractmethod
    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """One ``[B, C]`` tensor per member, in any float dtype → float32 ``[B, C]``."""

    def forward(self, run: RunMember, members: int, x: torch.Tensor) -> torch.Tensor:
        """The stored logits for inputs ``x``: every member on every sample, combined."""
        return self.combine([run(i, x) for i in range(members)])

    def classes(self, specs: Sequence[str], widths: Sequence[int]) -> int:
        """The classes this teacher serves, from each member's output width; CombinerError when
        the members cannot be combined (here: unless they all predict the same classes)."""
        for spec, width in zip(specs[1:], widths[1:], strict=True):
            if width != widths[0]:
                raise CombinerError(
                    f"{spec}: returns {width} classes, but {specs[0]} returns {widths[0]}; all members of an ensemble must predict the same classes"
                )
        return widths[0]

    def fingerprint(self, member_fingerprints: Sequence[str]) -> str:
        """Order-independent: the same members in another order are the same teacher."""
        digest = hashlib.sha256(f"ensemble-{self.ensemble}".encode())
        digest.update(self._fingerprint_salt())
        for fingerprint in sorted(member_fingerprints):
            digest.update(fingerprint.encode())
        return digest.hexdigest()

    def _fingerprint_salt(self) -> bytes:
        """What the stored values depend on besides the members."""
        return b""

    def name(self, member_names: Sequence[str]) -> str:
        return f"ensemble-{self.ensemble}({','.join(member_names)})"


class SingleMember(Combiner):
    ensemble = None
    temperature_rule = "any"

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        (only,) = logits
        return only.float()

    def fingerprint(self, member_fingerprints: Sequence[str]) -> str:
        (only,) = member_fingerprints
        return only

    def name(self, member_names: Sequence[str]) -> str:
        (only,) = member_names
        return only


class GeometricMean(Combiner):
    ensemble = "geometric"
    temperature_rule = "any"

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([z.float() for z in logits]).mean(dim=0)  # float32 whatever the autocast dtype


class ArithmeticMean(Combiner):
    ensemble = "arithmetic"
    temperature_rule = "serving"

    def __init__(self, serving_temperature: float) -> None:
        self.serving_temperature = float(serving_temperature)

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        t = self.serving_temperature
        log_probs = torch.log_softmax(torch.stack([z.float() for z in logits]) / t, dim=-1)  # [M, B, C]
        return t * (torch.logsumexp(log_probs, dim=0) - math.log(len(logits)))

    def _fingerprint_salt(self) -> bytes:
        return f"temperature={self.serving_temperature!r}".encode()


# ---------------------------------------------------------------------------------------------
# Specialists (Hinton et al. 2015, section 5)

DEFAULT_TOP_N = 1
LOG_FLOOR = -700.0  # log-probabilities below this (e^-700 ~ 1e-304) are taken as this: stored logits stay finite
NEWTON_STEPS = 100  # at most; 0 to 6 in practice
CONVERGED = 1e-13  # |sum_g M_g - 1| at which the search stops


def specialist_log_probs(z: torch.Tensor, classes: torch.Tensor, temperature: float, head: str = "dustbin") -> torch.Tensor:
    """A specialist's logits [b, K+1] (``dustbin`` head) or [b, C] (``full`` head) → its
    log-probabilities over its K classes and the dustbin, [b, K+1] float64, at ``temperature``."""
    log_p = torch.log_softmax(z.double() / temperature, dim=-1)
    if head == "dustbin":
        return log_p
    outside = log_p.index_fill(-1, classes, float("-inf")).logsumexp(dim=-1, keepdim=True)
    return torch.cat([log_p.index_select(-1, classes), outside], dim=-1)


def solve_specialists(log_a: torch.Tensor, dustbin: torch.Tensor, group: torch.Tensor, newton: bool = True) -> torch.Tensor:
    """log q [B, C] for the q that minimises KL(p^g || q) + sum_m KL(p^m || q_m) over the simplex,
    where q_m is q over cluster m's classes and its dustbin (q's mass outside the cluster).

    Arguments, float64: ``log_a`` [B, C], log of a_c = p^g_c + p^m_c for the active specialist m
    whose cluster holds c (p^g_c alone for a class no active specialist holds); ``dustbin`` [B, M],
    each specialist's dustbin probability (0 where it is not active); ``group`` [C], the cluster
    of each class (0..M-1) or M for a class in no cluster. Clusters are disjoint.

    The objective is -sum_c a_c log q_c - sum_m d_m log(1 - Q_m) plus a constant, Q_m the mass of
    q on cluster m. At its stationary points q_c / a_c is the same within a group (a cluster, or
    the classes in no cluster), so only the group masses M_g are unknown. With a multiplier L for
    sum_g M_g = 1 they solve A_g / M_g - d_g / (1 - M_g) = L (A_g = sum of a over the group,
    d_g = 0 for the classes in no cluster and for an inactive cluster), whose root in (0, 1] is
    M_g(L) = 2 A_g / (b + sqrt(b^2 - 4 L A_g)), b = L + A_g + d_g, non-increasing in L (the
    discriminant is computed as (L - A_g + d_g)^2 + 4 A_g d_g). The
    problem is convex, so the L with sum_g M_g(L) = 1 gives the minimum. With at most one active
    specialist (always so for ``--specialist-top-n 1``) that L has a closed form,
    L = A_0 W / (A_0 + d) with A_0 the mass of the groups without a dustbin and W = sum A + d,
    and it is where the search starts: Newton's method on L, kept inside a bracket that always
    holds the root, [-(sum d) - 1, sum A], by bisecting whenever a step leaves it. ``newton``
    False skips the search, for a caller that knows at most one specialist is active per row
    (and saves its device-to-host sync)."""
    batch, groups = len(log_a), dustbin.shape[1] + 1
    log_a = log_a.clamp(min=LOG_FLOOR)
    a = log_a.exp()
    mass = torch.zeros(batch, groups, dtype=a.dtype, device=a.device).index_add_(1, group, a)  # A_g
    d = torch.cat([dustbin, torch.zeros(batch, 1, dtype=a.dtype, device=a.device)], dim=1)
    lo, hi = -d.sum(dim=1) - 1, mass.sum(dim=1)
    free = torch.where(d > 0, torch.zeros_like(mass), mass).sum(dim=1)  # A_0
    lam = (free * (hi + d.sum(dim=1)) / (free + d.sum(dim=1)).clamp(min=1e-300)).clamp(lo, hi)
    masses, _ = _group_masses(lam, mass, d)
    for _ in range(NEWTON_STEPS if newton else 0):
        masses, slope = _group_masses(lam, mass, d)
        excess = masses.sum(dim=1) - 1
        done = excess.abs() <= CONVERGED
        if bool(done.all()):
            break
        lo, hi = torch.where(excess > 0, lam, lo), torch.where(excess > 0, hi, lam)
        step = lam - excess / slope.sum(dim=1).clamp(max=-1e-300)
        lam = torch.where(done, lam, torch.where((step >= lo) & (step <= hi), step, (lo + hi) / 2))
    masses = masses / masses.sum(dim=1, keepdim=True)
    log_scale = masses.clamp(min=1e-300).log() - mass.clamp(min=1e-300).log()  # log(M_g / A_g)
    return log_a + log_scale.index_select(1, group)


def _group_masses(lam: torch.Tensor, mass: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M_g(L) for every group, and dM_g/dL = -1 / (A_g / M_g^2 + d_g / (1 - M_g)^2) (0 where M_g is 0 or 1)."""
    b = lam[:, None] + mass + d
    discriminant = (lam[:, None] - mass + d) ** 2 + 4 * mass * d  # = b^2 - 4 L A_g, without the cancellation
    root = 2 * mass / (b + discriminant.sqrt())
    masses = torch.where(mass > 0, root, torch.zeros_like(root))
    inside = (masses > 0) & (masses < 1)
    m = masses.clamp(1e-300, 1 - 1e-16)
    slope = torch.where(inside, -1 / (mass / (m * m) + d / ((1 - m) * (1 - m))), torch.zeros_like(m))
    return masses, slope


class Specialists(Combiner):
    """Member 0 is the generalist; member i > 0 a specialist on ``clusters[i - 1]``, with a
    dustbin head (K + 1 outputs) or a full one (C outputs). For each sample the specialists
    whose cluster holds one of the generalist's ``top_n`` most probable classes run (on those
    samples only), and ``solve_specialists`` combines them with the generalist at T_s."""

    ensemble = "specialists"
    temperature_rule = "serving"

    def __init__(
        self, clusters: Sequence[Sequence[int]], serving_temperature: float, top_n: int = DEFAULT_TOP_N, heads: Sequence[str | None] = ()
    ) -> None:
        if not clusters:
            raise CombinerError("--ensemble specialists needs a generalist (the first --teacher) and at least one specialist")
        if top_n < 1:
            raise CombinerError(f"--specialist-top-n must be at least 1, got {top_n}")
        self.clusters = tuple(tuple(int(c) for c in cluster) for cluster in clusters)
        self.heads: list[str | None] = list(heads) or [None] * len(self.clusters)  # None: told by the width, in classes()
        self.serving_temperature = float(serving_temperature)
        self.top_n = int(top_n)
        self.num_classes: int | None = None
        self._on_device: tuple[torch.device, torch.Tensor, list[torch.Tensor]] | None = None
        self.samples = 0  # samples combined, and specialist runs on them: the mean active set is their ratio
        self.specialist_runs = 0

    def classes(self, specs: Sequence[str], widths: Sequence[int]) -> int:
        """C from the generalist; each specialist's cluster within [0, C), leaving classes outside
        it, disjoint from the others, and its head K + 1 (dustbin) or C (full) wide."""
        num_classes = widths[0]
        owner: dict[int, int] = {}
        for i, (spec, cluster, width) in enumerate(zip(specs[1:], self.clusters, widths[1:], strict=True), start=1):
            outside = [c for c in cluster if not 0 <= c < num_classes]
            if outside:
                raise CombinerError(
                    f"{spec}: its cluster holds class {outside[0]}, outside [0, {num_classes}) of the generalist {specs[0]}"
                )
            if len(set(cluster)) >= num_classes:
                raise CombinerError(f"{spec}: its cluster holds all {num_classes} classes; a specialist's cluster must leave some out")
            self.heads[i - 1] = self._head(spec, cluster, width, num_classes, self.heads[i - 1])
            for c in cluster:
                holder = owner.setdefault(c, i)
                if holder != i:
                    raise CombinerError(
                        f"overlapping clusters: class {c} is in the clusters of both {specs[holder]} and {spec}; clusters must be disjoint"
                    )
        self.num_classes = num_classes
        return num_classes

    @staticmethod
    def _head(spec: str, cluster: Sequence[int], width: int, num_classes: int, head: str | None) -> str:
        """A specialist's head: as its student.pt records it (checked against its width), else
        told by its width, K + 1 (dustbin) or C (full), which cannot tell them apart when K + 1 = C."""
        widths = {"dustbin": len(cluster) + 1, "full": num_classes}
        if head is None and widths["dustbin"] == widths["full"] == width:
            raise CombinerError(
                f"{spec}: its {width} outputs fit both a dustbin head on {len(cluster)} classes and the full softmax; "
                "serve its student.pt, which records the head"
            )
        fits = [name for name, expected in widths.items() if expected == width]
        if (head is not None and head not in fits) or not fits:
            expected = (
                f"{widths[head]} for its {head} head"
                if head in widths
                else f"{widths['dustbin']} (the cluster and a dustbin) or {num_classes} (the full softmax)"
            )
            raise CombinerError(
                f"{spec}: returns {width} logits, but its cluster has {len(cluster)} classes: expected {expected}; "
                "the head does not match the cluster"
            )
        return head or fits[0]

    def combine(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("specialists run only where they are active: use forward")

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The group of each class and each cluster's classes, on ``device``, made once."""
        if self._on_device is None or self._on_device[0] != device:
            group = torch.full((self.num_classes or 0,), len(self.clusters), dtype=torch.long)
            for m, cluster in enumerate(self.clusters):
                group[list(cluster)] = m
            classes = [torch.tensor(cluster, dtype=torch.long, device=device) for cluster in self.clusters]
            self._on_device = (device, group.to(device), classes)
        return self._on_device[1], self._on_device[2]

    def forward(self, run: RunMember, members: int, x: torch.Tensor) -> torch.Tensor:
        assert self.num_classes is not None, "classes() runs first, on the probe's widths"
        t, group_of, cluster_classes = self.serving_temperature, *self._indices(x.device)
        z = run(0, x)
        log_a = torch.log_softmax(z.double() / t, dim=-1)
        top = z.topk(min(self.top_n, self.num_classes), dim=-1).indices
        active = torch.nn.functional.one_hot(group_of[top], len(self.clusters) + 1)[..., :-1].any(dim=1)  # [B, M]
        pairs = active.t().nonzero()  # (specialist, row), by specialist: one device-to-host sync for them all
        counts = active.sum(dim=0).tolist()
        dustbin = torch.zeros(len(x), len(self.clusters), dtype=torch.float64, device=x.device)
        for m, rows in enumerate(pairs[:, 1].split(counts)):
            if len(rows) == 0:
                continue
            classes = cluster_classes[m]
            log_p = specialist_log_probs(run(m + 1, x.index_select(0, rows)), classes, t, self.heads[m] or "dustbin")
            index = (rows[:, None], classes)
            log_a[index] = torch.logaddexp(log_a[index], log_p[:, :-1])
            dustbin[rows, m] = log_p[:, -1].exp()
        self.samples += len(x)
        self.specialist_runs += sum(counts)
        # With one specialist active at most (top_n 1: the top class is in one cluster or none), the multiplier's closed form is exact.
        return (t * solve_specialists(log_a, dustbin, group_of, newton=self.top_n > 1)).float()

    def name(self, member_names: Sequence[str]) -> str:
        specialists = (f"{name}[{','.join(map(str, cluster))}]" for name, cluster in zip(member_names[1:], self.clusters, strict=True))
        return f"ensemble-specialists({','.join([member_names[0], *specialists])})"

    def fingerprint(self, member_fingerprints: Sequence[str]) -> str:
        """The generalist, each specialist with its cluster (in any order), T_s and top_n."""
        digest = hashlib.sha256(f"ensemble-specialists;temperature={self.serving_temperature!r};top_n={self.top_n}".encode())
        digest.update(member_fingerprints[0].encode())
        for cluster, fingerprint in sorted(zip(self.clusters, member_fingerprints[1:], strict=True)):
            digest.update(f";{','.join(map(str, cluster))}={fingerprint}".encode())
        return digest.hexdigest()


def combiner_for(
    members: int,
    ensemble: str,
    serving_temperature: float,
    clusters: Sequence[Sequence[int] | None] = (),
    top_n: int = DEFAULT_TOP_N,
    heads: Sequence[str | None] = (),
) -> Combiner:
    """The combiner for ``members`` models under the ``--ensemble`` mode (ignored for one).
    ``clusters``: each member's cluster (None for one that is not a specialist), for
    ``specialists``, where member 0 is the generalist and every other member a specialist."""
    if ensemble == "specialists":
        clusters = list(clusters) or [None] * members
        heads = list(heads) or [None] * members
        return Specialists([c for c in clusters[1:] if c is not None], serving_temperature, top_n, heads[1:])
    if members == 1:
        return SingleMember()
    if ensemble == "geometric":
        return GeometricMean()
    if ensemble == "arithmetic":
        return ArithmeticMean(serving_temperature)
    raise ValueError(f"ensemble {ensemble!r}: expected one of {', '.join(ENSEMBLE_MODES)}")
