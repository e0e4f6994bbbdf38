"""Issue 21: the report says so when a decomposition's outputs are ``.detach()``-ed (or used
under ``torch.no_grad()``) before they reach the model's outputs: no gradient flows back
through it, so treating its Pre-SVD layer cannot change its backward. Per meta-layer, in the
text and the JSON, from the recorded analysis and the symbolic one."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import orthofx

from corpora.zca import ZCA


class EighSqrtInv(torch.autograd.Function):
    """Σ^{-1/2} by eigh with the Daleckii–Krein backward written by hand."""

    @staticmethod
    def forward(ctx, cov):
        lam, u = torch.linalg.eigh(cov)
        lam = lam.detach()  # inside a Function: the hand-written backward below is what runs
        ctx.save_for_backward(lam, u)
        return u @ torch.diag_embed(lam.rsqrt()) @ u.mT

    @staticmethod
    def backward(ctx, g):
        lam, u = ctx.saved_tensors
        f = lam.rsqrt()
        diff = lam[..., :, None] - lam[..., None, :]
        fdiff = f[..., :, None] - f[..., None, :]
        same = diff.abs() < 1e-12
        k = torch.where(same, -0.5 * lam[..., :, None].pow(-1.5).expand_as(diff), fdiff / diff.where(~same, 1.0))
        gs = u.mT @ ((g + g.mT) / 2) @ u
        return u @ (k * gs) @ u.mT


class FunctionWhiten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xf = x.transpose(0, 1).reshape(c, -1)
        xc = xf - xf.mean(1, keepdim=True)
        wm = EighSqrtInv.apply(xc @ xc.t() / xc.shape[1] + 1e-3 * torch.eye(c, dtype=x.dtype))
        return (wm @ xc).reshape(c, n, h, w).transpose(0, 1)


def _net(whiten: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), whiten, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double()


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _cut(report) -> list[str]:
    return [n for e in report.entries for n in e.notes if n.startswith("no gradient flows back")]


def test_the_hand_written_backward_is_the_gradient() -> None:
    f = torch.randn(4, 20, dtype=torch.float64)
    a = (f @ f.T / 20 + 0.1 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: EighSqrtInv.apply((m + m.T) / 2), (a,))  # eigh reads one triangle


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_a_detached_decomposition_is_said_in_text_and_json(how: str) -> None:
    model = _net(ZCA(6, how=how))
    # the decomposition's backward really does not run: no gradient reaches the conv through it
    report = orthofx.analyze(model, _x())
    assert report.producers == ["0"], str(report)
    (note,) = _cut(report)
    assert "_linalg_eigh" in note and ("detach" in note if how == "detach" else "no_grad" in note)
    assert "cannot change this decomposition's backward" in note
    text = str(report)
    assert "meta-layer notes:" in text and f"  - 2: {note}" in text
    assert json.loads(report.to_json())["entries"][0]["notes"] == [note]


@pytest.mark.parametrize("whiten", [lambda: ZCA(6, how="live"), FunctionWhiten], ids=["running-stats-detached", "function"])
def test_a_live_decomposition_has_no_such_note(whiten) -> None:
    # the running buffer takes wm.detach(), the output uses wm: the backward runs; and inside a
    # user Function the hand-written backward runs whatever its forward detaches
    report = orthofx.analyze(_net(whiten()), _x())
    assert report.producers == ["0"] and _cut(report) == [], str(report)
    assert json.loads(report.to_json())["entries"][0]["notes"] == []


class TracedWhiten(nn.Module):
    """Symbolically traceable: eigh of the batch covariance, its whitening matrix detached."""

    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(0, keepdim=True)
        lam, u = torch.linalg.eigh(xc.T @ xc / 16 + 1e-3 * torch.eye(6, dtype=x.dtype))
        wm = u @ torch.diag_embed(lam.rsqrt()) @ u.T
        return xc @ (wm.detach() if self.detach else wm)


@pytest.mark.parametrize("detach", [True, False])
def test_symbolic_analysis_says_it_too(detach: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), TracedWhiten(detach), nn.Linear(6, 2))
    report = orthofx.analyze(model)  # no example inputs: torch.fx
    assert report.producers == ["0"], str(report)
    assert len(_cut(report)) == int(detach), str(report)
    if detach:
        assert "torch.linalg.eigh" in _cut(report)[0]
