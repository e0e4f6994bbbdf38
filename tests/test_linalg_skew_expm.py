"""orthofx.linalg.skew_expm: exp of a skew-symmetric matrix on the host path (the dense OW route).

References are float64 (scipy.linalg.expm, torch.linalg.matrix_exp, the dense OW map through
torch.linalg.matrix_exp); tolerances scale with ‖S‖ as any scaling and squaring does. No
timing asserts: the products are counted instead (the cost the benchmark measures)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg as sl
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from orthofx.linalg import solver_stats
from orthofx.linalg.expm import _NORMAL_THETAS, _THETAS, expm_plan, norm1
from orthofx.linalg.skew_expm import _power_floor, antisym, expm_skew_host, refine_rho_bound, skew_rho_bounds, skew_square
from orthofx.treatments.stiefel import stiefel_map

F64 = torch.float64


def _skew(n: int, rho: float, seed: int) -> torch.Tensor:
    """A float64 skew-symmetric n×n matrix with spectral norm ``rho`` (rho = 0: zero)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    s = a - a.T
    return s * (rho / torch.linalg.matrix_norm(s, 2).clamp_min(1e-300)) if n > 1 else s


def _exp(s: torch.Tensor) -> torch.Tensor:
    n, _ = expm_skew_host(s)
    return torch.eye(s.shape[-1], dtype=s.dtype) + n


def _base(n_big: int, k: int, seed: int) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(torch.randn(n_big, k, generator=torch.Generator().manual_seed(seed), dtype=F64),
                                full_matrices=False)
    return U @ Vh


# ρ from 0 to 300 (log-spaced): degree 1, 2, 4, 6, 9, 12, 16 and up to 7 squarings
RHOS = st.one_of(st.just(0.0), st.floats(-8.0, 2.5).map(lambda e: 10.0**e))


@given(st.integers(1, 24), RHOS, st.integers(0, 10_000))
def test_float64_equals_scipy_expm(n: int, rho: float, seed: int) -> None:
    s = _skew(n, rho, seed)
    ref = torch.from_numpy(sl.expm(s.numpy()))
    err = (_exp(s) - ref).norm() / math.sqrt(n)  # ‖exp(S)‖_F = √n
    assert err <= 1e-14 * max(1.0, rho), (err, rho)
    assert (_exp(s) - torch.linalg.matrix_exp(s)).norm() / math.sqrt(n) <= 1e-14 * max(1.0, rho)


@given(st.integers(1, 24), RHOS, st.integers(0, 10_000))
def test_float32_equals_the_float64_exponential(n: int, rho: float, seed: int) -> None:
    s = _skew(n, rho, seed)
    ref = torch.from_numpy(sl.expm(s.numpy()))
    err = ((_exp(s.float()).double() - ref).norm() / math.sqrt(n)).item()
    assert err <= 1e-6 * max(1.0, rho), (err, rho)


@given(st.integers(1, 24), RHOS, st.integers(0, 10_000), st.sampled_from([torch.float32, F64]))
def test_exp_of_skew_is_orthogonal_to_working_precision(n: int, rho: float, seed: int, dtype: torch.dtype) -> None:
    q = _exp(_skew(n, rho, seed).to(dtype)).double()
    u = torch.finfo(dtype).eps / 2
    err = (q.T @ q - torch.eye(n, dtype=F64)).norm().item()
    # truncation ≤ u by the choice of degree, rounding of the products ≈ n·u, ×2 per squaring
    assert err <= 8 * n * u * max(1.0, rho), (err, rho)


def test_truncation_bound_of_the_imaginary_table() -> None:
    """θ_m^{m+1}/(m+1)! ≤ u (the Taylor remainder of e^{iy}); every θ_m is at least the general
    θ_m (no e^{2θ} factor), and the top degree keeps the scaling range θ·2^14 ≥ 32768."""
    for dtype, u in ((torch.float32, 2.0**-24), (F64, 2.0**-53)):
        for (m, theta), (m2, theta_gen) in zip(_NORMAL_THETAS[dtype], _THETAS[dtype]):
            assert m == m2 and theta >= theta_gen
            assert theta ** (m + 1) / math.factorial(m + 1) <= u * (1 + 1e-9)
            assert (theta * 1.001) ** (m + 1) / math.factorial(m + 1) > u
        assert _NORMAL_THETAS[dtype][-1][1] * 2**14 >= 32768
    eta = 0.5 * (_NORMAL_THETAS[torch.float32][1][1] + _THETAS[torch.float32][1][1])  # between the two θ_2
    assert expm_plan(eta, torch.float32, imaginary=True) == (2, 0)
    assert expm_plan(eta, torch.float32) == (4, 0)
    assert expm_plan(0.0, torch.float32, imaginary=True, min_degree=2) == (2, 0)


