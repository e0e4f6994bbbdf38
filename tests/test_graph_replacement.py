"""Issue 21: when no swap can be made (a meta-layer in a user autograd.Function, a
Newton–Schulz loop), the report names the orthofx.nn module with its maths and the arguments
read from the user's module (iterNum → iters, the reduction conv → in_channels/reduced,
num_groups → groups, T → iters). Models written as MPN-COV and IterNorm are written."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import orthofx


class Covpool(torch.autograd.Function):
    """Σ = X Ī Xᵀ per image, Ī = (I − 1/M)/M; hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        b, c, h, w = x.shape
        m = h * w
        x = x.reshape(b, c, m)
        i_hat = ((torch.eye(m, dtype=x.dtype) - 1.0 / m) / m).expand(b, m, m)
        ctx.save_for_backward(x, i_hat)
        ctx.hw = (h, w)
        return x.bmm(i_hat).bmm(x.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, i_hat = ctx.saved_tensors
        return (g + g.transpose(1, 2)).bmm(x).bmm(i_hat).reshape(x.shape[0], x.shape[1], *ctx.hw)


class Sqrtm(torch.autograd.Function):
    """Σ^{1/2} by ``n`` coupled Newton–Schulz steps (Y ← Y T, Z ← T Z, T = (3I − Z Y)/2) on
    Σ/tr Σ, times √tr Σ; the backward runs the recurrence in reverse, by hand."""

    @staticmethod
    def forward(ctx, a, n):
        eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
        tr = a.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        y, z, saved = a / tr, eye, []
        for _ in range(n):
            t = 0.5 * (3.0 * eye - z.bmm(y))
            saved.append((y, z, t))
            y, z = y.bmm(t), t.bmm(z)
        ctx.saved = saved
        ctx.save_for_backward(a, tr, y)
        return y * tr.sqrt()

    @staticmethod
    def backward(ctx, g):
        a, tr, y_n = ctx.saved_tensors
        s = tr.sqrt()
        gy = g * s
        g_tr = (g * y_n).sum((1, 2), keepdim=True) * 0.5 / s
        gz = torch.zeros_like(gy)
        for y, z, t in reversed(ctx.saved):
            gt = y.transpose(1, 2).bmm(gy) + gz.bmm(z.transpose(1, 2))
            gy, gz = (gy.bmm(t.transpose(1, 2)) - 0.5 * z.transpose(1, 2).bmm(gt),
                      t.transpose(1, 2).bmm(gz) - 0.5 * gt.bmm(y.transpose(1, 2)))
        g_tr = g_tr - (gy * a).sum((1, 2), keepdim=True) / tr ** 2
        eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
        return gy / tr + g_tr * eye, None


class MPNCOV(nn.Module):
    """MPN-COV as its authors write it: the constructor's names, ``self.dr``, a 1×1 reduction
    block, then Covpool → Sqrtm → upper triangle."""

    def __init__(self, iterNum=5, is_sqrt=True, is_vec=True, input_dim=16, dimension_reduction=None):
        super().__init__()
        self.iterNum, self.is_sqrt, self.is_vec = iterNum, is_sqrt, is_vec
        self.dr = dimension_reduction
        if self.dr is not None:
            self.conv_dr_block = nn.Sequential(nn.Conv2d(input_dim, self.dr, 1, bias=False),
                                               nn.BatchNorm2d(self.dr), nn.ReLU(inplace=True))
        d = self.dr or input_dim
        self.register_buffer("triu", torch.triu_indices(d, d), persistent=False)

    def forward(self, x):
        if self.dr is not None:
            x = self.conv_dr_block(x)
        x = Covpool.apply(x)
        if self.is_sqrt:
            x = Sqrtm.apply(x, self.iterNum)
        return x[:, self.triu[0], self.triu[1]] if self.is_vec else x.flatten(1)


class IterNorm(nn.Module):
    """IterNorm as its authors write it: groups of channels whitened by ``T`` Newton–Schulz
    steps of Σ^{-1/2} (baddbmm), running statistics updated in place under no_grad."""

    def __init__(self, num_features, num_groups=2, T=5, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features, self.num_groups, self.T = num_features, num_groups, T
        self.eps, self.momentum = eps, momentum
        c = num_features // num_groups
        self.register_buffer("running_mean", torch.zeros(num_groups, c, 1))
        self.register_buffer("running_wm", torch.eye(c).expand(num_groups, c, c).clone())

    def forward(self, x):
        n, _, h, w = x.shape
        g, c = self.num_groups, self.num_features // self.num_groups
        xg = x.transpose(0, 1).reshape(g, c, -1)
        if not self.training:
            return self.running_wm.bmm(xg - self.running_mean).reshape(-1, n, h, w).transpose(0, 1)
        mean = xg.mean(-1, keepdim=True)
        xc = xg - mean
        eye = torch.eye(c, dtype=x.dtype).expand(g, c, c)
        sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=self.eps, alpha=1.0 / xc.shape[-1])
        r_tr = 1.0 / sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        sigma_n = sigma * r_tr
        p = eye
        for _ in range(self.T):
            p = torch.baddbmm(p, torch.matrix_power(p, 3), sigma_n, beta=1.5, alpha=-0.5)
        wm = p * r_tr.sqrt()
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_wm.mul_(1 - self.momentum).add_(self.momentum * wm)
        return wm.bmm(xc).reshape(-1, n, h, w).transpose(0, 1)


class GCPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU(inplace=True))
        self.representation = MPNCOV(iterNum=4, input_dim=16, dimension_reduction=8)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(self.representation(self.features(x)))


class WhitenedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = IterNorm(8, num_groups=2, T=6, eps=1e-4, momentum=0.2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_the_hand_written_backwards_are_the_gradients() -> None:
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Covpool.apply, (x,))
    f = torch.randn(2, 4, 9, dtype=torch.float64)
    a = (f @ f.mT / 9 + 0.1 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: Sqrtm.apply(m, 4), (a,))


def _replacement(report, name: str) -> str:
    (entry,) = [e for e in report.entries if e.name == name]
    (note,) = [n for n in entry.notes if n.startswith("no swap can be made")]
    return note


@pytest.mark.parametrize("build, name, call, mapping", [
    (GCPNet, "representation", "orthofx.nn.CovariancePooling(16, reduced=8, iters=4)",
     ["dr = representation.conv_dr_block.0's 16 → 8 channels → in_channels, reduced", "iterNum → iters"]),
    (WhitenedNet, "norm", "orthofx.nn.DecorrelatedBatchNorm(8, groups=2, eps=0.0001, momentum=0.2, iters=6)",
     ["num_groups → groups", "T → iters"]),
], ids=["mpncov", "iternorm"])
def test_the_report_names_the_replacement_and_its_arguments(build, name, call, mapping) -> None:
    torch.manual_seed(0)
    gm, report = orthofx.transform(build(), (torch.randn(4, 3, 6, 6),), config="svd")
    assert not report.plan.swaps
    note = _replacement(report.analysis, name)
    assert f": {call} (" in note and all(m in note for m in mapping), note
    assert note in str(report) and note in json.loads(json.dumps(report.to_dict()))["analysis"]["entries"][0]["notes"]
    # what it names is a real constructor call of orthofx.nn
    module = eval(call, {"orthofx": orthofx})  # noqa: S307 - our own text
    assert isinstance(module, (orthofx.nn.CovariancePooling, orthofx.nn.DecorrelatedBatchNorm))


def test_no_replacement_is_named_where_a_swap_is_made_or_none_fits() -> None:
    class ZCA(nn.Module):
        def forward(self, x):
            xf = x.transpose(0, 1).flatten(1)
            xc = xf - xf.mean(1, keepdim=True)
            lam, u = torch.linalg.eigh(xc @ xc.T / xc.shape[1] + 1e-3 * torch.eye(xf.shape[0]))
            return (u @ torch.diag(lam.rsqrt()) @ u.T @ xc).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), ZCA(), nn.Flatten(), nn.Linear(6 * 36, 2))
    report = orthofx.analyze(model, torch.randn(4, 3, 6, 6))
    assert report.producers == ["0"] and report.entries[0].notes == ()
