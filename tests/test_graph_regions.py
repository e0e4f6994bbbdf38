"""Issue 21: a cross-covariance of the two halves of ONE Linear's output, normalised by a
power-iteration SVD started from a learnable vector (U S^α Vᵀ with deflation), as
fine-grained-recognition heads write it, is a meta-layer whose Pre-SVD layer is that Linear;
softmax attention (and a one-shot learned projection of a covariance) stays unfound.

The models are written as such projects write them: a signed square root as an
autograd.Function with a hand-written backward, running singular values updated in place
under no_grad on ``self.training``, einsum/bmm, a BatchNorm'd conv stem.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx


class SignedSqrt(torch.autograd.Function):
    """y = sign(x)·√(|x| + ε); dy/dx = 1 / (2|y|) (hand-written)."""

    @staticmethod
    def forward(ctx, x, eps):
        y = x.sign() * (x.abs() + eps).sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad / (2.0 * y.abs()), None


class SVDPowerNorm(nn.Module):
    """Cross-covariance of q and k (the two halves of ``wr``'s output), then the top ``rank``
    singular triplets by power iteration from the learnable ``self.v`` with deflation, and
    the power-normalised ``Σ_i u_i s_i^α v_iᵀ``."""

    def __init__(self, dim: int, d: int, split: str, rank: int = 2, iters: int = 3,
                 alpha: float = 0.5, momentum: float = 0.1) -> None:
        super().__init__()
        self.d, self.split, self.rank, self.iters, self.alpha = d, split, rank, iters, alpha
        self.momentum = momentum
        self.wr = nn.Linear(dim, 2 * d, bias=False)
        self.v = nn.Parameter(torch.randn(1, d, 1) / d ** 0.5)
        self.register_buffer("running_s", torch.ones(rank))

    def halves(self, x):
        b, n, _ = x.shape
        qk = self.wr(x)
        if self.split == "select":
            qk = qk.reshape(b, n, 2, self.d).permute(2, 0, 1, 3)
            return qk[0], qk[1]
        if self.split == "chunk":
            return qk.chunk(2, dim=-1)
        if self.split == "split":
            return torch.split(qk, self.d, dim=2)
        return qk.view(b, n, 2, self.d).unbind(2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k = self.halves(x)
        x = q.transpose(1, 2).bmm(k) / n  # cross-covariance, not X Xᵀ
        out = torch.zeros_like(x)
        svals = []
        for _ in range(self.rank):
            v = self.v.expand(b, self.d, 1)
            for _ in range(self.iters):
                u = F.normalize(x.bmm(v), dim=1)
                v = F.normalize(x.transpose(1, 2).bmm(u), dim=1)
            s = u.transpose(1, 2).bmm(x).bmm(v)
            x = x - u * s * v.transpose(1, 2)
            out = out + u * s.abs().clamp_min(1e-6).pow(self.alpha) * v.transpose(1, 2)
            svals.append(s.detach().abs().mean())
        if self.training:
            with torch.no_grad():
                self.running_s.mul_(1 - self.momentum).add_(self.momentum * torch.stack(svals))
        return SignedSqrt.apply(out, 1e-8).flatten(1)


class FineGrainedNet(nn.Module):
    def __init__(self, split: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12),
                                  nn.ReLU(inplace=True))
        self.head = SVDPowerNorm(12, 5, split)
        self.fc = nn.Linear(25, 7)

    def forward(self, x):
        f = torch.einsum("bchw->bhwc", self.stem(x)).flatten(1, 2)
        return self.fc(self.head(f))


def test_signed_sqrt_backward_is_right() -> None:
    x = (torch.randn(3, 4, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SignedSqrt.apply(t, 1e-3), (x,))


@pytest.mark.parametrize("split", ["select", "chunk", "split", "unbind"])
def test_power_normalised_cross_covariance_is_found_with_its_linear(split: str) -> None:
    torch.manual_seed(0)
    model = FineGrainedNet(split)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = orthofx.analyze(model, torch.randn(4, 3, 6, 6))
    assert report.producers == ["head.wr"], str(report)
    (entry,) = report.entries
    assert entry.kind == "power_iteration" and entry.name == "head"
    assert entry.covariance.expression.startswith("q kᵀ"), entry.covariance
    # the learned start vector is not a layer: neither a producer nor where the region stops
    assert "head.v" not in report.producer_params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_found_linear_is_treated_by_transform() -> None:
    torch.manual_seed(1)
    model = FineGrainedNet("select")
    x = torch.randn(4, 3, 6, 6)
    gm, report = orthofx.transform(model, (x,), config="ow")
    assert [p.param for p in report.plan.producers] == ["head.wr.weight"]
    w = gm.head.wr.weight.double()  # (2d, dim) = (10, 12): orthonormal rows under OW
    torch.testing.assert_close(w @ w.T, torch.eye(10, dtype=torch.float64), atol=1e-5, rtol=0)


class SoftmaxAttention(nn.Module):
    """A pre-norm attention block with one qkv Linear, softmax(q kᵀ/√d) v by einsum, and a
    learned-query pooling head that L2-normalises its output."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.randn(1, dim, 1))

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * (c // self.heads) ** -0.5
        x = x + self.proj(torch.einsum("bhnm,bhmd->bhnd", attn.softmax(-1), v).transpose(1, 2).reshape(b, n, c))
        scores = x.bmm(self.query.expand(b, c, 1))  # (b, n, 1)
        return F.normalize(x.transpose(1, 2).bmm(scores.softmax(1)), dim=1)


def test_softmax_attention_stays_unfound() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), SoftmaxAttention(8))
    report = orthofx.analyze(model, torch.randn(3, 5, 6))
    assert report.entries == [] and report.skipped == [], str(report)


class SecondOrderProjection(nn.Module):
    """A covariance projected once on a learned vector and normalised: one product, no
    iteration, so no matrix function."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduce = nn.Linear(dim, dim)
        self.w = nn.Parameter(torch.randn(1, dim, 1))

    def forward(self, x):
        f = self.reduce(x)
        f = f - f.mean(1, keepdim=True)
        cov = f.transpose(1, 2).bmm(f) / f.shape[1]
        return F.normalize(cov.bmm(self.w.expand(x.shape[0], -1, -1)), dim=1).flatten(1)


def test_one_learned_projection_of_a_covariance_is_not_a_power_iteration() -> None:
    torch.manual_seed(3)
    report = orthofx.analyze(SecondOrderProjection(6), torch.randn(3, 7, 6))
    assert report.entries == [] and report.skipped == [], str(report)