@pytest.mark.parametrize("rho", [1e-4, 0.01, 0.3, 2.0])
def test_truncation_reaches_the_unit_roundoff(rho: float) -> None:
    """The degree chosen for float32 leaves a truncation error below u when evaluated in float64
    (the plan of a float32 S applied to the float64 S: only the truncation differs)."""
    s = _skew(16, rho, 3)
    eta = float(skew_rho_bounds(s @ s)[0])
    m, sq = expm_plan(eta, torch.float32, imaginary=True)
    x = s / 2**sq
    t = sum(torch.linalg.matrix_power(x, k) / math.factorial(k) for k in range(m + 1))
    trunc = torch.linalg.matrix_norm(t - torch.linalg.matrix_exp(x), 2).item()
    assert trunc <= 2.0**-24


def test_rho_bounds_enclose_the_spectral_norm() -> None:
    for seed in range(5):
        s = _skew(20, 0.7, seed)
        rho = torch.linalg.matrix_norm(s, 2)
        eta, floor = skew_rho_bounds(s @ s)
        assert floor * (1 - 1e-12) <= rho <= eta * (1 + 1e-12) <= torch.linalg.matrix_norm(s) * (1 + 1e-12)
    q, _ = torch.linalg.qr(torch.randn(20, 2, generator=torch.Generator().manual_seed(9), dtype=F64))
    s = 0.3 * (q[:, :1] @ q[:, 1:].T - q[:, 1:] @ q[:, :1].T)  # rank 2, ρ = 0.3: ‖S²‖_F^{1/2} = 2^{1/4}ρ
    eta, floor = skew_rho_bounds(s @ s)
    assert floor * (1 - 1e-12) <= 0.3 <= eta <= 2**0.25 * 0.3 * (1 + 1e-12)


def test_antisym_and_its_gradient() -> None:
    p = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(12), dtype=F64).requires_grad_()
    torch.testing.assert_close(antisym(p), p - p.mT, rtol=0, atol=0)
    assert torch.autograd.gradcheck(antisym, (p,))
    assert torch.autograd.gradgradcheck(antisym, (p,))


def test_norm1_equals_matrix_norm() -> None:
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(norm1(x), torch.linalg.matrix_norm(x, ord=1), rtol=0, atol=0)


def test_skew_square_gradient_on_skew_inputs() -> None:
    """skew_square's backward is the exact derivative of P ↦ (P − Pᵀ)² (float64 gradcheck and
    gradgradcheck): the symmetric part it drops is invisible through P − Pᵀ."""
    p = torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(6), dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        s = x - x.T
        return skew_square(s) @ w

    assert torch.autograd.gradcheck(f, (p,))
    assert torch.autograd.gradgradcheck(f, (p,))
    s = (p - p.T).detach()
    torch.testing.assert_close(skew_square(s), s @ s, rtol=0, atol=0)


@pytest.mark.parametrize("rho", [0.0, 1e-5, 3e-3, 0.05, 0.5, 3.0, 40.0])
def test_gradcheck_of_the_exponential_of_a_skew_generator(rho: float) -> None:
    """float64 gradcheck of P ↦ exp(P − Pᵀ) − I at norms that pick degree 1 … 25 and squarings."""
    s = _skew(7, rho, 7)
    p = (torch.triu(s)).requires_grad_()  # S = P − Pᵀ for the upper triangle P

    def f(x: torch.Tensor) -> torch.Tensor:
        return expm_skew_host(x - x.T)[0]

    torch.testing.assert_close(f(p.detach()) + torch.eye(7, dtype=F64), torch.linalg.matrix_exp(s), rtol=0,
                               atol=1e-14 * max(1.0, rho))
    assert torch.autograd.gradcheck(f, (p,))
    assert torch.autograd.gradgradcheck(f, (p,))


