"""The stable rewrite at the smallest enclosing submodule, on ZCA code written the usual ways
(issue 21 item 1): the root container and the user's other modules stay their own objects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.nn.stable import StableDecomposition

from corpora import zca
from corpora.zca import Whiten


class ZCA(zca.ZCA):
    """The shared running-statistics ZCA with one more buffer, registered and never used."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.register_buffer("unused_stat", torch.zeros(c))


def _seq(whiten: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), whiten, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).double()


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).square().sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stables(m: nn.Module) -> list[str]:
    return [n for n, s in m.named_modules() if isinstance(s, StableDecomposition)]


@pytest.mark.parametrize("whiten", [ZCA, Whiten], ids=["running-buffers", "parameter-free"])
def test_swap_at_the_submodule_keeps_the_root_and_the_users_module(whiten: type) -> None:
    model, x = _seq(whiten(6)) if whiten is ZCA else _seq(whiten()), _x()
    before = copy.deepcopy(model.state_dict())
    gm, report = orthofx.transform(model, (x,), config="svd")
    # ZCA (in-place no_grad updates, a self.training branch) is kept and its eigh answered at run
    # time; the stateless Whiten becomes a GraphModule of its own trace (eigh + U Λ^-1/2 Uᵀ fused)
    assert type(gm) is nn.Sequential and type(gm[0]) is nn.Conv2d, report.notes
    assert (type(gm[1]) is whiten) == (whiten is ZCA), report.notes
    assert report.plan.swaps and all(s.scope == "1" for s in report.plan.swaps), report.notes
    assert any("stable rewrite" in n and "verified" in n for n in report.notes), report.notes
    assert _stables(gm) or whiten is Whiten
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    assert not _stables(model)
    # state after a train step equals the original's (float64 reference), eval outputs too
    ref = copy.deepcopy(model)
    got, want = _step(gm, x), _step(ref, x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
    gm.eval(), ref.eval()
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-9, atol=1e-12)
    # the root container's own methods are still there
    gm.append(nn.Identity())
    del gm[-1]
    plain = orthofx.strip(gm)
    assert not _stables(plain) and "forward" not in plain[1].__dict__
    fresh = _seq(whiten(6)) if whiten is ZCA else _seq(whiten())
    fresh.load_state_dict(plain.state_dict(), strict=True)


def test_running_buffers_are_kept_with_the_unused_one_and_replay_round_trips() -> None:
    model, x = _seq(ZCA(6)), _x()
    gm, report = orthofx.transform(model, (x,), config="svd")
    assert set(gm.state_dict()) == set(model.state_dict())  # unused_stat kept
    # the swap is made (at the ZCA module, which is kept: its raw eigh answered at run time)
    assert [(s.scope, s.via) for s in report.plan.swaps] == [("1", "call")], report.notes
    assert _stables(gm) and type(gm[1]) is ZCA
    back = orthofx.load_checkpoint(_seq(ZCA(6)), orthofx.export.checkpoint(gm))
    assert type(back) is nn.Sequential and type(back[1]) is ZCA and _stables(back) == _stables(gm)
    assert [s.to_dict() for s in orthofx.pipeline.plan_of(back).swaps] == [s.to_dict() for s in report.plan.swaps]
    gm.eval(), back.eval()
    torch.testing.assert_close(back(x), gm(x), rtol=0, atol=0)


class _Sqrt(torch.autograd.Function):
    """iSQRT-style Newton–Schulz square root with a hand-written backward (identity-like)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = a.shape[-1]
        norm = a.norm()
        y, z = a / norm, torch.eye(n, dtype=a.dtype)
        for _ in range(5):
            t = 0.5 * (3.0 * torch.eye(n, dtype=a.dtype) - z @ y)
            y, z = y @ t, t @ z
        ctx.save_for_backward(a)
        return y * norm.sqrt()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class ISqrtHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(3, 5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.reduce(x).flatten(2)[0]
        cov = f @ f.t() / f.shape[1] + 1e-3 * torch.eye(5, dtype=f.dtype)
        return _Sqrt.apply(cov).sum().reshape(1)


def test_isqrt_function_head_is_treated_without_a_swap() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ISqrtHead()).double()
    x = _x()[:1]
    gm, report = orthofx.transform(model, (x,), config="ow")
    assert [p.param for p in report.plan.producers] == ["0.reduce.weight"], report
    assert not report.plan.swaps and type(gm) is nn.Sequential
    # the Function's meta-layer has one name, the module path where it runs, and the monitor
    # records its κ under that name (the covariance captured where it is formed; ε unknown)
    assert report.analysis.meta_layers == ["0"]
    mon = orthofx.ConditioningMonitor(gm, every=1, example_inputs=(x,))
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    mon.attach_to(opt)
    gm(x).sum().backward()
    opt.step()
    (rec,) = [r for r in mon.flush() if r["kind"] == "meta"]
    with torch.no_grad():
        f = gm[0].reduce(x).flatten(2)[0].double()
    lam = torch.linalg.eigvalsh(f @ f.t())  # 5 channels of a 1×1 conv of 3: rank 3
    assert rec["layer"] == "0" and (rec["size"], rec["rank"]) == (5, 3)
    assert rec["kappa_range"] == pytest.approx((lam[-1] / lam[-3]).item(), rel=1e-3)
    mon.close()
