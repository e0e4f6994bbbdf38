"""covariance_sqrtm (the Gram route) against float64 references and gradcheck."""

from __future__ import annotations

import pytest
import torch

import orthofx.linalg as ol
from orthofx.errors import ConfigError
from orthofx.linalg.gram import covariance_sqrtm, gram_divided_differences, gram_h


def _features(batch: int, c: int, m: int, seed: int = 0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, m, generator=g, dtype=torch.float64)
    x = x * torch.logspace(0, -3, c, dtype=torch.float64).unsqueeze(-1)  # spread the spectrum
    return x.to(device=device, dtype=dtype)


def _reference(x: torch.Tensor, eps: float, inverse: bool) -> torch.Tensor:
    x = x.double()
    xc = x - x.mean(-1, keepdim=True)
    cov = xc @ xc.mT / x.shape[-1]
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0) + eps
    f = lam.rsqrt() if inverse else lam.sqrt()
    return (u * f.unsqueeze(-2)) @ u.mT


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("c,m,eps", [(64, 9, 1e-5), (32, 49, 1e-3), (8, 20, 1e-2)])
def test_matches_float64_eigh_of_the_full_covariance(device, inverse, c, m, eps):
    x = _features(3, c, m, device=device)
    y = covariance_sqrtm(x, eps=eps, inverse=inverse)
    ref = _reference(x, eps, inverse)
    err = (y - ref).norm() / ref.norm()
    assert err < 1e-10, err
    # also equal to the dense route of orthofx itself
    dense = (ol.invsqrtm if inverse else ol.sqrtm)(ol.covariance(x), eps=eps)
    torch.testing.assert_close(y, dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    x = _features(2, 6, 4, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: covariance_sqrtm(t, eps=1e-2, inverse=inverse), (x,))


@pytest.mark.parametrize("inverse", [False, True])
def test_gradient_matches_dense_daleckii_krein_on_rank_deficient_features(inverse):
    x = _features(2, 40, 7, seed=2)  # rank <= 6 < 40: 34 eigenvalues equal eps exactly
    up = torch.randn(2, 40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = x.clone().requires_grad_(True)
    (covariance_sqrtm(a, eps=1e-4, inverse=inverse) * up).sum().backward()
    b = x.clone().requires_grad_(True)
    fn = ol.invsqrtm if inverse else ol.sqrtm
    (fn(ol.covariance(b), eps=1e-4) * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9)


def test_closed_forms_equal_their_definitions():
    mu = torch.tensor([0.0, 1e-6, 0.3, 2.0], dtype=torch.float64)
    eps = 1e-3
    for inverse, f in ((False, torch.sqrt), (True, torch.rsqrt)):
        h = gram_h(mu, eps, inverse)
        direct = (f(mu[1:] + eps) - f(torch.tensor(eps, dtype=torch.float64))) / mu[1:]
        torch.testing.assert_close(h[1:], direct, rtol=1e-6, atol=0)
        F = gram_divided_differences(mu, eps, inverse)
        i, j = 2, 3
        torch.testing.assert_close(F[i, j], (h[i] - h[j]) / (mu[i] - mu[j]))
        d = 1e-7
        num = (gram_h(mu + d, eps, inverse) - gram_h(mu - d, eps, inverse))[2] / (2 * d)
        torch.testing.assert_close(F[2, 2], num, rtol=1e-5, atol=0)


def test_eigenvalues_for_the_monitor_and_bad_input():
    x = _features(2, 10, 4, seed=4)
    _, lam = covariance_sqrtm(x, eps=1e-3, return_eigenvalues=True)
    xc = x - x.mean(-1, keepdim=True)
    ref = torch.linalg.eigvalsh(xc @ xc.mT / 4) + 1e-3
    torch.testing.assert_close(lam, ref.clamp_min(1e-3), rtol=1e-9, atol=1e-12)
    with pytest.raises(ConfigError, match="eps > 0"):
        covariance_sqrtm(x, eps=0.0)
    with pytest.raises(Exception, match="NaN|finite"):
        covariance_sqrtm(torch.full((1, 3, 2), float("nan")), eps=1e-3)
