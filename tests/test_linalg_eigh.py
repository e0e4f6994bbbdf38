"""orthofx.linalg.eigh / eigvalsh: forward backends, the exact-by-default backward (issue 11),
the explicit Taylor-K backward, and on_nonfinite."""

from __future__ import annotations

import math

import pytest
import torch

import orthofx.linalg as ol
from orthofx.testing.matrices import feature_covariance, random_spd, spd_with_spectrum
from orthofx.linalg.eigh import near_tie_rel


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
    torch.testing.assert_close(grad_of(lambda x: ol.eigh(x, backend=backend)), exact, rtol=0, atol=0)  # default
    # degree 9 truncates the series: ratios here are ≥ 10^(-1/5)... ≤ 0.63, error ≤ 0.63^10 ≈ 1%
    approx = grad_of(lambda x: ol.eigh(x, taylor_degree=9, backend=backend))
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


@pytest.mark.parametrize("degree", [None, 9])
def test_stable_k_general_pairs_are_bounded_and_finite(degree: int | None) -> None:
    lam = torch.tensor([[-1e-30, 0.0, 0.0, 1e-20, 1.0]], dtype=torch.float64)
    k = ol.stable_k(lam, taylor_degree=degree)[0]
    assert bool(torch.isfinite(k).all())
    assert k[1, 2].item() == 0.0  # exact tie of zeros
    assert k[0, 4].item() == pytest.approx(1 / (-1e-30 - 1.0))  # opposite signs: exact
    k32 = ol.stable_k(torch.tensor([[0.0, 1e-45, 1.0]], dtype=torch.float32), taylor_degree=degree)
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
    # torch: 1/(λi − λj) over gaps of ~1e-18 gives gradients of order 1e15 or non-finite
    assert (not bool(torch.isfinite(ref).all())) or ref.abs().max().item() > 1e12
    lam = torch.linalg.eigvalsh(a)
    for degree in (None, 9):  # exact default (ramp on the ε cluster) and explicit Taylor
        ours = grad_of(lambda x: ol.eigh(x, taylor_degree=degree), a)
        assert bool(torch.isfinite(ours).all())
        # Taylor: |K| ≤ (N+1)/λ; default: the cluster's gaps (~1e-15) sit far below φ = 1e-6·λ,
        # so K = d/φ² stays below the same scale; |Uᵀ gU| ≤ ‖w‖ scale
        bound = 10 / lam.min().item() * 64
        assert ours.abs().max().item() < bound

    # dead channels (ReLU-dead, all zero) give an *exactly* repeated eigenvalue: torch -> NaN
    x = torch.randn(64, 27, dtype=torch.float64, generator=g)
    x[48:] = 0
    dead = ol.covariance(x, eps=1e-4)
    ref_dead = grad_of(lambda x: torch.linalg.eigh(x), dead)
    assert not bool(torch.isfinite(ref_dead).all())
    for degree in (None, 9):
        assert bool(torch.isfinite(grad_of(lambda x: ol.eigh(x, taylor_degree=degree), dead)).all())


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


# --- issue 11: exact by default, bounded only at near-ties --------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from orthofx.errors import InputError  # noqa: E402


def _grad(fn, a: torch.Tensor, w_vec: torch.Tensor, w_lam: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """∂/∂A of the sign-invariant loss Σ w_vec ∘ U² + Σ w_lam ∘ L for ``(L, U) = fn(A)``."""
    x = a.clone().requires_grad_()
    lam, vec = fn(x)
    ((vec.square() * w_vec).sum() + (lam * w_lam).sum()).backward()
    assert x.grad is not None
    return x.grad


def _torch_ref(x: torch.Tensor):  # type: ignore[no-untyped-def]
    return torch.linalg.eigh((x + x.mT) / 2)


@st.composite
def _gapped_spectra(draw: st.DrawFn) -> list[float]:
    """Ascending positive spectra, every relative gap (λ_{k+1} − λ_k)/λ_{k+1} in [1e-3, 0.9]."""
    n = draw(st.integers(2, 12))
    lam = [10.0 ** draw(st.floats(-4.0, 2.0))]
    for _ in range(n - 1):
        gap = 10.0 ** draw(st.floats(-3.0, math.log10(0.9)))
        lam.append(lam[-1] / (1.0 - gap))
    return lam


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spectrum=_gapped_spectra(), seed=st.integers(0, 2**16))
def test_default_gradient_equals_torch_where_gaps_are_resolved(spectrum: list[float], seed: int, device: torch.device) -> None:
    lam = torch.tensor([spectrum], dtype=torch.float64)
    a = spd_with_spectrum(lam, seed=seed, device=device)
    n = len(spectrum)
    g = torch.Generator().manual_seed(seed + 1)
    w_vec = torch.randn(1, n, n, dtype=torch.float64, generator=g).to(device)
    w_lam = torch.randn(1, n, dtype=torch.float64, generator=g).to(device)
    ref = _grad(_torch_ref, a, w_vec, w_lam)
    ours = _grad(ol.eigh, a, w_vec, w_lam)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-8


