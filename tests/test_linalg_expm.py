"""orthofx.linalg.expm: accuracy against scipy (float64), gradients against the float64 Fréchet
derivative, gradcheck, orthogonality of exp(skew), both squaring paths, and no host sync."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl
import torch
from hypothesis import given
from hypothesis import strategies as st

from orthofx.errors import ConfigError, DTypeError, InputError
from orthofx.linalg import solver_stats
from orthofx.linalg.expm import expm
from orthofx.syncs import sync_audit


def _skew(n: int, scale: float, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    a = torch.randn(*batch, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a - a.mT) * (scale / n**0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("scale", [0.0, 1e-4, 0.4, 3.0, 50.0, 2000.0])
@pytest.mark.parametrize("dtype,tol_per_norm", [(torch.float32, 2e-6), (torch.float64, 5e-15)])
@pytest.mark.parametrize("sync_free", [True, False])
def test_matches_scipy(scale: float, dtype: torch.dtype, tol_per_norm: float, sync_free: bool, device: torch.device) -> None:
    a = _skew(24, scale, 1)
    ref = torch.from_numpy(sl.expm(a.numpy()))
    y = expm(a.to(device, dtype), sync_free=sync_free)
    assert y.dtype == dtype and y.device.type == device.type
    # error of scaling-and-squaring grows with ‖A‖ (condition of the squarings)
    assert _rel(y, ref) <= tol_per_norm * max(1.0, a.abs().sum(0).max().item())


def test_general_nonnormal_matrix(device: torch.device) -> None:
    a = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.7
    a = a + torch.triu(torch.ones(16, 16, dtype=torch.float64), 1) * 0.3  # non-normal part
    ref = torch.stack([torch.from_numpy(sl.expm(m.numpy())) for m in a])
    assert _rel(expm(a.to(device)), ref) < 1e-13
    assert _rel(expm(a.to(device).float(), sync_free=True), ref) < 1e-5


def test_batch_elements_scale_independently(device: torch.device) -> None:
    """A tiny and a huge matrix in one batch: each gets its own number of squarings."""
    a = torch.stack([_skew(8, 1e-3, 3), _skew(8, 500.0, 4)]).to(device)
    for sync_free in (True, False):
        y = expm(a, sync_free=sync_free)
        for i in range(2):
            ref = torch.from_numpy(sl.expm(a[i].cpu().numpy()))
            assert _rel(y[i], ref) < 1e-12 * max(1.0, a[i].abs().sum(0).max().item())


@given(st.integers(1, 20), st.floats(0.0, 30.0), st.integers(0, 10_000))
def test_exp_of_skew_is_orthogonal(n: int, scale: float, seed: int) -> None:
    a = _skew(n, scale, seed).float()
    q = expm(a, sync_free=bool(seed % 2))
    err = (q.mT @ q - torch.eye(n)).abs().max().item()
    # rounding of the squarings grows like ‖A‖₁·u (u = 6e-8); measured worst constant ≈ 4
    assert err < 6e-8 * 16 * max(1.0, a.abs().sum(0).max().item())


@given(st.integers(1, 12), st.floats(0.0, 5.0), st.integers(0, 10_000))
def test_inverse_property(n: int, scale: float, seed: int) -> None:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale / n**0.5
    prod = expm(a) @ expm(-a)
    assert torch.allclose(prod, torch.eye(n, dtype=torch.float64), atol=1e-10 * np.exp(2 * scale))


@pytest.mark.parametrize("scale", [0.3, 5.0, 120.0])
@pytest.mark.parametrize("sync_free", [True, False])
def test_gradient_matches_frechet_derivative(scale: float, sync_free: bool, device: torch.device) -> None:
    """∂⟨exp(A), C⟩/∂A = L_exp(Aᵀ, C) (adjoint Fréchet derivative), float64 reference."""
    a = _skew(12, scale, 5) + 0.1 * torch.randn(12, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    c = torch.randn(12, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, ref = sl.expm_frechet(a.T.numpy(), c.numpy())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 3e-5)):
        x = a.to(device, dtype).detach().clone().requires_grad_()
        (expm(x, sync_free=sync_free) * c.to(device, dtype)).sum().backward()
        assert _rel(x.grad, torch.from_numpy(ref)) < tol * max(1.0, scale)


@pytest.mark.parametrize("sync_free", [pytest.param(True, marks=pytest.mark.slow), False])
def test_gradcheck(sync_free: bool) -> None:
    a = (_skew(5, 2.0, 8, batch=(2,)) + 0.2 * torch.randn(2, 5, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: expm(x, sync_free=sync_free), (a,))
    assert torch.autograd.gradgradcheck(lambda x: expm(x, sync_free=sync_free), (a,))


def test_half_precision_computed_in_float32() -> None:
    a = _skew(16, 1.0, 9)
    ref = torch.from_numpy(sl.expm(a.numpy()))
    for dt in (torch.float16, torch.bfloat16):
        y = expm(a.to(dt))
        assert y.dtype == dt
        assert _rel(y, ref) < 1e-2


def test_nan_gives_nan_and_is_counted() -> None:
    stats = solver_stats()
    before = stats.nonfinite
    a = torch.stack([_skew(4, 1.0, 10), torch.full((4, 4), float("nan"), dtype=torch.float64)])
    for sync_free in (True, False):
        y = expm(a, sync_free=sync_free)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    assert stats.nonfinite == before + 2
    with pytest.raises(InputError):
        expm(a, validate=True)


def test_out_of_range_is_counted_on_the_host_path() -> None:
    stats = solver_stats()
    before = stats.fallbacks.get("expm-range", 0)
    expm(_skew(4, 1e3, 11), max_squarings=2, sync_free=False)
    assert stats.fallbacks.get("expm-range", 0) == before + 1


def test_bad_input() -> None:
    with pytest.raises(InputError):
        expm(torch.randn(3, 4))
    with pytest.raises(DTypeError):
        expm(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ConfigError):
        expm(torch.randn(3, 3), max_squarings=-1)
    assert expm(torch.randn(0, 3, 3)).shape == (0, 3, 3)


def test_sync_free_path_dispatches_no_synchronising_op() -> None:
    a = _skew(16, 40.0, 12).float().requires_grad_()
    with sync_audit() as audit:
        expm(a, sync_free=True).sum().backward()
    assert audit.syncs == {}, audit.syncs
    with sync_audit() as audit:
        torch.linalg.matrix_exp(a.detach())
    assert "aten.linalg_matrix_exp" in audit.syncs


@pytest.mark.parametrize("g_scale", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_gradient_is_independent_of_the_gradient_scale(g_scale: float) -> None:
    """The backward scales Ḡ to ‖A‖ before the block exponential: huge or tiny upstream
    gradients give the same relative accuracy and no extra squarings."""
    a = _skew(10, 2.0, 13)
    c = torch.randn(10, 10, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    _, ref = sl.expm_frechet(a.T.numpy(), c.numpy())
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 3e-5)):
        x = a.to(dtype).detach().clone().requires_grad_()
        expm(x, sync_free=True).backward((c * g_scale).to(dtype))
        assert torch.isfinite(x.grad).all()
        assert _rel(x.grad / g_scale, torch.from_numpy(ref)) < tol
    zero = a.clone().requires_grad_()
    expm(zero).backward(torch.zeros_like(a))
    assert (zero.grad == 0).all()
