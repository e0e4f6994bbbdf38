"""Diagonal Padé exponentials of skew-symmetric matrices (orthofx.linalg.skew_pade): the θ table
against 50-digit arithmetic, the applied exponential against float64 references on both sides
and with squarings, exact gradients (gradcheck, gradgradcheck), the plan, and its use by the
host path beyond the fused Taylor degrees."""

from __future__ import annotations

import math

import mpmath
import pytest
import scipy.linalg as sl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthofx.linalg import skew_expm_apply
from orthofx.linalg.skew_pade import PADE_THETAS, pade_coefficients, pade_plan, skew_pade_apply

F64 = torch.float64
UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _skew(n: int, rho: float, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a * (rho / torch.linalg.matrix_norm(a - a.T, 2))


def _phase_error(m: int, lam: float) -> float:
    mpmath.mp.dps = 50
    c = [mpmath.mpf(math.factorial(2 * m - j) * math.factorial(m))
         / (math.factorial(2 * m) * math.factorial(j) * math.factorial(m - j)) for j in range(m + 1)]
    x = mpmath.mpc(0, lam)
    p = sum(cj * x**j for j, cj in enumerate(c))
    q = sum(cj * (-x) ** j for j, cj in enumerate(c))
    return float(abs(p / q - mpmath.exp(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_theta_table_bounds_the_error_by_the_unit_roundoff(dtype: torch.dtype) -> None:
    """|r_m(iλ) − e^{iλ}| ≤ u on a grid of [0, θ_m] (the error grows with |λ|), and the next
    table entry's θ is not already reached by the lower degree (each entry is needed)."""
    for m, theta in PADE_THETAS[dtype]:
        assert max(_phase_error(m, theta * t / 64) for t in range(1, 65)) <= UNIT[dtype]
        assert _phase_error(m, theta * 1.05) > UNIT[dtype] * 0.5 or m == PADE_THETAS[dtype][-1][0]


def test_coefficients_are_the_pade_numerator() -> None:
    c = pade_coefficients(3)
    assert c == pytest.approx((1.0, 0.5, 0.1, 1 / 120))
    for m in (3, 5, 7, 13):
        x = 0.01
        p = sum(cj * x**j for j, cj in enumerate(pade_coefficients(m)))
        q = sum(cj * (-x) ** j for j, cj in enumerate(pade_coefficients(m)))
        assert p / q == pytest.approx(math.exp(x), rel=1e-15)


def test_plan_takes_the_lowest_degree_then_squarings() -> None:
    assert pade_plan(0.1, torch.float32) == (3, 0)
    assert pade_plan(1.0, torch.float32) == (5, 0)
    assert pade_plan(3.0, torch.float32) == (7, 0)
    assert pade_plan(3.71, torch.float32) == (7, 1)
    assert pade_plan(100.0, torch.float32) == (7, 5)  # 100/2⁵ = 3.1 ≤ θ₇
    assert pade_plan(1e30, torch.float32, max_squarings=14) == (7, 14)
    assert pade_plan(math.nan, torch.float32) == (7, 0)
    assert pade_plan(4.0, torch.float64) == (13, 0)
    assert pade_plan(10.0, torch.float64) == (13, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("rho", [0.02, 0.3, 1.5, 3.0, 30.0])
def test_applied_exponential_is_exp_to_rounding(dtype: torch.dtype, right: bool, rho: float) -> None:
    n, k = 20, 7
    P = _skew(n, rho, 1)
    S = P - P.T
    Y = torch.randn(k, n, dtype=F64, generator=torch.Generator().manual_seed(2))
    Yd = Y if right else Y.T.contiguous()
    E = torch.from_numpy(sl.expm(S.numpy()))  # (torch's float64 matrix_exp is off by 4e-12 here)
    ref = Yd @ E if right else E @ Yd
    m, s = pade_plan(float(torch.linalg.matrix_norm(S, 2)), dtype)
    with torch.no_grad():
        Sd = S.to(dtype)
        out = skew_pade_apply(Sd, Sd @ Sd, Yd.to(dtype), m, s, right).double()
    tol = 8 * UNIT[dtype] * n * max(1, 2**s)
    assert (out - ref).norm() / ref.norm() <= tol


@pytest.mark.parametrize("right", [True, False])
@pytest.mark.parametrize("rho,m,s", [(0.02, 3, 0), (0.5, 7, 0), (3.0, 13, 0), (3.0, 7, 2)])
def test_gradients_are_exact(right: bool, rho: float, m: int, s: int) -> None:
    """gradcheck and gradgradcheck in P (S = P − Pᵀ) and Y, float64, with and without squarings."""
    P = _skew(6, rho, 3).requires_grad_()
    Y = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    Y = (Y if right else Y.T.contiguous()).requires_grad_()

    def fn(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        S = p - p.T
        return skew_pade_apply(S, (S @ S).detach(), y, m, s, right)

    assert torch.autograd.gradcheck(fn, (P, Y))
    assert torch.autograd.gradgradcheck(fn, (P, Y))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 24), log_rho=st.floats(-1.2, 2.0), seed=st.integers(0, 999))
def test_result_is_orthonormal_for_any_skew_argument(n: int, log_rho: float, seed: int) -> None:
    """float32, any size and norm beyond the fused degrees: ``Y₀·exp(S)`` stays orthonormal to
    a few u·n (no polish involved)."""
    P = _skew(n, 10.0**log_rho, seed).float()
    S = P - P.T
    Y = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0].float()
    m, s = pade_plan(10.0**log_rho * 1.5, torch.float32)
    with torch.no_grad():
        W = skew_pade_apply(S, S @ S, Y, m, s, True).double()
    assert (W.T @ W - torch.eye(n, dtype=F64)).norm() <= 16 * UNIT[torch.float32] * n * 2**s


def test_host_path_uses_pade_beyond_the_fused_degrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """expm_skew_apply_host: degree ≤ 4 stays the fused Taylor polynomial, beyond it Padé."""
    seen: list[tuple[int, int]] = []
    real = skew_expm_apply.skew_pade_apply
    monkeypatch.setattr(skew_expm_apply, "skew_pade_apply",
                        lambda S, S2, Y, m, s, right: seen.append((m, s)) or real(S, S2, Y, m, s, right))
    Y = torch.linalg.qr(torch.randn(16, 16, dtype=F64))[0].float()
    skew_expm_apply.expm_skew_apply_host(_skew(16, 0.01, 5).float(), Y, side="right")
    assert seen == []
    out, s = skew_expm_apply.expm_skew_apply_host(_skew(16, 2.0, 5).float(), Y, side="right")
    assert len(seen) == 1 and seen[0][0] in (5, 7) and s == seen[0][1]
    P = _skew(16, 2.0, 5)
    ref = Y.double() @ torch.from_numpy(sl.expm((P - P.T).numpy()))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("scale", [0.05, 0.5, 5.0])
def test_low_rank_route_uses_pade_columns_beyond_degree_four(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flat map's low-rank route (2k×2k M, not skew) computes exp(M)[:, k:] by Padé beyond
    the Taylor degree 4: the same W as the float64 dense exponential, exact gradients."""
    from orthofx.treatments import stiefel

    seen: list[tuple[int, int]] = []
    real = stiefel.pade_columns
    monkeypatch.setattr(stiefel, "pade_columns", lambda M, M2, j, m, s: seen.append((m, s)) or real(M, M2, j, m, s))
    g = torch.Generator().manual_seed(7)
    Y0 = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=F64))[0]
    a = (scale * torch.randn(30, 6, generator=g, dtype=F64)).requires_grad_()
    W = stiefel.stiefel_map(a, Y0, "expm", True)
    S = (a @ Y0.T - Y0 @ a.T).detach()
    ref = torch.from_numpy(sl.expm(S.numpy())) @ Y0
    torch.testing.assert_close(W.detach(), ref, atol=1e-12 * max(1.0, scale), rtol=0)
    assert bool(seen) == (float(torch.linalg.matrix_norm(S, 2)) > 0.1)
    assert torch.autograd.gradcheck(lambda t: stiefel.stiefel_map(t, Y0, "expm", True), (a,))
