"""The specialists' combination (Hinton et al. 2015, section 5): the served q is a stationary
point of KL(p^g || q) + sum over the active specialists m of KL(p^m || q_m), with q_m the mass
of q on m's classes and on its dustbin (the rest).

The objective and its gradient are written here independently of ``service.ensemble`` (autograd
on the formula), and the check fails on plausible wrong combinations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcache.service.ensemble import CombinerError, Specialists, solve_specialists, specialist_log_probs

TOLERANCE = 1e-9  # on |dF/dz| for q's logits z, in float64; F is O(1 + active specialists)
CLUSTERS = ((0, 1, 2), (3, 4), (7, 8, 9))  # classes 5 and 6 in no cluster
C = 10


def objective(z: torch.Tensor, log_pg: torch.Tensor, specialists: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Sum over the batch of KL(p^g || q) + sum_m [active] KL(p^m || q_m); ``specialists``: each
    cluster with its log-probabilities [B, K+1] (dustbin last) and its active mask [B]."""
    log_q = torch.log_softmax(z, dim=-1)
    total = (log_pg.exp() * (log_pg - log_q)).sum()
    for cluster, log_pm, active in specialists:
        inside = log_q[:, list(cluster)]
        outside = log_q[:, [c for c in range(z.shape[1]) if c not in cluster]].logsumexp(dim=-1, keepdim=True)
        log_qm = torch.cat([inside, outside], dim=-1)
        total = total + ((log_pm.exp() * (log_pm - log_qm)).sum(dim=-1) * active).sum()
    return total


def gradient(log_q: torch.Tensor, log_pg: torch.Tensor, specialists: list) -> torch.Tensor:
    z = log_q.detach().clone().requires_grad_(True)
    objective(z, log_pg, specialists).backward()
    return z.grad


