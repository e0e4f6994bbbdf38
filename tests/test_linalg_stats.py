"""Solver failure recovery and the global SolverStats counters."""

from __future__ import annotations

import pytest
import torch

import orthofx.linalg as ol
from orthofx.errors import SolverError
from orthofx.testing.matrices import feature_covariance, random_spd


@pytest.fixture(autouse=True)
def _fresh_stats():  # type: ignore[no-untyped-def]
    ol.solver_stats().reset()
    yield
    ol.solver_stats().reset()


@pytest.mark.parametrize(
    "n_fail,expected",
    [(1, "float64"), (2, "jitter"), (3, "cpu")],
)
def test_injected_failures_float32_walk_the_chain(n_fail: int, expected: str, device: torch.device) -> None:
    a = feature_covariance((3,), 16, 6, 1e-3, seed=0, dtype=torch.float32, device=device)
    ref_lam, ref_vec = torch.linalg.eigh(a.double())
    with ol.inject_failures(n_fail):
        lam, vec = ol.eigh(a, backend="eigh")
    stats = ol.solver_stats()
    assert stats.failures == n_fail
    assert stats.fallbacks == {expected: 1}
    # still correct, and in the input's dtype/device
    assert lam.dtype == torch.float32 and lam.device.type == device.type
    torch.testing.assert_close(lam.double(), ref_lam, rtol=0, atol=1e-6)
    rec = (vec.double() * lam.double().unsqueeze(-2)) @ vec.double().mT
    torch.testing.assert_close(rec, a.double(), rtol=0, atol=1e-5)


def test_float64_input_skips_the_float64_step() -> None:
    a = random_spd((2,), 8, cond=1e3, seed=1)
    ref = torch.linalg.eigvalsh(a)
    with ol.inject_failures(1):
        lam = ol.eigvalsh(a)
    assert ol.solver_stats().fallbacks == {"jitter": 1}
    # jitter is shifted back: accurate to float64 rounding
    torch.testing.assert_close(lam, ref, rtol=0, atol=1e-13)
    with ol.inject_failures(2):
        lam = ol.eigvalsh(a)
    assert ol.solver_stats().fallbacks == {"jitter": 1, "cpu": 1}
    assert ol.solver_stats().failures == 3
    torch.testing.assert_close(lam, ref, rtol=0, atol=1e-12)


def test_exhausted_chain_raises_solver_error() -> None:
    a = random_spd((2,), 5, seed=2, dtype=torch.float32)
    with ol.inject_failures(4), pytest.raises(SolverError):
        ol.eigh(a)
    assert ol.solver_stats().failures == 4
    assert ol.solver_stats().fallbacks == {}


def test_recovery_inside_sqrtm_and_its_gradient() -> None:
    a = feature_covariance((2,), 12, 5, 1e-3, seed=3)
    g = torch.randn(2, 12, 12, dtype=torch.float64)
    x_ref = a.clone().requires_grad_()
    (ol.sqrtm(x_ref) * g).sum().backward()
    x = a.clone().requires_grad_()
    with ol.inject_failures(1):  # float64 input: jitter
        y = ol.sqrtm(x)
    (y * g).sum().backward()
    assert ol.solver_stats().as_dict() == {"failures": 1, "fallbacks": {"jitter": 1}, "nonfinite": 0}
    torch.testing.assert_close(y, ol.sqrtm(a), rtol=1e-9, atol=1e-10)
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-7, atol=1e-7)


def test_svd_route_failure_falls_back_to_eigh(device: torch.device) -> None:
    a = random_spd((2,), 6, seed=4, device=device)
    with ol.inject_failures(1):
        lam, _ = ol.eigh(a, backend="svd")
    assert ol.solver_stats().failures == 1 and ol.solver_stats().fallbacks == {"svd->eigh": 1}
    torch.testing.assert_close(lam.cpu(), torch.linalg.eigvalsh(a.cpu()))


def test_polar_svd_failure_recovers() -> None:
    g = torch.randn(3, 7, 4)
    ref = ol.polar(g, method="svd")
    with ol.inject_failures(1):
        q = ol.polar(g, method="svd")
    assert ol.solver_stats().fallbacks == {"float64": 1}
    torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-5)


def test_condition_number_recovers() -> None:
    a = random_spd((2,), 6, cond=1e4, seed=5, dtype=torch.float32)
    with ol.inject_failures(1):
        k = ol.condition_number(a)
    assert ol.solver_stats().failures == 1
    torch.testing.assert_close(k, ol.condition_number(a))


def test_nonfinite_input_without_validation_gives_nan_only_there(device: torch.device) -> None:
    a = random_spd((3,), 5, seed=6, device=device)
    a[1, 0, 0] = float("nan")
    lam, vec = ol.eigh(a, validate=False, backend="eigh")
    assert bool(torch.isnan(lam[1]).all())
    torch.testing.assert_close(lam[[0, 2]], torch.linalg.eigvalsh(a[[0, 2]]))
    y = ol.invsqrtm(a, validate=False, eps=1e-3)
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isfinite(y[[0, 2]]).all())
    assert ol.solver_stats().nonfinite == 2  # one eigh element, one invsqrtm element
    k = ol.condition_number(a, validate=False)
    assert bool(torch.isnan(k[1])) and bool(torch.isfinite(k[[0, 2]]).all())


def test_nonfinite_counter_is_lazy_device_tensor(device: torch.device) -> None:
    stats = ol.solver_stats()
    a = random_spd((4,), 5, seed=7, device=device)
    ol.eigh(a)
    # the accumulator lives on the input's device: nothing was read back
    accs = list(stats._nonfinite_acc.values())
    assert accs and all(t.device.type == device.type for t in accs)
    assert stats.nonfinite == 0
    stats.track_nonfinite = False
    try:
        bad = a.clone()
        bad[0, 0, 0] = float("inf")
        ol.eigh(bad, validate=False)
        assert stats.nonfinite == 0
    finally:
        stats.track_nonfinite = True


def test_reset_and_as_dict() -> None:
    stats = ol.solver_stats()
    with ol.inject_failures(1):
        ol.eigvalsh(random_spd((1,), 3, seed=8, dtype=torch.float32))
    d = stats.as_dict()
    assert d == {"failures": 1, "fallbacks": {"float64": 1}, "nonfinite": 0}
    stats.reset()
    assert stats.as_dict() == {"failures": 0, "fallbacks": {}, "nonfinite": 0}
    assert ol.solver_stats() is stats


def test_injection_does_not_leak_out_of_the_block() -> None:
    with ol.inject_failures(3):
        ol.covariance(torch.randn(3, 5))  # no solver call: nothing consumed
    ol.eigvalsh(random_spd((1,), 3, seed=9, dtype=torch.float32))
    assert ol.solver_stats().failures == 0


def test_fake_tensors_never_reach_the_global_counters():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from orthofx.linalg import invsqrtm, solver_stats

    stats = solver_stats()
    before = stats.nonfinite
    with FakeTensorMode() as mode:
        a = mode.from_tensor(torch.eye(3).expand(2, 3, 3).clone())
        invsqrtm(a, validate=False)
    assert stats.nonfinite == before  # reading the counters works (no fake tensor inside)
