"""The fast OW map (orthofx.treatments.stiefel, orthofx.linalg.expm host path): same function as
a float64 dense reference, exact gradients (gradcheck), the route chooser's flop model, the
norm-adaptive Taylor degree, and polish only where needed. No timing asserts."""

from __future__ import annotations

import math

import pytest
import torch

from orthofx.linalg.expm import _THETAS, expm, expm_host, expm_plan, taylor_matmuls
from orthofx.syncs import cuda_policy, sync_audit
from orthofx.treatments import stiefel
from orthofx.treatments.stiefel import choose_lowrank, route_cost, stiefel_map


def _base(n_big: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _, Vh = torch.linalg.svd(torch.randn(n_big, k, generator=g, dtype=torch.float64), full_matrices=False)
    return U @ Vh


def _reference(a: torch.Tensor, Y0: torch.Tensor, method: str) -> torch.Tensor:
    """float64 dense f(S)·Y₀ by torch.linalg (no saturation: ‖S‖₁ is in range here)."""
    a, Y0 = a.double(), Y0.double()
    S = a @ Y0.T - Y0 @ a.T
    if method == "expm":
        return torch.linalg.matrix_exp(S) @ Y0
    eye = torch.eye(S.shape[0], dtype=torch.float64)
    return torch.linalg.solve(eye - S / 2, Y0 + S @ Y0 / 2)


@pytest.mark.parametrize("k,n_big,method,expected", [
    (256, 256, "expm", False), (512, 512, "expm", False), (256, 784, "expm", True), (256, 2048, "expm", True),
    (256, 784, "cayley", True), (256, 512, "expm", False), (16, 36, "expm", True), (16, 36, "cayley", False),
])
def test_route_chooser_flop_model(k: int, n_big: int, method: str, expected: bool) -> None:
    assert choose_lowrank(k, n_big, method) is expected
    # the model: low-rank iff cheaper; square is always dense
    assert expected == (route_cost(k, n_big, method, True) < route_cost(k, n_big, method, False))


def test_route_breakeven_near_twice_k() -> None:
    """Low-rank wins for exp once n' > ≈ 2.17k (2k×2k against n'×n'), for Cayley > ≈ 2.3k."""
    k = 100
    first = {m: next(n for n in range(k, 10 * k) if choose_lowrank(k, n, m)) for m in ("expm", "cayley")}
    assert 2.0 * k < first["expm"] <= 2.2 * k
    assert 2.1 * k < first["cayley"] <= 2.5 * k


def test_plan_degree_follows_the_norm() -> None:
    assert taylor_matmuls(1) == 0 and taylor_matmuls(4) == 2 and taylor_matmuls(16) == 6 and taylor_matmuls(25) == 8
    assert expm_plan(0.0, torch.float32) == (1, 0)
    assert expm_plan(0.05, torch.float32) == (4, 0)
    # beyond θ of the top degree: the top degree's scaling (range unchanged: θ·2^14)
    assert expm_plan(2.0 * 2**14, torch.float32) == (16, 14)
    assert expm_plan(1e9, torch.float32)[1] == 14
    m, s = expm_plan(math.nan, torch.float32)
    assert (m, s) == (16, 0)
    for dtype, u in ((torch.float32, 2.0**-24), (torch.float64, 2.0**-53)):
        for m, theta in _THETAS[dtype][:-1]:  # the truncation bound at θ_m is below u
            assert theta ** (m + 1) / math.factorial(m + 1) * math.exp(2 * theta) <= u * (1 + 1e-9)


@pytest.mark.parametrize("scale", [0.0, 1e-5, 1e-3, 0.05, 0.5, 3.0, 80.0])
def test_host_expm_matches_float64_and_has_exact_gradient(scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = (scale * (x - x.T)).requires_grad_()
    torch.testing.assert_close(expm(a, sync_free=False), torch.linalg.matrix_exp(a.detach()), atol=1e-14 * max(1, scale),
                               rtol=0)
    assert torch.autograd.gradcheck(lambda t: expm(t, sync_free=False), (a,))
    for normal in (False, True):
        assert torch.autograd.gradcheck(lambda t: expm_host(t, normal_spectrum=normal)[0], (a,))


def test_normal_spectrum_bound_lowers_the_degree_for_skew() -> None:
    """ρ(S) ≤ ‖S²‖_F^{1/2} ≪ ‖S‖₁ for a 64² skew matrix of small rank: degree 2, not 4."""
    Y0 = _base(64, 8)
    a = 0.01 * torch.randn(64, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    S = (a @ Y0.T - Y0 @ a.T).float()
    n1 = float(torch.linalg.matrix_norm(S, ord=1))
    assert expm_plan(n1, torch.float32)[0] >= 4
    y, s = expm_host(S, normal_spectrum=True)
    assert s == 0
    torch.testing.assert_close(y.double(), torch.linalg.matrix_exp(S.double()), atol=2e-7, rtol=0)


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("n_big,k,lowrank", [(12, 12, False), (30, 7, True), (30, 7, False), (20, 9, True)])
@pytest.mark.parametrize("scale", [0.0, 1e-4, 0.02, 0.7, 5.0])
def test_map_is_the_float64_dense_function(method: str, n_big: int, k: int, lowrank: bool, scale: float) -> None:
    Y0 = _base(n_big, k, 5)
    a = scale * torch.randn(n_big, k, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref = _reference(a, Y0, method)
    torch.testing.assert_close(stiefel_map(a, Y0, method, lowrank), ref, atol=1e-13 * max(1, scale), rtol=0)
    w32 = stiefel_map(a.float(), Y0.float(), method, lowrank).double()
    assert (w32 - ref).norm() / ref.norm() < 2e-6 * max(1.0, scale)
    assert (w32.T @ w32 - torch.eye(k, dtype=torch.float64)).norm() < 1e-6


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 0.3, 4.0])
def test_map_gradcheck_float64(method: str, lowrank: bool, scale: float) -> None:
    Y0 = _base(10, 4, 7)
    a = (scale * torch.randn(10, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: stiefel_map(t, Y0, method, lowrank), (a,))
    with cuda_policy():  # the sync-free path: the same derivative
        assert torch.autograd.gradcheck(lambda t: stiefel_map(t, Y0, method, lowrank), (a,))


def test_polish_runs_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    step = stiefel._polish_step
    monkeypatch.setattr(stiefel, "_polish_step", lambda q, g: calls.append(1) or step(q, g))
    Y0 = _base(24, 24, 9).float()
    small = 0.01 * torch.randn(24, 24, generator=torch.Generator().manual_seed(10))
    stiefel_map(small, Y0, "expm", False)
    assert calls == []  # no squaring: exp is accurate to rounding, nothing to polish
    with cuda_policy():
        stiefel_map(small, Y0, "expm", False)
    assert len(calls) == stiefel.OW_POLISH  # sync-free: always, no host read
    calls.clear()
    w = stiefel_map(1e4 * small, Y0, "expm", False)  # squarings: checked polish, converged
    assert 1 <= len(calls) <= stiefel.OW_MAX_POLISH
    # to the polish's tolerance 4u√k (1.2e-6 here)
    assert (w.double().T @ w.double() - torch.eye(24, dtype=torch.float64)).norm() < 4 * 2**-24 * 24**0.5


@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_sync_free_path_reads_nothing_on_the_host(method: str) -> None:
    Y0 = _base(40, 8, 11).float()
    for lowrank in (False, True):
        a = (0.3 * torch.randn(40, 8, generator=torch.Generator().manual_seed(12))).requires_grad_()
        with cuda_policy(), sync_audit() as audit:
            stiefel_map(a, Y0, method, lowrank).sum().backward()
        assert audit.syncs == {}, audit.syncs
