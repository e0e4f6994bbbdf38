"""CovariancePooling / DecorrelatedBatchNorm (issue 12): input dtype in = dtype out, integer
input → DTypeError naming the module, no host sync per forward by default, and
``torch.export.export`` / ``torch.compile(fullgraph=True)`` on every backend and route."""

from __future__ import annotations

import pytest
import torch

from orthofx.errors import ConfigError, DTypeError, InputError, OrthofxError
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm
from orthofx.syncs import cuda_policy, sync_audit

def _gcp(backend: str, reduced: int | None = None, output: str = "triu") -> CovariancePooling:
    torch.manual_seed(0)
    return CovariancePooling(8, reduced, backend=backend, output=output).eval()


def _dbn(backend: str, running: str, train: bool, groups: int = 2) -> DecorrelatedBatchNorm:
    torch.manual_seed(0)
    return DecorrelatedBatchNorm(8, groups, backend=backend, running=running).train(train)


GCP_ROUTES = [
    pytest.param(b, r, o, id=f"{b}-red{r}-{o}")
    for b in ("auto", "eigh", "svd", "ns", "gram")
    for r, o in ((None, "triu"), (4, "full"))
]
DBN_ROUTES = [
    pytest.param(b, run, tr, id=f"{b}-{run}-{'train' if tr else 'eval'}")
    for b in ("auto", "eigh", "svd", "ns")
    for run in ("whitening", "covariance")
    for tr in (True, False)
]


def _x(n: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 8, 3, 3, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "eigh", "svd", "ns", "gram"])
def test_meta_layers_return_the_input_dtype(backend: str, dtype: torch.dtype) -> None:
    """Half-precision features in, the same dtype out, computed in float32 (or float64) inside:
    equal to the float32 result of the same (rounded) features to the output's rounding."""
    x = _x(dtype=dtype)
    m = _gcp(backend)
    y, ref = m(x), m(x.float())
    assert y.dtype == dtype
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    if backend == "gram":
        return
    for running in ("whitening", "covariance"):
        dbn = _dbn(backend, running, True)
        y, ref = dbn(x), dbn(x.float())
        assert y.dtype == dtype and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
        assert dbn.eval()(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input_raises_dtype_error_naming_the_module(dtype: torch.dtype) -> None:
    x = _x().to(dtype) if dtype != torch.bool else _x() > 0
    for m, name in (
        (_gcp("auto"), "CovariancePooling"),
        (_gcp("gram", reduced=4), "CovariancePooling"),
        (_dbn("auto", "whitening", True), "DecorrelatedBatchNorm"),
    ):
        with pytest.raises(DTypeError, match=name) as info:
            m(x)
        assert "float" in str(info.value)


def test_errors_are_orthofx_errors_naming_the_module_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="CovariancePooling.*eps=1e-5"):
        CovariancePooling(8, backend="gram", eps=0.0)
    with pytest.raises(ConfigError, match="CovariancePooling.*output"):
        CovariancePooling(8, output="diag")
    with pytest.raises(ConfigError, match="DecorrelatedBatchNorm.*groups"):
        DecorrelatedBatchNorm(8, 3)
    with pytest.raises(InputError, match="CovariancePooling.*spatial"):
        CovariancePooling(8)(torch.randn(2, 8))
    with pytest.raises(InputError, match=r"DecorrelatedBatchNorm.*\.eval\(\)"):
        DecorrelatedBatchNorm(8)(torch.randn(1, 8))
    x = _x()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"CovariancePooling\(\.\.\., validate=False\)") as info:
        _gcp("ns")(x)
    assert isinstance(info.value, OrthofxError)
    m = CovariancePooling(8, backend="ns", validate=False)
    assert torch.isnan(m(x)[0]).any()  # the option exists and skips the check


@pytest.mark.parametrize("backend", ["ns", "gram", "eigh"])
def test_covariance_pooling_forward_does_not_synchronise_by_default(backend: str) -> None:
    """On the CUDA path (cuda_policy) the NaN check is skipped: no ``.item()`` per forward;
    ``validate=True`` still checks (one sync)."""
    x = _x()
    m = _gcp(backend)
    with cuda_policy(), sync_audit() as audit:
        m(x)
    assert "aten._local_scalar_dense" not in audit.syncs, audit.syncs
    strict = CovariancePooling(8, backend=backend, validate=True)
    with cuda_policy(), sync_audit() as audit:
        strict(x)
    assert audit.syncs.get("aten._local_scalar_dense") == 1


def _check_export_and_compile(m: torch.nn.Module, x: torch.Tensor) -> None:
    import copy

    import torch._dynamo

    eager = copy.deepcopy(m)(x)
    exported = torch.export.export(copy.deepcopy(m), (x,))
    out = exported.module()(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(m), backend="eager", fullgraph=True)  # raises on a graph break
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,reduced,output", GCP_ROUTES)
def test_covariance_pooling_exports_and_compiles(backend: str, reduced: int | None, output: str) -> None:
    _check_export_and_compile(_gcp(backend, reduced, output), _x(2))


@pytest.mark.parametrize("backend,running,train", DBN_ROUTES)
def test_decorrelated_bn_exports_and_compiles(backend: str, running: str, train: bool) -> None:
    m = _dbn(backend, running, True)
    m(_x(8))  # running statistics that are not the identity
    m.train(train)
    _check_export_and_compile(m, _x(4))


class _SqrtmSVD(torch.nn.Module):
    def __init__(self, inverse: bool = False) -> None:
        super().__init__()
        self.inverse = inverse

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        from orthofx import linalg

        fn = linalg.invsqrtm if self.inverse else linalg.sqrtm
        return fn(a, backend="svd", eps=1e-3, validate=False)


def _svd_batch() -> torch.Tensor:
    """Two symmetric 5×5 matrices: an SPD one the SVD route accepts, and one with a ±2 pair,
    whose SVD mixes the two eigenvectors (the route's fallback recomputes it with eigh)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(2, 5, 5, generator=g, dtype=torch.float64))
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [-2.0, 2.0, 1.0, 0.5, 3.0]], dtype=torch.float64)
    return (q * d.unsqueeze(-2)) @ q.mT


@pytest.mark.parametrize("inverse", [False, True])
def test_svd_route_fallback_is_a_graph_branch_under_export_and_compile(inverse: bool) -> None:
    """``eigh_via_svd``'s fallback check is a ``torch.cond`` while traced: export and
    ``compile(fullgraph=True)`` succeed and give eager mode's values — forward and gradient —
    both when the fallback is taken (the ±λ element) and when it is not."""
    import torch._dynamo

    from orthofx.linalg import solver_stats

    a = _svd_batch()
    solver_stats().reset()
    m = _SqrtmSVD(inverse)
    eager = m(a)
    assert solver_stats().fallbacks.get("svd->eigh") == 1  # the second element fell back in eager mode
    good = a[:1].expand(2, 5, 5).clone()
    exported = torch.export.export(m, (a,)).module()
    for inp in (a, good):
        torch.testing.assert_close(exported(inp), m(inp), rtol=1e-10, atol=1e-12)
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(_SqrtmSVD(inverse), backend=backend, fullgraph=True)
        for inp in (a, good):
            x_ref = inp.clone().requires_grad_(True)
            x_c = inp.clone().requires_grad_(True)
            ref, out = m(x_ref), compiled(x_c)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=ref.dtype)
            (ref * w).sum().backward()
            (out * w).sum().backward()
            torch.testing.assert_close(x_c.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    assert torch.isfinite(eager).all()
