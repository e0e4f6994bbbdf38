"""TorchScript and tracing of stripped models, for every preset (issue 23).

A stripped model whose meta-layer is the user's own torch code scripts and traces like the
original. A stripped model holding orthofx.nn's DecorrelatedBatchNorm and CovariancePooling
scripts too (their TorchScript path calls the ``torch.ops.orthofx`` operators): the scripted
model gives the eager model's outputs in eval and train mode, updates the running statistics
alike and survives ``torch.jit.save``/``load``; it also traces. float32 throughout, compared
with atol = rtol = 1e-5. Module-level checks (float64, gradients): tests/test_nn_script_modules.py.
Modules that ``strip`` removes (the fused ExactSpectral) still refuse ``torch.jit.script`` with a
:class:`~orthofx.errors.ScriptingError`."""


import copy
import io
import warnings

import pytest
import torch
from torch import Tensor, nn

import orthofx
from orthofx.config import PRESETS
from orthofx.errors import ScriptingError


class ZCA(nn.Module):
    """A user's ZCA whitening written in TorchScript-compatible torch code (raw eigh). This file
    has no ``from __future__ import annotations``: with it, the string annotation ``Tensor``
    becomes ``_Tensor_`` in a torch.fx GraphModule's code, which TorchScript cannot resolve
    (torch's limitation, also for a plain ``torch.fx.symbolic_trace`` of this module)."""

    def __init__(self, eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        f = x.permute(1, 0, 2, 3).reshape(c, b * h * w)
        f = f - f.mean(1, keepdim=True)
        cov = f @ f.t() / f.shape[1] + self.eps * torch.eye(c, dtype=x.dtype, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        wm = u @ torch.diag(lam.clamp_min(self.eps).rsqrt()) @ u.t()
        return (wm @ f).reshape(c, b, h, w).permute(1, 0, 2, 3)


def _raw() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), ZCA(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 4))


def _orthofx_modules() -> nn.Module:
    """Both orthofx.nn meta-layers of a stripped model: DBN after a stem, GCP (with its 1x1
    reduction, a Pre-SVD layer inside it) as the head."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(6), nn.ReLU(),
                         orthofx.nn.CovariancePooling(6, reduced=4), nn.Linear(10, 4))


def _stripped(build, config) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 7, 7)
    gm, report = orthofx.transform(build(), (x,), config=config)
    assert report.producers, config
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    orthofx.attach(opt, gm)
    gm(x).square().mean().backward()
    opt.step()
    return orthofx.strip(gm).eval(), x


def _quiet_jit():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* is deprecated in favour of export
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    return ctx


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stripped_user_code_scripts_and_traces(preset: str) -> None:
    plain, x = _stripped(_raw, preset)
    ctx = _quiet_jit()
    try:
        scripted = torch.jit.script(plain)
        traced = torch.jit.trace(plain, (x,))
    finally:
        ctx.__exit__(None, None, None)
    want = plain(x)
    torch.testing.assert_close(scripted(x), want)
    torch.testing.assert_close(traced(x), want)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    want = dict(a.named_buffers())
    got = dict(b.named_buffers())
    assert want.keys() == got.keys()
    for name, buf in want.items():
        torch.testing.assert_close(got[name], buf, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stripped_orthofx_modules_script_and_trace(preset: str) -> None:
    plain, x = _stripped(_orthofx_modules, preset)
    assert isinstance(plain.get_submodule("1"), orthofx.nn.DecorrelatedBatchNorm)
    ctx = _quiet_jit()
    try:
        scripted = torch.jit.script(copy.deepcopy(plain))
        traced = torch.jit.trace(plain, (x,))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    finally:
        ctx.__exit__(None, None, None)
    want = plain(x)
    for got in (scripted(x), traced(x), loaded(x)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # train mode: the same outputs and the same running statistics (DBN's and the reduction's BN)
    eager = copy.deepcopy(plain).train()
    loaded.train()
    x2 = torch.randn(8, 3, 7, 7)
    for inp in (x, x2):
        torch.testing.assert_close(loaded(inp), eager(inp), atol=1e-5, rtol=1e-5)
    _assert_same_state(eager, loaded)
    assert int(eager.get_submodule("1").num_batches_tracked) == int(plain.get_submodule("1").num_batches_tracked) + 2


def test_kept_fused_module_refuses_script_clearly() -> None:
    """strip(keep_stable=True) keeps the fused ExactSpectral of a user's eigh + U f(Λ) Uᵀ, which
    has no TorchScript path: the error names it and the alternatives."""
    plain = orthofx.strip(orthofx.transform(_raw(), (torch.randn(8, 3, 7, 7),), config="svd")[0], keep_stable=True)
    assert any(type(m).__name__ == "ExactSpectral" for m in plain.modules())
    ctx = _quiet_jit()
    try:
        with pytest.raises(ScriptingError, match=r"ExactSpectral cannot be compiled by torch\.jit\.script.*"
                                                 r"orthofx\.strip.*torch\.jit\.trace"):
            torch.jit.script(plain)
    finally:
        ctx.__exit__(None, None, None)


def test_soc_models_are_not_stripped() -> None:
    from orthofx.errors import TreatmentError

    torch.manual_seed(0)
    x = torch.randn(8, 3, 7, 7)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(6))
    gm, _ = orthofx.transform(model, (x,), config=orthofx.OrthoConfig("ow", ow_method="soc"))
    with pytest.raises(TreatmentError, match="soc"):
        orthofx.strip(gm)
    pytest.skip("ow_method='soc' cannot be stripped (an orthogonal convolution is not one kernel of the "
                "layer's shape), so there is no plain model to script or trace")


def test_stripped_covariance_pooling_exports_without_the_eigenvalue_warning() -> None:
    """The monitor's recording flag travels with the copy; export/trace no longer assigns the
    ``orthofx_last_eigenvalues`` tensor attribute (torch warned it must be a buffer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), orthofx.nn.CovariancePooling(8, reduced=4), nn.Linear(10, 3))
    x = torch.randn(4, 3, 8, 8)
    gm, _ = orthofx.transform(model, (x,), config="ow")
    mon = orthofx.ConditioningMonitor(gm, every=1)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    mon.attach_to(opt)
    gm(x).sum().backward()
    opt.step()
    plain = orthofx.strip(gm).eval()
    assert plain[1].orthofx_record  # the copy still records in eager mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ep = torch.export.export(plain, (x,))
    assert not [w for w in caught if "orthofx_last_eigenvalues" in str(w.message)]
    torch.testing.assert_close(ep.module()(x), plain(x))
    assert plain[1].orthofx_last_eigenvalues is not None  # eager forward still records
