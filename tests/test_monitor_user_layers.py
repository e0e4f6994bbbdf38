"""Issue 21: the κ monitor covers the user's own meta-layers (autograd.Functions with a
hand-written backward, raw torch.linalg.eigh, orthofx's modules), and a meta-layer has one name
(its module path) in the report, its JSON, the monitor's records, summary and sinks."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.monitor import ConditioningMonitor

MonitorWarning = getattr(orthofx.monitor, "MonitorWarning", UserWarning)  # new in issue 21
from orthofx.nn import DecorrelatedBatchNorm
from orthofx.syncs import cuda_policy, sync_audit

from corpora.zca import ZCA


# --------------------------------------------------------------------------- iSQRT-COV, as projects write it
class _CovPool(torch.autograd.Function):
    """Σ = X Ī Xᵀ per image, Ī = (I − 1/M)/M the centring matrix; hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        b, c, h, w = x.shape
        m = h * w
        x = x.reshape(b, c, m)
        centre = (torch.eye(m, dtype=x.dtype, device=x.device) - 1.0 / m) / m
        centre = centre.expand(b, m, m).contiguous()
        ctx.save_for_backward(x, centre)
        ctx.hw = (h, w)
        return x.bmm(centre).bmm(x.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, centre = ctx.saved_tensors
        g = grad + grad.transpose(1, 2)
        return g.bmm(x).bmm(centre).reshape(x.shape[0], x.shape[1], *ctx.hw)


class _SqrtmNS(torch.autograd.Function):
    """A^{1/2} by the coupled Newton–Schulz iteration: pre-normalise by the trace, ``iters``
    steps Y ← Y T, Z ← T Z with T = (3I − Z Y)/2, post-compensate by √tr(A). The backward runs
    the recurrence in reverse (hand-written, no autograd inside)."""

    @staticmethod
    def forward(ctx, a, iters):
        n = a.shape[-1]
        eye = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)
        tr = a.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
        y, z = a / tr, eye
        ys, zs = [], []
        for _ in range(iters):
            ys.append(y)
            zs.append(z)
            t = 0.5 * (3.0 * eye - z.bmm(y))
            y, z = y.bmm(t), t.bmm(z)
        ctx.save_for_backward(a, tr, y, *ys, *zs)
        ctx.iters = iters
        return y * tr.sqrt()

    @staticmethod
    def backward(ctx, grad):
        a, tr, y_last, *rest = ctx.saved_tensors
        k = ctx.iters
        ys, zs = rest[:k], rest[k:]
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        dy, dz = grad * tr.sqrt(), torch.zeros_like(a)
        for y, z in zip(reversed(ys), reversed(zs)):
            t = 0.5 * (3.0 * eye - z.bmm(y))
            dt = y.mT.bmm(dy) + dz.bmm(z.mT)
            dy, dz = dy.bmm(t.mT) - 0.5 * z.mT.bmm(dt), t.mT.bmm(dz) - 0.5 * dt.bmm(y.mT)
        d_tr = (grad * y_last).sum((-2, -1), keepdim=True) / (2 * tr.sqrt()) - (dy * a).sum((-2, -1), keepdim=True) / tr**2
        return dy / tr + d_tr * eye, None


class ISqrtCOV(nn.Module):
    def __init__(self, iters: int = 5) -> None:
        super().__init__()
        self.iters = iters

    def forward(self, x):
        return _SqrtmNS.apply(_CovPool.apply(x), self.iters)


class Head(nn.Module):
    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.cov_pool = ISqrtCOV()

    def forward(self, x):
        return self.cov_pool(torch.relu(self.bn(self.reduce(x)))).flatten(1)


# --------------------------------------------------------------------------- ZCA, as projects write it (corpora.zca)
class Block(nn.Module):
    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.whiten = ZCA(c)

    def forward(self, x):
        return torch.relu(self.whiten(self.conv(x)))


