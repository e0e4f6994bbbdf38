"""SPDNet, Cholesky group whitening, decoy covariances, ``.item()`` in a meta-layer, and a
negative: buffer reassignment with data-dependent control flow.

Part of :mod:`corpora.realcode`; the docstrings say which real code pattern each model imitates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corpora.case import _gen


# =========================================================================================
# Extras: SPDNet, Cholesky group whitening, decoy covariances, .item() in a meta-layer
# =========================================================================================
class BiMap(nn.Module):
    """SPDNet bilinear map ``Wᵀ X W`` with a bare ``nn.Parameter`` W (semi-orthogonal init)."""

    def __init__(self, in_size, out_size):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_size, out_size))
        nn.init.orthogonal_(self.W)

    def forward(self, X):
        return self.W.t().matmul(X).matmul(self.W)


class ReEig(nn.Module):
    """SPDNet eigenvalue rectification ``U max(Λ, ε) Uᵀ``."""

    def __init__(self, eps=1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, X):
        S, U = torch.linalg.eigh(X)
        S = torch.clamp(S, min=self.eps)
        return U.matmul(torch.diag_embed(S)).matmul(U.transpose(-1, -2))


class LogEig(nn.Module):
    """SPDNet matrix logarithm ``U log(Λ) Uᵀ``, then upper-triangular vectorisation."""

    def forward(self, X):
        S, U = torch.linalg.eigh(X)
        L = U.matmul(torch.diag_embed(torch.log(S))).matmul(U.transpose(-1, -2))
        n = X.shape[-1]
        iu = torch.triu_indices(n, n, device=X.device)
        return L[:, iu[0], iu[1]]


class SPDNet(nn.Module):
    """SPDNet on raw multichannel signals: the sample covariance (+ εI) is formed in
    ``forward``, then BiMap → ReEig → BiMap → ReEig → LogEig → Linear."""

    def __init__(self, channels=8, num_classes=3):
        super().__init__()
        self.bimap1 = BiMap(channels, 6)
        self.reeig1 = ReEig()
        self.bimap2 = BiMap(6, 4)
        self.reeig2 = ReEig()
        self.logeig = LogEig()
        self.classifier = nn.Linear(10, num_classes)

    def forward(self, x):
        T = x.shape[-1]
        x = x - x.mean(dim=-1, keepdim=True)
        cov = x.matmul(x.transpose(-1, -2)) / (T - 1)
        cov = cov + 1e-3 * torch.eye(cov.shape[-1], device=x.device, dtype=x.dtype)
        x = self.reeig1(self.bimap1(cov))
        x = self.reeig2(self.bimap2(x))
        x = self.logeig(x)
        return self.classifier(x)


def _build_spd_net() -> nn.Module:
    torch.manual_seed(10)
    return SPDNet()


def _spd_inputs() -> tuple[Tensor, ...]:
    return (torch.randn(4, 8, 64, generator=_gen(110)),)


class CholeskyGroupWhitening(nn.Module):
    """Group whitening by Cholesky: per group ``Σ = L Lᵀ`` (``torch.linalg.cholesky``),
    ``L^{-1}`` by ``torch.linalg.solve_triangular``, applied as a grouped 1×1 conv kernel
    ``F.conv2d(x, w.view(C, C//G, 1, 1), groups=G)``; running statistics for eval."""

    def __init__(self, num_features, num_groups=2, eps=1e-3, momentum=0.1):
        super().__init__()
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        c = num_features // num_groups
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_whiten', torch.eye(c).repeat(num_groups, 1, 1))

    def forward(self, x):
        N, C, H, W = x.shape
        G = self.num_groups
        c = C // G
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            xc = x - mean.view(1, C, 1, 1)
            xg = xc.transpose(0, 1).reshape(G, c, -1)
            m = xg.shape[-1]
            eye = torch.eye(c, device=x.device, dtype=x.dtype)
            sigma = xg @ xg.transpose(1, 2) / m + self.eps * eye
            L = torch.linalg.cholesky(sigma)
            w = torch.linalg.solve_triangular(L, eye.repeat(G, 1, 1), upper=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_whiten.lerp_(w, self.momentum)
        else:
            xc = x - self.running_mean.view(1, C, 1, 1)
            w = self.running_whiten
        out = F.conv2d(xc, w.reshape(C, c, 1, 1), groups=G)
        return out * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)


class CholeskyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.cw1 = CholeskyGroupWhitening(8, num_groups=2)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.cw2 = CholeskyGroupWhitening(8, num_groups=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.cw1(self.conv1(x)))
        x = F.relu(self.cw2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _build_cholesky_whiten() -> nn.Module:
    torch.manual_seed(11)
    return CholeskyNet()


def feature_covariance(x):
    """Covariance helper shared by the whitening layer, the DeCov penalty and the logging."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H * W)
    x = x - x.mean(-1, keepdim=True)
    return x @ x.transpose(1, 2) / (H * W - 1)


class DecoyCovNet(nn.Module):
    """Instance-whitening net (per-sample ZCA by ``torch.linalg.eigh`` after ``conv3``) that
    also calls ``feature_covariance`` on three other feature maps: the outputs of ``conv1``
    and ``conv2`` (an off-diagonal Frobenius DeCov penalty, returned with the logits) and the
    whitened features (their distance to I is logged with ``.item()``). Only ``conv3`` is a
    Pre-SVD layer. Returns ``(logits, penalty)``."""

    def __init__(self, num_classes=10, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)
        self.whiteness = float('nan')

    @staticmethod
    def decov(cov):
        off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
        return 0.5 * off.pow(2).sum(dim=(-2, -1)).mean()

    def forward(self, x):
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = F.relu(self.bn2(self.conv2(f1)))
        penalty = self.decov(feature_covariance(f1)) + self.decov(feature_covariance(f2))
        f2 = F.max_pool2d(f2, 2)
        f3 = F.relu(self.bn3(self.conv3(f2)))
        B, C, H, W = f3.shape
        cov = feature_covariance(f3) + self.eps * torch.eye(C, device=x.device, dtype=x.dtype)
        lam, U = torch.linalg.eigh(cov)
        wm = U @ torch.diag_embed(lam.clamp_min(self.eps).rsqrt()) @ U.transpose(1, 2)
        f3c = f3.reshape(B, C, H * W)
        xw = (wm @ (f3c - f3c.mean(-1, keepdim=True))).reshape(B, C, H, W)
        with torch.no_grad():
            eye = torch.eye(C, device=x.device, dtype=x.dtype)
            self.whiteness = (feature_covariance(xw) - eye).norm().item()
        out = self.fc(F.adaptive_avg_pool2d(F.relu(xw), 1).flatten(1))
        return out, penalty


def _build_decoy_cov() -> nn.Module:
    torch.manual_seed(12)
    return DecoyCovNet()


class AdaptiveSqrtCov(nn.Module):
    """Token covariance square root whose ε is chosen at run time with ``.item()``
    (``eps = max(eps_min, rel · mean(diag Σ))``), then ``torch.linalg.eigh`` and triu vec."""

    def __init__(self, eps_min=1e-4, rel=1e-2):
        super().__init__()
        self.eps_min = eps_min
        self.rel = rel

    def forward(self, x):
        B, N, d = x.shape
        x = x - x.mean(1, keepdim=True)
        cov = x.transpose(1, 2) @ x / N
        eps = max(self.eps_min, self.rel * cov.diagonal(dim1=-2, dim2=-1).mean().item())
        cov = cov + eps * torch.eye(d, device=x.device, dtype=x.dtype)
        lam, U = torch.linalg.eigh(cov)
        s = U @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ U.transpose(1, 2)
        iu = torch.triu_indices(d, d, device=x.device)
        return s[:, iu[0], iu[1]]


class ItemForwardNet(nn.Module):
    def __init__(self, in_dim=10, hidden=16, proj=6, num_classes=5):
        super().__init__()
        self.embed = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, proj)
        self.cov_sqrt = AdaptiveSqrtCov()
        self.classifier = nn.Linear(proj * (proj + 1) // 2, num_classes)

    def forward(self, tokens):
        x = self.proj(self.act(self.embed(tokens)))
        return self.classifier(self.cov_sqrt(x))


def _build_item_forward() -> nn.Module:
    torch.manual_seed(13)
    return ItemForwardNet()


def _token_inputs() -> tuple[Tensor, ...]:
    return (torch.randn(4, 20, 10, generator=_gen(113)),)


# =========================================================================================
# Negative: buffer reassignment + data-dependent control flow, no meta-layer
# =========================================================================================
class RunningCenter(nn.Module):
    """Mean-only normalisation that reassigns its running buffer in ``forward``."""

    def __init__(self, num_features, momentum=0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer('running_mean', torch.zeros(1, num_features, 1, 1))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if self.training:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean.detach()
            self.num_batches_tracked = self.num_batches_tracked + 1
        else:
            mean = self.running_mean
        return x - mean


class UntraceableNet(nn.Module):
    """Conv net whose forward rescales by a data-dependent number of halvings
    (``while h.abs().max() > 4``) and branches on ``x.std() > 1``; no covariance anywhere."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.center1 = RunningCenter(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.center2 = RunningCenter(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.std() > 1:
            x = x / x.std()
        h = F.relu(self.center1(self.conv1(x)))
        n_halvings = 0
        while h.abs().max() > 4 and n_halvings < 10:
            h = h * 0.5
            n_halvings += 1
        h = F.relu(self.center2(self.conv2(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _build_buffer_reassign_untraceable() -> nn.Module:
    torch.manual_seed(14)
    return UntraceableNet()
