"""Bad input handling shared by every orthofx.linalg function."""

from __future__ import annotations

import pytest
import torch

import orthofx.linalg as ol
from orthofx.errors import ConfigError, DTypeError, InputError
from orthofx.testing.matrices import random_spd

SQUARE_FNS = {
    "eigh": lambda a, **kw: ol.eigh(a, **kw),
    "eigvalsh": lambda a, **kw: ol.eigvalsh(a, **kw),
    "sqrtm": lambda a, **kw: ol.sqrtm(a, **kw),
    "invsqrtm": lambda a, **kw: ol.invsqrtm(a, **kw),
    "sqrtm_ns": lambda a, **kw: ol.sqrtm(a, backend="ns", **kw),
    "condition_number": lambda a, **kw: ol.condition_number(a, **kw),
}
ALL_FNS = {**SQUARE_FNS, "polar": lambda a, **kw: ol.polar(a, **kw), "covariance": lambda a, **kw: ol.covariance(a, **kw)}


@pytest.mark.parametrize("name", sorted(ALL_FNS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype_raises_dtype_error(name: str, dtype: torch.dtype) -> None:
    a = torch.ones(2, 3, 3).to(dtype)
    with pytest.raises(DTypeError):
        ALL_FNS[name](a)


@pytest.mark.parametrize("name", sorted(SQUARE_FNS))
def test_non_square_raises_input_error(name: str) -> None:
    with pytest.raises(InputError):
        SQUARE_FNS[name](torch.randn(2, 3, 4))


@pytest.mark.parametrize("name", sorted(ALL_FNS))
def test_one_dim_raises_input_error(name: str) -> None:
    with pytest.raises(InputError):
        ALL_FNS[name](torch.randn(5))


@pytest.mark.parametrize("name", sorted(ALL_FNS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises_when_validating(name: str, bad: float) -> None:
    a = random_spd((2,), 4, seed=1, dtype=torch.float32)
    a[1, 2, 2] = bad
    with pytest.raises(InputError):
        ALL_FNS[name](a)


def test_error_types_are_standard_exceptions() -> None:
    assert issubclass(InputError, ValueError)
    assert issubclass(DTypeError, TypeError)


def test_empty_batch_shapes(device: torch.device) -> None:
    a = torch.empty(0, 5, 5, device=device)
    lam, vec = ol.eigh(a)
    assert lam.shape == (0, 5) and vec.shape == (0, 5, 5)
    assert ol.eigvalsh(a).shape == (0, 5)
    assert ol.sqrtm(a, eps=1e-3).shape == (0, 5, 5)
    y, lam2 = ol.invsqrtm(a, return_eigenvalues=True)
    assert y.shape == (0, 5, 5) and lam2.shape == (0, 5)
    assert ol.sqrtm(a, backend="ns").shape == (0, 5, 5)
    k = ol.condition_number(a)
    assert k.shape == (0,) and k.dtype == torch.float64
    assert ol.polar(torch.empty(3, 0, 4, 6, device=device)).shape == (3, 0, 4, 6)
    assert ol.covariance(torch.empty(0, 5, 7, device=device)).shape == (0, 5, 5)
    # outputs keep device and dtype
    assert vec.device.type == device.type and vec.dtype == torch.float32


def test_covariance_without_samples_raises() -> None:
    with pytest.raises(InputError):
        ol.covariance(torch.randn(2, 4, 0))


@pytest.mark.parametrize(
    "call",
    [
        lambda a: ol.eigh(a, backend="magma"),
        lambda a: ol.eigh(a, taylor_degree=-1),
        lambda a: ol.sqrtm(a, backend="pade"),
        lambda a: ol.sqrtm(a, eps=-1.0),
        lambda a: ol.invsqrtm(a, backend="ns", iters=0),
        lambda a: ol.sqrtm(a, compute_dtype=torch.float16),
        lambda a: ol.polar(a, method="qr"),
        lambda a: ol.polar(a, method="ns", steps=-1),
        lambda a: ol.covariance(a, eps=float("nan")),
    ],
)
def test_bad_options_raise_config_error(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        call(random_spd((1,), 3, dtype=torch.float32))


@pytest.mark.parametrize("name", ["eigh", "eigvalsh", "sqrtm", "invsqrtm", "sqrtm_ns", "condition_number"])
def test_non_symmetric_input_is_symmetrised(name: str) -> None:
    a = random_spd((3,), 5, cond=20.0, seed=2)
    skew = torch.randn(3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    skew = skew - skew.mT
    out_sym = SQUARE_FNS[name](a)
    out_non = SQUARE_FNS[name](a + 0.1 * skew)
    for x, y in zip(out_sym if isinstance(out_sym, tuple) else (out_sym,),
                    out_non if isinstance(out_non, tuple) else (out_non,)):
        if name == "eigh" and x.dim() == 3:  # eigenvectors: compare up to sign
            x, y = x.abs(), y.abs()
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_symmetrisation_gradient_is_symmetric() -> None:
    a = random_spd((2,), 4, cond=5.0, seed=4)
    a = (a + 0.05 * torch.randn(2, 4, 4, dtype=torch.float64)).requires_grad_()
    w = torch.randn(2, 4, 4, dtype=torch.float64)
    (ol.sqrtm(a) * w).sum().backward()
    assert a.grad is not None
    torch.testing.assert_close(a.grad, a.grad.mT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype, device: torch.device) -> None:
    a64 = random_spd((2,), 6, cond=10.0, seed=5)
    a = a64.to(device=device, dtype=dtype)
    ref = ol.sqrtm(a.double(), validate=True)
    out = ol.sqrtm(a)
    assert out.dtype == dtype
    lam, vec = ol.eigh(a)
    assert lam.dtype == dtype and vec.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    q = ol.polar(a[..., :4], method="svd")
    assert q.dtype == dtype


def test_autocast_is_disabled_inside(device: torch.device) -> None:
    a = random_spd((2,), 8, cond=1e3, seed=6, dtype=torch.float32, device=device)
    ref = ol.invsqrtm(a)
    dt = torch.bfloat16 if device.type == "cpu" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dt):
        out = ol.invsqrtm(a)
        out_ns = ol.sqrtm(a, backend="ns")
        lam, _ = ol.eigh(a)
        cov = ol.covariance(torch.randn(2, 8, 20, device=device))
    assert out.dtype == torch.float32 and out_ns.dtype == torch.float32
    assert lam.dtype == torch.float32 and cov.dtype == torch.float32
    torch.testing.assert_close(out, ref)
