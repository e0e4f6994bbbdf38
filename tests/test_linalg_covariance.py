"""covariance and condition_number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import orthofx.linalg as ol
from orthofx.testing.matrices import feature_covariance, spd_with_spectrum


def test_covariance_matches_numpy(device: torch.device) -> None:
    x = torch.randn(3, 6, 11, dtype=torch.float64)
    cov = ol.covariance(x.to(device), eps=1e-3)
    ref = np.stack([np.cov(m.numpy(), bias=True) for m in x]) + 1e-3 * np.eye(6)
    torch.testing.assert_close(cov.cpu(), torch.from_numpy(ref))
    assert bool((cov == cov.mT).all())


def test_covariance_is_the_papers_x_j_xt() -> None:
    x = torch.randn(5, 7, dtype=torch.float64)
    m = x.shape[-1]
    j = (torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m) / m
    torch.testing.assert_close(ol.covariance(x), x @ j @ x.T)


def test_covariance_rank_and_gradient() -> None:
    x = torch.randn(2, 16, 5, dtype=torch.float64, requires_grad=True)
    cov = ol.covariance(x)
    assert int(torch.linalg.matrix_rank(cov[0])) == 4  # M − 1
    assert torch.autograd.gradcheck(lambda t: ol.covariance(t, eps=0.1), (x[:1].detach().clone().requires_grad_(),))


def test_covariance_half_accumulates_in_float32(device: torch.device) -> None:
    x = torch.randn(2, 8, 300, device=device) * 30 + 100  # large mean: cancellation in half
    cov = ol.covariance(x.half())
    assert cov.dtype == torch.float16
    ref = ol.covariance(x.half().double())
    assert ((cov.double() - ref).norm() / ref.norm()).item() < 2e-3


def test_condition_number_convention(device: torch.device) -> None:
    lam = torch.tensor([[1e-3, 0.5, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    a = spd_with_spectrum(lam, seed=0).float().to(device)
    k = ol.condition_number(a)
    assert k.dtype == torch.float64 and k.shape == (2,) and k.device.type == device.type
    assert k[0].item() == pytest.approx(2.0 / 1e-3, rel=1e-4)
    assert k[1].item() == pytest.approx(1.0, rel=1e-6)
    # eps is added to the eigenvalues: κ = (λ_max + ε)/(λ_min + ε)
    assert ol.condition_number(a, eps=0.1)[0].item() == pytest.approx(2.1 / (1e-3 + 0.1), rel=1e-4)


def test_condition_number_singular_and_indefinite_is_inf() -> None:
    sing = feature_covariance((), 8, 3, 0.0, seed=1)  # rank 2: λ_min is ±rounding
    indef = spd_with_spectrum(torch.tensor([[-1.0, 1.0, 2.0]], dtype=torch.float64))
    zero = torch.zeros(1, 4, 4)
    eps_case = ol.condition_number(sing, eps=1e-2)
    lam_max = torch.linalg.eigvalsh(sing)[-1].item()
    assert eps_case.item() == pytest.approx((lam_max + 1e-2) / 1e-2, rel=1e-9)  # κ = (λmax+ε)/ε
    assert ol.condition_number(indef).item() == float("inf")
    assert ol.condition_number(zero).item() == float("inf")
    k_sing = ol.condition_number(sing).item()
    assert k_sing == float("inf") or k_sing > 1e12


def test_condition_number_from_eigenvalues_matches() -> None:
    a = feature_covariance((3,), 10, 4, 1e-3, seed=2)
    lam = torch.linalg.eigvalsh(a)
    torch.testing.assert_close(ol.condition_number_from_eigenvalues(lam), ol.condition_number(a))
    assert ol.condition_number_from_eigenvalues(torch.tensor([0.0, 1.0])).item() == float("inf")
    assert torch.isnan(ol.condition_number_from_eigenvalues(torch.tensor([float("nan"), 1.0]))).item()