class Net(nn.Module):
    """A stem with orthofx's DecorrelatedBatchNorm, a block with a hand-written ZCA, an iSQRT-COV head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), DecorrelatedBatchNorm(8, eps=1e-2))
        self.layer1 = nn.Sequential(Block(8, 8))
        self.head = Head(8, 6)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(self.head(self.layer1(self.stem(x))))


NAMES = {"stem.1", "layer1.0.whiten", "head.cov_pool"}


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def _train(model, mon, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mon is not None:
        mon.attach_to(opt)
    for i in range(steps):
        x, y = _data(i)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _check_the_model_is_real():
    """Its hand-written backwards are the gradients (float64 gradcheck)."""
    torch.manual_seed(0)
    f = torch.randn(2, 4, 9, dtype=torch.float64)
    a = (f @ f.mT / 9 + 0.1 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: _SqrtmNS.apply(m, 5), (a,))
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_CovPool.apply, (x,))


@pytest.mark.parametrize("lazy", [False, True])
def test_user_meta_layers_get_kappa_keyed_by_module_path(lazy):
    _check_the_model_is_real()
    torch.manual_seed(0)
    model = Net()
    mon = ConditioningMonitor(model, every=1, example_inputs=None if lazy else (_data(9)[0],))
    assert set(mon.layer_names) == ({"stem.1"} if lazy else NAMES)
    feats: dict[str, torch.Tensor] = {}
    model.head.bn.register_forward_hook(lambda m, a, out: feats.__setitem__("head", torch.relu(out).detach()))
    model.layer1[0].conv.register_forward_hook(lambda m, a, out: feats.__setitem__("zca", out.detach()))
    _train(model, mon, steps=1)
    assert set(mon.layer_names) == NAMES and mon.skipped == {}
    recs = {r["layer"]: r for r in mon.flush() if r["kind"] == "meta"}
    assert set(recs) == NAMES

    # iSQRT-COV: Σ of each image, float64 reference; κ = median over the batch, ε unknown
    h = feats["head"].double().flatten(2)
    hc = h - h.mean(-1, keepdim=True)
    lam = torch.linalg.eigvalsh(hc @ hc.mT / h.shape[-1])
    ref = (lam[:, -1] / lam[:, 0]).median().item()
    r = recs["head.cov_pool"]
    assert r["eps"] is None and r["size"] == 6 and r["rank"] == 6
    assert r["kappa"] == pytest.approx(ref, rel=1e-3) and r["kappa_range"] == pytest.approx(ref, rel=1e-3)

    # ZCA: Σ over batch and positions (the ε the module adds is unknown to the monitor: κ(Σ))
    z = feats["zca"].double().transpose(0, 1).reshape(8, -1)
    zc = z - z.mean(1, keepdim=True)
    lam = torch.linalg.eigvalsh(zc @ zc.T)
    r = recs["layer1.0.whiten"]
    assert r["eps"] is None and r["kappa"] == pytest.approx((lam[-1] / lam[0]).item(), rel=1e-3)

    summ = mon.summary()
    assert summ["head.cov_pool"]["source"] == "captured covariance" and "ε is unknown" in summ["head.cov_pool"]["kappa_of"]
    assert summ["stem.1"]["source"] == "orthofx module" and summ["stem.1"]["eps"] == 1e-2
    assert all(torch.isfinite(torch.tensor(s["kappa_final"])) for s in summ.values())
    mon.close()


def test_model_is_untouched():
    """Analysis (at the first forward) and capture change nothing: parameters and the ZCA's
    in-place running buffers match a twin trained without a monitor, bit for bit."""
    torch.manual_seed(1)
    a = Net()
    b = copy.deepcopy(a)
    mon = ConditioningMonitor(a, every=2)
    _train(a, mon, steps=4)
    _train(b, None, steps=4)
    assert set(mon.layer_names) == NAMES == {r["layer"] for r in mon.flush() if r["kind"] == "meta"}
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    mon.close()
    assert not a._forward_hooks and not a._forward_pre_hooks


def test_no_host_sync_per_step():
    """Under the CUDA code path, a recorded step (forward, backward, optimizer step and the
    monitor's step) synchronises exactly as often as the same step without a monitor; the
    float64 eigvalsh of the captured covariances runs at the flush."""
    torch.manual_seed(2)
    base = Net()
    x, y = _data(3)

    def step(model, opt):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with cuda_policy():
        bare = copy.deepcopy(base)
        opt_b = torch.optim.SGD(bare.parameters(), lr=0.01)
        with sync_audit() as ref:
            step(bare, opt_b)
        model = copy.deepcopy(base)
        mon = ConditioningMonitor(model, every=1, example_inputs=(x,), weights=False, max_pending=100)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon.attach_to(opt)
        with sync_audit() as audit:
            step(model, opt)
        assert audit.syncs == ref.syncs, (audit.syncs, ref.syncs)
        assert len(mon._pending) == 3 and not mon.records
        with sync_audit() as flushed:
            mon.flush()
    assert flushed.syncs.get("aten._linalg_eigh", 0) == 2  # the two captured covariances
    assert {r["layer"] for r in mon.records} == NAMES


class CrossSVD(nn.Module):
    """An SVD of the cross-covariance q kᵀ of two projections (orthogonal Procrustes)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 4, bias=False)
        self.k = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        u, s, vh = torch.linalg.svd(self.q(x).T @ self.k(x))
        return x[:, :4] @ (u @ vh)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.align = CrossSVD()
        self.proj = nn.Linear(4, 5, bias=False)
        self.whiten = ZCA(5)

    def forward(self, x):
        f = self.proj(self.align(x))
        return self.whiten(f[:, :, None, None]).flatten(1)