@given(st.integers(2, 20), st.integers(1, 20), RHOS, st.integers(0, 10_000))
def test_dense_ow_map_equals_the_float64_exponential(n_big: int, k: int, rho: float, seed: int) -> None:
    """W = exp(aY₀ᵀ − Y₀aᵀ)·Y₀ on the dense host route, float64 and float32, against
    torch.linalg.matrix_exp in float64; W has orthonormal columns."""
    k = min(k, n_big)
    Y0 = _base(n_big, k, seed)
    a = torch.randn(n_big, k, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    S = a @ Y0.T - Y0 @ a.T
    a = a * (rho / torch.linalg.matrix_norm(S, 2).clamp_min(1e-300))
    ref = torch.linalg.matrix_exp(a @ Y0.T - Y0 @ a.T) @ Y0
    w64 = stiefel_map(a, Y0, "expm", False)
    assert (w64 - ref).norm() / math.sqrt(k) <= 1e-13 * max(1.0, rho)
    w32 = stiefel_map(a.float(), Y0.float(), "expm", False).double()
    assert (w32 - ref).norm() / math.sqrt(k) <= 2e-6 * max(1.0, rho)
    assert (w32.T @ w32 - torch.eye(k, dtype=F64)).norm() <= 2e-6


@pytest.mark.parametrize("rho", [0.0, 1e-6, 3e-4, 1e-3, 0.05, 1.0, 20.0])  # float64: degree 2, 2, 4, 6, …
@pytest.mark.parametrize("n_big,k", [(9, 9), (11, 4)])
def test_dense_ow_map_gradcheck_float64(rho: float, n_big: int, k: int) -> None:
    Y0 = _base(n_big, k, 8)
    a = torch.randn(n_big, k, generator=torch.Generator().manual_seed(9), dtype=F64)
    a = (a * rho / torch.linalg.matrix_norm(a @ Y0.T - Y0 @ a.T, 2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: stiefel_map(t, Y0, "expm", False), (a,))
    assert torch.autograd.gradgradcheck(lambda t: stiefel_map(t, Y0, "expm", False), (a,))


@pytest.mark.parametrize("dtype,rho,tol", [
    (torch.float32, 0.0, 5e-5), (torch.float32, 2e-3, 5e-5), (torch.float32, 0.03, 5e-5), (torch.float32, 0.3, 5e-5),
    (F64, 0.0, 1e-9), (F64, 1e-6, 1e-9), (F64, 3e-4, 1e-9), (F64, 1e-3, 1e-9),  # degree 2, 2, 4, 4 (6+ in float32)
])
@pytest.mark.parametrize("n_big,k", [(24, 24), (30, 7)])
def test_dense_ow_map_gradient_against_float64_matrix_exp(dtype: torch.dtype, rho: float, tol: float, n_big: int,
                                                         k: int) -> None:
    """The gradient of the dense map (closed-form backward at degree 2/4) against the float64
    gradient through torch.linalg.matrix_exp: the difference is the truncated derivative
    (≤ (m+1)·u/θ_m relative, module doc of skew_expm) plus rounding."""
    Y0 = _base(n_big, k, 14)
    a = torch.randn(n_big, k, generator=torch.Generator().manual_seed(15), dtype=F64)
    a = a * rho / torch.linalg.matrix_norm(a @ Y0.T - Y0 @ a.T, 2).clamp_min(1e-300)
    g = torch.randn(n_big, k, generator=torch.Generator().manual_seed(16), dtype=F64)
    a64 = a.clone().requires_grad_()
    (torch.linalg.matrix_exp(a64 @ Y0.T - Y0 @ a64.T) @ Y0).backward(g)
    x = a.to(dtype).requires_grad_()
    stiefel_map(x, Y0.to(dtype), "expm", False).backward(g.to(dtype))
    assert (x.grad.double() - a64.grad).norm() <= tol * a64.grad.norm()


class _CountProducts(TorchDispatchMode):
    """Counts matrix products (mm, addmm, bmm, baddbmm) and LU/solve calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "bmm", "baddbmm", "linalg_lu_factor_ex", "linalg_solve_ex", "linalg_lu_solve"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rho,products", [(0.0, 6), (2e-3, 6), (0.03, 9)])
def test_dense_map_products_per_step(rho: float, products: int) -> None:
    """Products of one forward + backward of the square dense map (n = 32, float32): the two
    with Y₀ each way, plus the exponential's — degree 2 (also at a = 0): S² forward and one
    product back (skew_square); degree 4: S², S²·R forward, 1 + 2 back. No LU, no solve."""
    Y0 = _base(32, 32, 10).float()
    a = torch.randn(32, 32, generator=torch.Generator().manual_seed(11))
    a = (a * rho / torch.linalg.matrix_norm(a @ Y0.T - Y0 @ a.T, 2)).requires_grad_()
    with _CountProducts() as count:
        stiefel_map(a, Y0, "expm", False).backward(torch.ones(32, 32))
    assert sum(count.calls.values()) == products, count.calls


def test_nan_input_gives_nan_and_is_counted() -> None:
    before = solver_stats().nonfinite
    s = torch.full((5, 5), float("nan"))
    n, _ = expm_skew_host(s)
    assert torch.isnan(n).all()
    assert solver_stats().nonfinite == before + 1


def test_fourth_power_bound_lowers_the_degree() -> None:
    """Where ‖S²‖^{1/2} puts ρ above θ₂ but ‖S⁴‖^{1/4} does not, S⁴ is formed (one product, no
    gradient) and degree 2 is used: products S², S⁴ forward, nothing else; still exp to u."""
    s = _skew(40, 1.0, 13)
    s2 = s @ s
    eta2 = skew_rho_bounds(s2)[0].item()
    s4 = s2 @ s2
    eta4 = min(torch.linalg.matrix_norm(s4).item(), norm1(s4).item()) ** 0.25
    theta2 = _NORMAL_THETAS[torch.float32][1][1]
    rho = 0.99 * theta2 / eta4  # S scaled so that η₄ < θ₂ < η₂
    x = (s * rho).float()
    assert eta2 * rho > theta2
    with _CountProducts() as count:
        n, sq = expm_skew_host(x)
    assert sq == 0 and count.calls == {"mm": 2}, count.calls
    ref = torch.from_numpy(sl.expm((s * rho).numpy())) - torch.eye(40, dtype=F64)
    assert (n.double() - ref).norm() / math.sqrt(40) <= 1e-7


@given(n=st.integers(2, 48), log_rho=st.floats(-6, 3), seed=st.integers(0, 2**16), rank=st.integers(1, 24))
def test_power_floor_is_a_lower_bound_of_the_spectral_norm(n: int, log_rho: float, seed: int, rank: int) -> None:
    """``_power_floor(S²) ≤ ‖S‖₂`` for any skew S (full or low rank, any scale), and above
    the norm floor ``λ`` of skew_rho_bounds on a low-rank S (where that one is loose)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, min(rank, n), generator=g, dtype=F64) @ torch.randn(min(rank, n), n, generator=g, dtype=F64)
    s = a - a.T
    rho = torch.linalg.matrix_norm(s, 2)
    if rho == 0:
        assert _power_floor(s @ s) == 0.0
        return
    s = s * (10.0**log_rho / rho)
    floor = _power_floor(s @ s)
    assert floor <= 10.0**log_rho * (1 + 1e-9)
    assert floor >= 0.0


def test_fourth_power_is_not_formed_where_degree_two_is_out_of_reach() -> None:
    """ρ just above θ₂ (so no bound can give degree 2): the power floor says so, and S⁴ (a
    product) is not formed — S² and the degree-4 polynomial's product only."""
    s = _skew(40, 1.0, 14)
    theta2 = _NORMAL_THETAS[torch.float32][1][1]
    x = (s * (1.5 * theta2)).float()
    with _CountProducts() as count:
        n, sq = expm_skew_host(x)
    assert sq == 0 and count.calls == {"mm": 2}, count.calls  # S², S²·T (degree 4); no S⁴
    ref = torch.from_numpy(sl.expm((s * 1.5 * theta2).numpy())) - torch.eye(40, dtype=F64)
    assert (n.double() - ref).norm() / math.sqrt(40) <= 1e-7


@given(n=st.integers(2, 40), log_rho=st.floats(-3, 2), seed=st.integers(0, 2**16))
def test_refined_bound_is_an_upper_bound_and_tighter(n: int, log_rho: float, seed: int) -> None:
    """``refine_rho_bound``: ρ ≤ result ≤ η for any skew S, and at most 1.5ρ on a 40×40 random S
    (where η = ‖S²‖^{1/2} is ≈ 1.7ρ)."""
    s = _skew(n, 10.0**log_rho, seed) if n > 1 else torch.zeros(1, 1, dtype=F64)
    s2 = s @ s
    eta = float(skew_rho_bounds(s2)[0])
    rho = float(torch.linalg.matrix_norm(s, 2))
    out = refine_rho_bound(s2, eta)
    assert rho * (1 - 1e-9) <= out <= eta * (1 + 1e-12)
    if n == 40:
        assert out <= 1.5 * rho
