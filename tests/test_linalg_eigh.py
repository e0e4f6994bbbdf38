"""orthofx.linalg.eigh / eigvalsh: forward backends and the stable Taylor-K backward."""

from __future__ import annotations

import pytest
import torch

import orthofx.linalg as ol
from orthofx.linalg._cases import feature_covariance, random_spd, spd_with_spectrum


def _reconstruction_error(a: torch.Tensor, lam: torch.Tensor, vec: torch.Tensor) -> float:
    rec = (vec * lam.unsqueeze(-2)) @ vec.mT
    return ((rec - a).norm() / a.norm()).item()


@pytest.mark.parametrize("backend", ["eigh", "svd", "auto"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_forward_matches_float64_reference(backend: str, dtype: torch.dtype, tol: float, device: torch.device) -> None:
    a64 = torch.cat([random_spd((3,), 16, cond=1e3, seed=0), feature_covariance((3,), 16, 9, 1e-3, seed=1)])
    ref = torch.linalg.eigvalsh(a64)
    a = a64.to(device=device, dtype=dtype)
    lam, vec = ol.eigh(a, backend=backend)
    assert lam.dtype == dtype and vec.dtype == dtype and lam.device.type == device.type
    assert bool((lam[..., 1:] >= lam[..., :-1]).all()), "eigenvalues must be ascending"
    err = ((lam.double().cpu() - ref).abs().max(-1).values / ref[..., -1]).max().item()
    assert err < tol
    assert _reconstruction_error(a, lam, vec) < 10 * tol
    eye = torch.eye(16, dtype=dtype, device=device)
    assert (vec.mT @ vec - eye).abs().max().item() < 10 * tol


def test_svd_route_falls_back_on_indefinite_input(device: torch.device) -> None:
    # ±λ pairs make the SVD mix eigenvectors; the residual/indefiniteness check must catch it.
    lam_true = torch.tensor([[-2.0, -1.0, 0.5, 1.0, 2.0, 3.0]], dtype=torch.float64)
    a = spd_with_spectrum(lam_true, seed=3, device=device)
    spd = random_spd((1,), 6, cond=10.0, seed=4, device=device)
    batch = torch.cat([spd, a])
    stats = ol.solver_stats()
    stats.reset()
    lam, vec = ol.eigh(batch, backend="svd")
    assert stats.fallbacks.get("svd->eigh", 0) == 1  # only the indefinite element
    torch.testing.assert_close(lam[1].cpu(), lam_true[0], rtol=1e-10, atol=1e-10)
    assert _reconstruction_error(batch, lam, vec) < 1e-12
    stats.reset()


def test_eigvalsh_matches_eigh(device: torch.device) -> None:
    a = feature_covariance((2,), 12, 5, 1e-3, seed=5, device=device)
    torch.testing.assert_close(ol.eigvalsh(a), ol.eigh(a)[0])
    torch.testing.assert_close(ol.eigvalsh(a, backend="svd"), ol.eigh(a)[0], rtol=1e-9, atol=1e-12)


def _loss_fn(w_vec: torch.Tensor, w_lam: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
    def fn(a: torch.Tensor) -> torch.Tensor:
        lam, vec = ol.eigh(a, **kw)
        return (vec.square() * w_vec).sum() + (lam * w_lam).sum()  # gauge (sign) invariant
    return fn


@pytest.mark.parametrize("degree", [None, 400])
@pytest.mark.parametrize(
    "spectrum",
    [[0.5, 1.0, 2.0, 3.5, 5.0], [-4.0, -2.0, -0.7, 1.0, 3.0], [-5.0, -3.0, -1.5, -0.5, -0.1]],
    ids=["positive", "indefinite", "negative"],
)
def test_gradcheck_well_separated(degree: int | None, spectrum: list[float]) -> None:
    a = spd_with_spectrum(torch.tensor([spectrum], dtype=torch.float64), seed=6).requires_grad_()
    g = torch.Generator().manual_seed(7)
    w_vec = torch.randn(1, 5, 5, dtype=torch.float64, generator=g)
    w_lam = torch.randn(1, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(_loss_fn(w_vec, w_lam, taylor_degree=degree), (a,))


@pytest.mark.parametrize("backend", ["eigh", "svd"])
def test_gradient_matches_torch_on_simple_spectrum(backend: str) -> None:
    a = random_spd((2,), 6, cond=10.0, seed=8)
    g = torch.Generator().manual_seed(9)
    w_vec = torch.randn(2, 6, 6, dtype=torch.float64, generator=g)
    w_lam = torch.randn(2, 6, dtype=torch.float64, generator=g)

    def grad_of(fn):  # type: ignore[no-untyped-def]
        x = a.clone().requires_grad_()
        lam, vec = fn(x)
        ((vec.square() * w_vec).sum() + (lam * w_lam).sum()).backward()
        return x.grad

    ref = grad_of(lambda x: torch.linalg.eigh((x + x.mT) / 2))
    exact = grad_of(lambda x: ol.eigh(x, taylor_degree=None, backend=backend))
    torch.testing.assert_close(exact, ref, rtol=1e-9, atol=1e-9)
    # degree 9 truncates the series: ratios here are ≥ 10^(-1/5)... ≤ 0.63, error ≤ 0.63^10 ≈ 1%
    approx = grad_of(lambda x: ol.eigh(x, backend=backend))
    rel = ((approx - ref).norm() / ref.norm()).item()
    assert 1e-6 < rel < 0.05
    high = grad_of(lambda x: ol.eigh(x, taylor_degree=100, backend=backend))
    torch.testing.assert_close(high, ref, rtol=1e-8, atol=1e-8)


def test_stable_k_truncation_and_bound() -> None:
    lam = torch.tensor([[0.1, 0.5, 0.5, 2.0, 7.0]], dtype=torch.float64)
    n_terms = 10
    k = ol.stable_k(lam, taylor_degree=n_terms - 1)[0]
    li, lj = lam[0].unsqueeze(-1), lam[0].unsqueeze(-2)
    p = torch.minimum(li / lj, lj / li)
    off = ~torch.eye(5, dtype=torch.bool)
    distinct = off & (li != lj)
    # K_ij (λi − λj) = 1 − p^{N+1} for distinct positive eigenvalues
    torch.testing.assert_close((k * (li - lj))[distinct], (1 - p.pow(n_terms))[distinct])
    # ties: K = (N+1)/λ, both orders
    assert k[1, 2].item() == pytest.approx(n_terms / 0.5) and k[2, 1].item() == pytest.approx(n_terms / 0.5)
    assert bool((k.diagonal() == 0).all())
    assert bool((k.abs() <= n_terms / torch.maximum(li, lj) * (1 + 1e-12)).all())


def test_stable_k_general_pairs_are_bounded_and_finite() -> None:
    lam = torch.tensor([[-1e-30, 0.0, 0.0, 1e-20, 1.0]], dtype=torch.float64)
    k = ol.stable_k(lam)[0]
    assert bool(torch.isfinite(k).all())
    assert k[1, 2].item() == 0.0  # exact tie of zeros
    assert k[0, 4].item() == pytest.approx(1 / (-1e-30 - 1.0))  # opposite signs: exact
    k32 = ol.stable_k(torch.tensor([[0.0, 1e-45, 1.0]], dtype=torch.float32))
    assert bool(torch.isfinite(k32).all())


def test_torch_backward_breaks_on_rank_deficient_covariance_ours_does_not() -> None:
    # 64 channels from 27 samples + 1e-4·I: the 37-fold ε cluster.
    a = feature_covariance((), 64, 27, 1e-4, seed=10)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 64, dtype=torch.float64, generator=g)

    def grad_of(fn, x0):  # type: ignore[no-untyped-def]
        x = x0.clone().requires_grad_()
        _, vec = fn(x)
        (vec.square() * w).sum().backward()
        return x.grad

    ref = grad_of(lambda x: torch.linalg.eigh(x), a)
    ours = grad_of(lambda x: ol.eigh(x), a)
    # torch: 1/(λi − λj) over gaps of ~1e-18 gives gradients of order 1e15 or non-finite
    assert (not bool(torch.isfinite(ref).all())) or ref.abs().max().item() > 1e12
    assert bool(torch.isfinite(ours).all())
    lam = torch.linalg.eigvalsh(a)
    bound = 10 / lam.min().item() * 64  # |K| ≤ (N+1)/λ, |Uᵀ gU| ≤ ‖w‖ scale
    assert ours.abs().max().item() < bound

    # dead channels (ReLU-dead, all zero) give an *exactly* repeated eigenvalue: torch -> NaN
    x = torch.randn(64, 27, dtype=torch.float64, generator=g)
    x[48:] = 0
    dead = ol.covariance(x, eps=1e-4)
    ref_dead = grad_of(lambda x: torch.linalg.eigh(x), dead)
    ours_dead = grad_of(lambda x: ol.eigh(x), dead)
    assert not bool(torch.isfinite(ref_dead).all())
    assert bool(torch.isfinite(ours_dead).all())


def test_eigvalsh_gradient_is_exact_even_for_repeated_eigenvalues() -> None:
    a = feature_covariance((2,), 10, 4, 1e-3, seed=12).requires_grad_()
    w = torch.randn(2, 10, dtype=torch.float64)
    (ol.eigvalsh(a) * w).sum().backward()
    lam, vec = torch.linalg.eigh(a.detach())
    # any orthonormal basis of the cluster gives the same U diag(w) Uᵀ only if w is constant on it;
    # compare with the definition: d/dA Σ w_i λ_i = U diag(w) Uᵀ with torch's own U
    ref = (vec * w.unsqueeze(-2)) @ vec.mT
    assert a.grad is not None
    torch.testing.assert_close(a.grad, (ref + ref.mT) / 2, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: ol.eigvalsh(x), (random_spd((1,), 4, seed=13).requires_grad_(),))


def test_backward_dtype_follows_input(device: torch.device) -> None:
    a = random_spd((2,), 5, cond=5.0, seed=14, dtype=torch.float32, device=device).requires_grad_()
    lam, vec = ol.eigh(a)
    (vec.square().sum() + lam.sum()).backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and bool(torch.isfinite(a.grad).all())