def test_unmonitorable_layer_is_skipped_with_a_reason():
    torch.manual_seed(3)
    model = Mixed()
    x = torch.randn(16, 6)
    report = orthofx.analyze(model, (x,))
    assert set(report.meta_layers) == {"align", "whiten"}
    mon = ConditioningMonitor(model, example_inputs=(x,))
    assert mon.layer_names == ["whiten"] and "cross-covariance" in mon.skipped["align"]
    model(x)
    mon.step()
    summ = mon.summary()
    assert summ["align"] == {"skipped": mon.skipped["align"], "records": 0}
    assert summ["whiten"]["records"] == 1


def test_empty_monitor_says_what_the_analysis_found():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(MonitorWarning) as w:
        mon = ConditioningMonitor(model, example_inputs=(torch.randn(3, 4),))
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert "found no meta-layer" in mon.empty_reason and "no covariance-like product" in mon.empty_reason


def test_one_name_in_report_json_monitor_and_sinks(tmp_path):
    torch.manual_seed(4)
    model = Net()
    x = _data(5)[0]
    report = orthofx.analyze(model, (x,))
    assert set(report.meta_layers) == NAMES
    d = json.loads(report.to_json())
    assert set(d["meta_layers"]) == NAMES and {e["name"] for e in d["entries"]} == NAMES
    by_name = {e.name: e for e in report.entries}
    assert by_name["stem.1"].usage == "whitening"
    assert by_name["head.cov_pool"].node.startswith("bmm_")  # the ATen node is the detail
    assert by_name["layer1.0.whiten"].node.startswith("_linalg_eigh_")
    text = str(report)
    assert all(n in text for n in NAMES)
    seen: dict[str, float] = {}
    mon = ConditioningMonitor(model, every=1, sinks=[lambda m, step: seen.update(m)])
    _train(model, mon, steps=1)
    mon.flush()
    assert set(mon.layer_names) == NAMES == set(mon.summary())
    assert {r["layer"] for r in mon.records if r["kind"] == "meta"} == NAMES
    assert {k.split("/", 1)[1] for k in seen if k.startswith("kappa/")} == NAMES
    mon.to_jsonl(tmp_path / "k.jsonl")
    assert {r["layer"] for r in orthofx.monitor.load_records(tmp_path / "k.jsonl")} == NAMES


def test_root_forward_meta_layer_name():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4, bias=False)

        def forward(self, x):
            f = self.proj(x)
            lam, u = torch.linalg.eigh(f.T @ f / f.shape[0] + 1e-3 * torch.eye(4))
            return (f @ u) * lam.rsqrt()

    torch.manual_seed(5)
    model, x = Flat(), torch.randn(10, 3)
    report = orthofx.analyze(model, (x,))
    assert report.meta_layers == ["<root>.forward:eigh"]
    mon = ConditioningMonitor(model, example_inputs=(x,))
    assert mon.layer_names == ["<root>.forward:eigh"]
    model(x)
    mon.step()
    (rec,) = mon.flush()
    assert rec["layer"] == "<root>.forward:eigh" and rec["rank"] == 3


def test_transformed_model_of_orthofx_modules_needs_no_analysis_forward():
    """The lazy analysis (an extra forward with host reads in the first step) is skipped when
    the stored analysis of orthofx.transform saw every meta-layer and each is an orthofx module;
    a graph holding autograd.Functions (opaque to that analysis) still gets it."""
    import orthofx
    from orthofx.models import SmallResNetDBN

    gm, _ = orthofx.transform(SmallResNetDBN(1, 10), config="svd")
    mon = ConditioningMonitor(gm)
    assert not mon.pending_discovery and "nothing to capture" in mon._found and mon.layer_names == ["bn1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the transform's notes about the autograd.Functions
        opaque, _ = orthofx.transform(Net(), config="svd")
    assert ConditioningMonitor(opaque).pending_discovery
