"""The distillation loss against the equations of Hinton, Vinyals and Dean (2015)."""

import pytest
import torch
import torch.nn.functional as F

from kdcache.offline.losses import distillation_loss

N = 10


def grad_of_soft_term(z: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    loss = distillation_loss(z, v, torch.tensor([-1]), temperature, alpha=1.0)
    loss.backward()
    return z.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_eq2_gradient_is_T_times_q_minus_p(temperature):
    """Eq. 2: dC/dz_i = (q_i - p_i) / T; with the T**2 factor that is T * (q_i - p_i)."""
    torch.manual_seed(0)
    z, v = torch.randn(1, N, dtype=torch.float64) * 3, torch.randn(1, N, dtype=torch.float64) * 3
    q = F.softmax(z / temperature, -1)  # student
    p = F.softmax(v / temperature, -1)  # teacher
    grad = grad_of_soft_term(z, v, temperature)
    torch.testing.assert_close(grad, temperature * (q - p), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad / temperature**2, (q - p) / temperature, rtol=1e-10, atol=1e-12)


def test_eq4_high_temperature_limit_is_logit_matching():
    """Eq. 4: at high T with zero-mean logits, dC/dz_i -> (z_i - v_i) / (N T**2)."""
    torch.manual_seed(1)
    z, v = torch.randn(1, N, dtype=torch.float64), torch.randn(1, N, dtype=torch.float64)
    z, v = z - z.mean(), v - v.mean()
    errors = []
    for temperature in (10.0, 100.0, 1000.0):
        unscaled = grad_of_soft_term(z, v, temperature) / temperature**2
        limit = (z - v) / (N * temperature**2)
        errors.append(((unscaled - limit).abs().max() / limit.abs().max()).item())
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2], errors  # the approximation tightens as T grows


def test_eq4_holds_in_float32():
    torch.manual_seed(2)
    z, v = torch.randn(1, N), torch.randn(1, N)
    z, v = z - z.mean(), v - v.mean()
    temperature = 100.0
    unscaled = grad_of_soft_term(z, v, temperature) / temperature**2
    limit = (z - v) / (N * temperature**2)
    assert ((unscaled - limit).abs().max() / limit.abs().max()).item() < 0.02


def test_alpha_mixes_soft_and_hard_terms():
    torch.manual_seed(3)
    z, v, labels = torch.randn(8, N), torch.randn(8, N), torch.randint(0, N, (8,))
    temperature, alpha = 3.0, 0.7
    soft = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(v / temperature, -1), log_target=True, reduction="batchmean")
    expected = alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(z, labels)
    torch.testing.assert_close(distillation_loss(z, v, labels, temperature, alpha), expected)
    torch.testing.assert_close(distillation_loss(z, v, labels, temperature, 0.0), F.cross_entropy(z, labels))


def test_unlabelled_samples_get_only_the_soft_term():
    torch.manual_seed(4)
    z, v = torch.randn(4, N), torch.randn(4, N)
    labels = torch.tensor([3, -1, 5, -1])
    temperature, alpha = 2.0, 0.5
    per_sample_soft = (F.softmax(v / temperature, -1) * (F.log_softmax(v / temperature, -1) - F.log_softmax(z / temperature, -1))).sum(-1)
    hard = F.cross_entropy(z[[0, 2]], labels[[0, 2]], reduction="none")
    expected = (alpha * temperature**2 * per_sample_soft).sum() + ((1 - alpha) * hard).sum()
    torch.testing.assert_close(distillation_loss(z, v, labels, temperature, alpha), expected / 4)
    # With alpha=0 an unlabelled sample contributes nothing at all.
    assert distillation_loss(z[[1]], v[[1]], labels[[1]], temperature, 0.0).item() == 0.0


def test_half_precision_logits_are_computed_in_float32():
    z, v = torch.randn(4, N).half(), torch.randn(4, N).half()
    loss = distillation_loss(z, v, torch.tensor([1, 2, -1, 0]), 4.0, 0.9)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(z.float(), v.float(), torch.tensor([1, 2, -1, 0]), 4.0, 0.9))


def test_mse_logit_matching():
    z, v, labels = torch.randn(4, N), torch.randn(4, N), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(distillation_loss(z, v, labels, 1.0, 1.0, kind="mse"), ((z - v) ** 2).mean())
    with pytest.raises(ValueError, match="unknown loss"):
        distillation_loss(z, v, labels, 1.0, 1.0, kind="l1")