def random_problem(batch: int, seed: int, scale: float = 3.0, active_rate: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    log_pg = torch.log_softmax(torch.randn(batch, C, generator=g, dtype=torch.float64) * scale, dim=-1)
    specialists = []
    for cluster in CLUSTERS:
        log_pm = torch.log_softmax(torch.randn(batch, len(cluster) + 1, generator=g, dtype=torch.float64) * scale, dim=-1)
        active = (torch.rand(batch, generator=g) < active_rate).double()
        specialists.append((cluster, log_pm, active))
    return log_pg, specialists


def solver_inputs(log_pg: torch.Tensor, specialists: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log a, the dustbins and the groups, as ``Specialists.forward`` builds them."""
    log_a = log_pg.clone()
    dustbin = torch.zeros(len(log_pg), len(specialists), dtype=torch.float64)
    group = torch.full((C,), len(specialists), dtype=torch.long)
    for m, (cluster, log_pm, active) in enumerate(specialists):
        group[list(cluster)] = m
        rows = active.bool()
        log_a[rows.nonzero()[:, 0][:, None], torch.tensor(cluster)] = torch.logaddexp(log_a[rows][:, list(cluster)], log_pm[rows][:, :-1])
        dustbin[rows, m] = log_pm[rows][:, -1].exp()
    return log_a, dustbin, group


@pytest.mark.parametrize("seed, scale, active_rate", [(0, 1.0, 0.5), (1, 3.0, 0.5), (2, 8.0, 0.7), (3, 3.0, 1.0), (4, 3.0, 0.0)])
def test_the_solution_is_a_stationary_point(seed: int, scale: float, active_rate: float) -> None:
    log_pg, specialists = random_problem(256, seed, scale, active_rate)
    log_q = solve_specialists(*solver_inputs(log_pg, specialists))
    assert torch.allclose(log_q.exp().sum(dim=-1), torch.ones(len(log_q), dtype=torch.float64), atol=1e-12)
    assert gradient(log_q, log_pg, specialists).abs().max() < TOLERANCE


def test_wrong_combinations_fail_the_check() -> None:
    """The check can fail: the normalised a (generalist plus specialists, no dustbin term), the
    geometric mean of the generalist with the specialists, and the generalist alone are all
    far from stationary."""
    log_pg, specialists = random_problem(256, 5, 3.0, 0.8)
    log_a, dustbin, group = solver_inputs(log_pg, specialists)
    normalised = log_a - log_a.logsumexp(dim=-1, keepdim=True)
    no_dustbin = solve_specialists(log_a, torch.zeros_like(dustbin), group)
    for wrong in (normalised, no_dustbin, log_pg):
        assert gradient(wrong, log_pg, specialists).abs().max() > 1e-3


def test_a_specialist_that_agrees_with_the_generalist_changes_nothing() -> None:
    """When p^m is the generalist's own distribution pooled to m's classes and dustbin, q = p^g
    sets every KL term to 0."""
    log_pg, _ = random_problem(64, 6)
    cluster = CLUSTERS[0]
    rest = [c for c in range(C) if c not in cluster]
    log_pm = torch.cat([log_pg[:, list(cluster)], log_pg[:, rest].logsumexp(dim=-1, keepdim=True)], dim=-1)
    specialists = [(cluster, log_pm, torch.ones(64, dtype=torch.float64))]
    log_q = solve_specialists(*solver_inputs(log_pg, specialists))
    assert torch.allclose(log_q, log_pg, atol=1e-10)


class Fixed(nn.Module):
    """A member that maps inputs [B, D] to logits by a fixed random matrix and counts the samples it sees."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, width, generator=torch.Generator().manual_seed(seed)) * 3)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return x @ self.weight


@pytest.mark.parametrize("top_n", [1, 2])
def test_the_combiner_serves_a_stationary_point_and_runs_specialists_only_where_active(top_n: int) -> None:
    """top_n 1 takes the closed form (one active specialist at most), top_n 2 the search."""
    temperature = 2.0
    generalist = Fixed(C, 0)
    members = [generalist, Fixed(len(CLUSTERS[0]) + 1, 1), Fixed(C, 2), Fixed(len(CLUSTERS[2]) + 1, 3)]  # dustbin, full, dustbin heads
    combiner = Specialists(CLUSTERS, temperature, top_n=top_n)
    assert combiner.classes(["g", "s0", "s1", "s2"], [C, 4, C, 4]) == C
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(9))
    v = combiner.forward(lambda i, inputs: members[i](inputs), len(members), x).double()
    log_q = v / temperature

    with torch.no_grad():
        z_g = generalist(x)
        log_pg = torch.log_softmax(z_g.double() / temperature, dim=-1)
        top = z_g.topk(top_n, dim=-1).indices
        specialists = []
        for m, cluster in enumerate(CLUSTERS):
            active = torch.isin(top, torch.tensor(cluster)).any(dim=-1)
            log_pm = specialist_log_probs(members[m + 1](x), torch.tensor(cluster), temperature, combiner.heads[m])
            specialists.append((cluster, log_pm, active.double()))
            assert members[m + 1].seen - len(x) == int(active.sum())  # the forward ran it on the active rows only
    # float32 storage of v = T log q: the gradient is then as small as that rounding allows.
    assert gradient(log_q, log_pg, specialists).abs().max() < 1e-5
    assert combiner.specialist_runs == sum(int(a.sum()) for _, _, a in specialists)


@pytest.mark.parametrize(
    "clusters, widths, message",
    [
        (((0, 1), (1, 2)), [C, 3, 3], "overlapping clusters: class 1"),
        (((0, 10),), [C, 3], "class 10, outside [0, 10)"),
        (((0, 1),), [C, 5], "the head does not match the cluster"),
        ((tuple(range(C)),), [C, C + 1], "holds all 10 classes"),
    ],
)
def test_bad_specialists_are_refused(clusters: tuple, widths: list[int], message: str) -> None:
    with pytest.raises(CombinerError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Specialists(clusters, 1.0).classes(["g", *(f"s{i}" for i in range(len(clusters)))], widths)


def test_a_full_head_on_all_but_one_class_is_read_as_full_not_as_a_dustbin() -> None:
    """K + 1 = C outputs fit both heads: the recorded head decides (here full: output j is class
    j, and the dustbin is class 9's probability); unrecorded, the width cannot tell and is refused."""
    cluster = tuple(c for c in range(C) if c != 6)  # 9 classes: a dustbin head would also be 10 wide
    generalist, specialist = Fixed(C, 0), Fixed(C, 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(CombinerError, match="fit both a dustbin head"):
        Specialists((cluster,), 1.0).classes(["g", "s"], [C, C])
    combiner = Specialists((cluster,), 1.0, heads=["full"])
    combiner.classes(["g", "s"], [C, C])
    members = [generalist, specialist]
    log_q = combiner.forward(lambda i, inputs: members[i](inputs), 2, x).double()
    with torch.no_grad():
        log_pg = torch.log_softmax(generalist(x).double(), dim=-1)
        log_pm = torch.log_softmax(specialist(x).double(), dim=-1)
    pooled = torch.cat([log_pm[:, list(cluster)], log_pm[:, [6]]], dim=-1)  # class j's own output, and class 6 as the dustbin
    active = torch.isin(generalist(x).argmax(-1), torch.tensor(cluster)).double()
    assert gradient(log_q, log_pg, [(cluster, pooled, active)]).abs().max() < 1e-5