def test_default_gradient_exact_for_ratio_09_pair(device: torch.device) -> None:
    # the case: the Taylor-9 K of a pair with ratio 0.9 is 1 − 0.9^10 = 35% low
    a = spd_with_spectrum(torch.tensor([[0.05, 0.9, 1.0, 3.0]], dtype=torch.float64), seed=21, device=device)
    g = torch.Generator().manual_seed(22)
    w_vec = torch.randn(1, 4, 4, dtype=torch.float64, generator=g).to(device)
    w_lam = torch.zeros(1, 4, dtype=torch.float64, device=device)
    ref = _grad(_torch_ref, a, w_vec, w_lam)
    rel = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(_grad(ol.eigh, a, w_vec, w_lam)) <= 1e-10
    assert rel(_grad(lambda x: ol.eigh(x, taylor_degree=9), a, w_vec, w_lam)) > 0.05
    k = ol.stable_k(torch.tensor([0.9, 1.0], dtype=torch.float64))
    assert k[1, 0].item() == pytest.approx(1 / 0.1, rel=1e-12)


@pytest.mark.parametrize(
    "spectrum",
    [[0.5, 0.9, 1.0, 2.0, 3.5], [-2.0, -0.9, 0.3, 1.0, 1.1], [1e-3, 1.1e-3, 1.0]],
    ids=["positive", "indefinite", "ill-conditioned"],
)
def test_gradcheck_default_backward(spectrum: list[float]) -> None:
    a = spd_with_spectrum(torch.tensor([spectrum], dtype=torch.float64), seed=23).requires_grad_()
    n = len(spectrum)
    g = torch.Generator().manual_seed(24)
    w_vec = torch.randn(1, n, n, dtype=torch.float64, generator=g)
    w_lam = torch.randn(1, n, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(_loss_fn(w_vec, w_lam), (a,))  # default arguments


@pytest.mark.parametrize(
    "spectrum,simple",
    [
        ([0.0, 0.0, 0.0, 1.0, 1.5], [3, 4]),  # rank-deficient, no +εI: a rounding-level null space
        ([1.0, 1.0, 1.0, 2.0, 3.5], [3, 4]),  # exactly repeated
        ([0.0, 0.0, 1.0, 1.0, 1.7], [4]),  # both
    ],
    ids=["rank-deficient", "repeated", "zero-and-repeated"],
)
def test_default_backward_on_degenerate_spectra_is_finite_and_exact_where_defined(
    spectrum: list[float], simple: list[int], device: torch.device
) -> None:
    # a loss of the eigenvalues and of the eigenvectors of *simple* eigenvalues only is
    # differentiable even with repeated eigenvalues elsewhere: its gradient must be finite
    # and exact (finite differences), which the Taylor K (0.1% off for ratio 1/2) is not
    lam = torch.tensor([spectrum], dtype=torch.float64)
    a = spd_with_spectrum(lam, seed=25).to(device)
    g = torch.Generator().manual_seed(26)
    w_vec = torch.zeros(1, 5, 5, dtype=torch.float64)
    w_vec[..., simple] = torch.randn(1, 5, len(simple), dtype=torch.float64, generator=g)
    w_vec = w_vec.to(device)
    w_lam = torch.randn(1, 5, dtype=torch.float64, generator=g)
    for value in set(spectrum):  # Σ w_i λ_i is differentiable only with w constant on a cluster
        w_lam[0, lam[0] == value] = w_lam[0, lam[0] == value].mean()
    w_lam = w_lam.to(device)
    for x0 in (a, torch.diag_embed(lam).to(device)):  # rounded ties, and exact ties
        grad = _grad(ol.eigh, x0, w_vec, w_lam)
        assert bool(torch.isfinite(grad).all())
    assert torch.autograd.gradcheck(_loss_fn(w_vec, w_lam), (a.clone().requires_grad_(),))
    assert not torch.autograd.gradcheck(_loss_fn(w_vec, w_lam, taylor_degree=9), (a.clone().requires_grad_(),), raise_exception=False)


@pytest.mark.parametrize("value", [0.0, 2.0])
def test_default_backward_on_all_equal_spectrum_is_the_eigenvalue_part(value: float, device: torch.device) -> None:
    # c·I: every pair is an exact tie, K = 0, only U diag(∂L/∂Λ) Uᵀ remains (Taylor: K = 10/c)
    a = value * torch.eye(6, dtype=torch.float64, device=device).expand(2, 6, 6)
    g = torch.Generator().manual_seed(27)
    w_vec = torch.randn(2, 6, 6, dtype=torch.float64, generator=g).to(device)
    w_lam = torch.randn(2, 6, dtype=torch.float64, generator=g).to(device)
    grad = _grad(ol.eigh, a, w_vec, w_lam)
    _, vec = ol.eigh(a)
    expected = (vec * w_lam.unsqueeze(-2)) @ vec.mT
    torch.testing.assert_close(grad, (expected + expected.mT) / 2, rtol=1e-12, atol=1e-12)
    k = ol.stable_k(torch.full((3, 6), value, dtype=torch.float64))
    assert bool((k == 0).all())


def test_default_near_tie_rule_and_bound() -> None:
    for dtype, delta in ((torch.float64, 1e-6), (torch.float32, math.sqrt(torch.finfo(torch.float32).eps))):
        assert near_tie_rel(dtype) == pytest.approx(delta)
    lam = torch.tensor([[1.0, 1.0 + 1e-3, 1.0 + 1e-3 + 1e-8, 5.0]], dtype=torch.float64)
    k = ol.stable_k(lam)[0]
    d = lam[0].unsqueeze(-1) - lam[0].unsqueeze(-2)
    resolved = (d.abs() >= 1e-6 * torch.maximum(lam[0].unsqueeze(-1).abs(), lam[0].unsqueeze(-2).abs())) & (d != 0)
    torch.testing.assert_close(k[resolved], 1 / d[resolved], rtol=1e-15, atol=0)  # exact
    phi = 1e-6 * (1.0 + 1e-3 + 1e-8)
    assert k[2, 1].item() == pytest.approx(d[2, 1].item() / phi**2, rel=1e-9)  # ramp d/φ²
    assert bool((k.abs() <= 1 / (1e-6 * torch.maximum(lam[0].unsqueeze(-1), lam[0].unsqueeze(-2))) * (1 + 1e-12)).all())


@pytest.mark.parametrize("backend", ["eigh", "svd"])
def test_on_nonfinite_raise_and_skip(backend: str, device: torch.device) -> None:
    a = random_spd((3,), 4, cond=10.0, seed=28, device=device)
    a[1, 0, 2] = float("nan")
    with pytest.raises(InputError, match=r"my layer.*1 of 3 batch.*on_nonfinite='skip'"):
        ol.eigh(a, validate=False, on_nonfinite="raise", name="my layer", backend=backend)
    stats = ol.solver_stats()
    stats.reset()
    x = a.clone().requires_grad_()
    lam, vec = ol.eigh(x, validate=False, on_nonfinite="skip", backend=backend)
    assert stats.nonfinite == 1 and stats.failures == 0
    assert bool(torch.isfinite(lam).all() and torch.isfinite(vec).all())
    torch.testing.assert_close(lam[1], torch.ones(4, dtype=torch.float64, device=device))
    ref_lam, _ = ol.eigh(a[[0, 2]])
    torch.testing.assert_close(lam[[0, 2]], ref_lam)
    (lam.sum() + vec.square().mul(torch.arange(4.0, dtype=torch.float64, device=device)).sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool((x.grad[1] == 0).all())
    stats.reset()
    assert bool(torch.isfinite(ol.eigvalsh(a, validate=False, on_nonfinite="skip")).all())
    assert stats.nonfinite == 1
    with pytest.raises(InputError, match="eigvalsh input"):
        ol.eigvalsh(a, validate=False, on_nonfinite="raise")
    stats.reset()
