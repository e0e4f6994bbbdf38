"""Whitening layers: IterNorm (Newton–Schulz inverse square root), decorrelated BN (SVD, buffer
reassignment) and ZCA whitening with a Padé square root and a Lyapunov backward.

Part of :mod:`corpora.realcode`; the docstrings say which real code pattern each model imitates.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function



# =========================================================================================
# 3. IterNorm (iterative normalisation by Newton–Schulz inverse square root)
# =========================================================================================
class iterative_normalization_py(Function):
    """IterNorm's Function: channels grouped to ``(G, C/G, N·H·W)``, ``Σ = εI + xc xcᵀ/m``
    by ``torch.baddbmm``, trace-normalised, ``T`` Newton–Schulz steps
    ``P ← 1.5 P − 0.5 P³ Σ_N`` (``baddbmm``) towards ``Σ_N^{-1/2}``, ``wm = P_T / sqrt(tr Σ)``.
    Running statistics are updated in place inside ``forward`` during training; eval uses
    them. Called as ``apply(X, running_mean, running_wm, nc, T, eps, momentum, training)``."""

    @staticmethod
    def forward(ctx, *args, **kwargs):
        X, running_mean, running_wm, nc, T, eps, momentum, training = args
        ctx.T = T
        ctx.training = training
        ctx.g = X.size(1) // nc
        x = X.transpose(0, 1).contiguous().view(ctx.g, nc, -1)
        _, d, m = x.size()
        if training:
            mean = x.mean(-1, keepdim=True)
            xc = x - mean
            P = [None] * (ctx.T + 1)
            P[0] = torch.eye(d).to(X).expand(ctx.g, d, d)
            Sigma = torch.baddbmm(P[0], xc, xc.transpose(1, 2), beta=eps, alpha=1. / m)
            rTr = (Sigma * P[0]).sum((1, 2), keepdim=True).reciprocal_()
            Sigma_N = Sigma * rTr
            for k in range(ctx.T):
                P[k + 1] = torch.baddbmm(P[k], torch.matrix_power(P[k], 3), Sigma_N, beta=1.5, alpha=-0.5)
            wm = P[ctx.T] * rTr.sqrt()
            running_mean.copy_(momentum * mean + (1. - momentum) * running_mean)
            running_wm.copy_(momentum * wm + (1. - momentum) * running_wm)
            ctx.save_for_backward(xc, rTr, Sigma, Sigma_N, wm, *P)
        else:
            xc = x - running_mean
            wm = running_wm
            ctx.save_for_backward(wm)
        xn = wm.matmul(xc)
        Xn = xn.view(X.size(1), X.size(0), *X.size()[2:]).transpose(0, 1).contiguous()
        return Xn

    @staticmethod
    def backward(ctx, *grad_outputs):
        grad, = grad_outputs
        C = grad.size(1)
        nc = C // ctx.g
        gxn = grad.transpose(0, 1).contiguous().view(ctx.g, nc, -1)
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        if not ctx.training:
            wm, = ctx.saved_tensors
            gx = tr(wm).matmul(gxn)
        else:
            xc, rTr, Sigma, Sigma_N, wm, *P = ctx.saved_tensors
            T = ctx.T
            m = xc.size(-1)
            g_wm = gxn.matmul(tr(xc))
            g_xc = tr(wm).matmul(gxn)
            sq = rTr.sqrt()
            g_P = g_wm * sq                                   # wm = P_T sqrt(rTr)
            g_rTr = (g_wm * P[T]).sum((1, 2), keepdim=True) * 0.5 / sq
            g_SN = torch.zeros_like(Sigma_N)
            for k in range(T - 1, -1, -1):                    # P_{k+1} = 1.5 P_k - 0.5 P_k³ Σ_N
                Pk = P[k]
                Pk2 = Pk.bmm(Pk)
                g_SN = g_SN - 0.5 * tr(Pk2.bmm(Pk)).bmm(g_P)
                g_cube = -0.5 * g_P.bmm(tr(Sigma_N))          # gradient w.r.t. P_k³
                g_P = (1.5 * g_P + g_cube.bmm(tr(Pk2)) + tr(Pk).bmm(g_cube).bmm(tr(Pk))
                       + tr(Pk2).bmm(g_cube))
            g_Sigma = g_SN * rTr                              # Σ_N = Σ rTr
            g_rTr = g_rTr + (g_SN * Sigma).sum((1, 2), keepdim=True)
            g_trace = -g_rTr * rTr * rTr                      # rTr = 1 / tr Σ
            eye = torch.eye(nc, dtype=grad.dtype, device=grad.device)
            g_Sigma = g_Sigma + g_trace * eye
            g_xc = g_xc + (g_Sigma + tr(g_Sigma)).bmm(xc) / m  # Σ = εI + xc xcᵀ / m
            gx = g_xc - g_xc.mean(-1, keepdim=True)
        gX = gx.view(C, grad.size(0), *grad.size()[2:]).transpose(0, 1).contiguous()
        return gX, None, None, None, None, None, None, None


class IterNorm(nn.Module):
    """IterNorm layer: grouped whitening by ``iterative_normalization_py`` and an affine."""

    def __init__(self, num_features, num_groups=1, num_channels=None, T=5, dim=4, eps=1e-5,
                 momentum=0.1, affine=True):
        super().__init__()
        self.T = T
        self.eps = eps
        self.momentum = momentum
        self.num_features = num_features
        self.affine = affine
        self.dim = dim
        if num_channels is None:
            num_channels = (num_features - 1) // num_groups + 1
        num_groups = num_features // num_channels
        while num_features % num_channels != 0:
            num_channels //= 2
            num_groups = num_features // num_channels
        assert num_groups > 0 and num_features % num_groups == 0
        self.num_groups = num_groups
        self.num_channels = num_channels
        shape = [1] * dim
        shape[1] = self.num_features
        if self.affine:
            self.weight = nn.Parameter(torch.ones(*shape))
            self.bias = nn.Parameter(torch.zeros(*shape))
        self.register_buffer('running_mean', torch.zeros(num_groups, num_channels, 1))
        self.register_buffer('running_wm', torch.eye(num_channels).expand(num_groups, num_channels, num_channels).clone())

    def forward(self, X):
        X_hat = iterative_normalization_py.apply(X, self.running_mean, self.running_wm, self.num_channels,
                                                 self.T, self.eps, self.momentum, self.training)
        if self.affine:
            return X_hat * self.weight + self.bias
        return X_hat

    def extra_repr(self):
        return f'{self.num_features}, num_channels={self.num_channels}, T={self.T}, eps={self.eps}'


_VGG16_CFG = [8, 8, 'M', 16, 16, 'M', 16, 16, 16, 'M', 16, 16, 16, 'M', 16, 16, 16, 'M']
_VGG16E_CFG = [8, 8, 'M', 8, 8, 'M', 8, 8, 8, 8, 'M', 8, 8, 8, 8, 'M', 8, 8, 8, 8, 'M']


def _vgg_conv_names(cfg, prefix: str, per_conv: int) -> list[str]:
    names, idx = [], 0
    for v in cfg:
        if v == 'M':
            idx += 1
        else:
            names.append(f"{prefix}.{idx}")
            idx += per_conv
    return names


class VGG(nn.Module):
    """torchvision-style VGG: ``features`` from ``make_layers(cfg, norm_layer)`` then a small
    classifier (no dropout, so outputs are deterministic in train mode)."""

    def __init__(self, features, width, num_classes=10):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Linear(width, 16), nn.ReLU(True),
            nn.Linear(16, 16), nn.ReLU(True),
            nn.Linear(16, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


def make_layers(cfg, norm_layer):
    layers = []
    in_channels = 3
    for v in cfg:
        if v == 'M':
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            layers += [conv2d, norm_layer(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def _build_iternorm_vgg() -> nn.Module:
    torch.manual_seed(3)
    return VGG(make_layers(_VGG16_CFG, lambda c: IterNorm(c, num_channels=4, T=5, dim=4)), width=16)


# =========================================================================================
# 4. Decorrelated Batch Normalisation (SVD whitening, buffer reassignment)
# =========================================================================================
class DBN(nn.Module):
    """Decorrelated BN (ZCA by SVD): ``sigma = xc xcᵀ/m + εI``, ``u, e, _ = sigma.svd()``,
    ``wm = u diag(e^{-1/2}) uᵀ``. The running statistics are *reassigned* in ``forward``
    (``self.running_projection = ...``), which leaves Proxies in buffers under symbolic fx
    tracing. Eval uses ``running_projection``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if self.affine:
            self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.register_buffer('running_mean', torch.zeros(num_features, 1))
        self.register_buffer('running_projection', torch.eye(num_features))

    def forward(self, input):
        C = input.size(1)
        x = input.transpose(0, 1).contiguous().view(C, -1)
        if self.training:
            mean = x.mean(-1, keepdim=True)
            xc = x - mean
            m = xc.size(1)
            I = torch.eye(C).to(xc)
            sigma = xc.matmul(xc.t()) / m + self.eps * I
            u, e, _ = sigma.svd()
            scale = e.rsqrt()
            wm = u.matmul(scale.diag()).matmul(u.t())
            self.running_mean = (1. - self.momentum) * self.running_mean + self.momentum * mean.detach()
            self.running_projection = (1. - self.momentum) * self.running_projection + self.momentum * wm.detach()
        else:
            xc = x - self.running_mean
            wm = self.running_projection
        xn = wm.matmul(xc)
        Xn = xn.view(C, input.size(0), *input.size()[2:]).transpose(0, 1).contiguous()
        if self.affine:
            Xn = Xn * self.weight + self.bias
        return Xn


def _build_dbn_vgg16() -> nn.Module:
    torch.manual_seed(4)
    return VGG(make_layers(_VGG16E_CFG, DBN), width=8)


# =========================================================================================
# 5. ZCA whitening with a Padé matrix square root and a Lyapunov backward
# =========================================================================================
def pade_coefficients(m: int, n: int) -> tuple[list[float], list[float]]:
    """Coefficients ``p`` (degree ``m``) and ``q`` (degree ``n``, ``q[0] = 1``) of the
    ``[m/n]`` Padé approximant of ``sqrt(1 - z)``, from its Taylor series."""
    c = [1.0]
    for k in range(1, m + n + 1):
        c.append(c[-1] * (k - 1.5) / k)
    A = torch.tensor([[c[k - j] if k - j >= 0 else 0.0 for j in range(1, n + 1)]
                      for k in range(m + 1, m + n + 1)], dtype=torch.float64)
    b = torch.tensor([-c[k] for k in range(m + 1, m + n + 1)], dtype=torch.float64)
    q = [1.0] + torch.linalg.solve(A, b).tolist()
    p = [sum(q[j] * c[k - j] for j in range(0, min(k, n) + 1)) for k in range(m + 1)]
    return p, q


_PADE_P, _PADE_Q = pade_coefficients(5, 5)


class MPA_Lya(Function):
    """Matrix Padé approximant of the square root (``sqrt(A) ≈ Q(Z)^{-1} P(Z)`` with
    ``Z = I − A/‖A‖_F``, solved by ``torch.linalg.solve``) with a backward that solves the
    Lyapunov equation ``Y X + X Y = G`` for ``X`` (``Y`` the square root) by a
    Bartels–Stewart step on the eigendecomposition of the symmetric ``Y``."""

    @staticmethod
    def forward(ctx, M):
        batchSize, dim, _ = M.shape
        normM = torch.linalg.norm(M, dim=(1, 2)).view(batchSize, 1, 1)
        I = torch.eye(dim, dim, device=M.device, dtype=M.dtype).view(1, dim, dim).repeat(batchSize, 1, 1)
        Z = I - M / normM
        P = _PADE_P[0] * I
        Q = _PADE_Q[0] * I
        Zk = I
        for k in range(1, max(len(_PADE_P), len(_PADE_Q))):
            Zk = Zk.bmm(Z)
            if k < len(_PADE_P):
                P = P + _PADE_P[k] * Zk
            if k < len(_PADE_Q):
                Q = Q + _PADE_Q[k] * Zk
        sqrtm = torch.linalg.solve(Q, P) * torch.sqrt(normM)
        ctx.save_for_backward(sqrtm)
        return sqrtm

    @staticmethod
    def backward(ctx, grad_output):
        sqrtm, = ctx.saved_tensors
        Ys = 0.5 * (sqrtm + sqrtm.transpose(1, 2))
        s, U = torch.linalg.eigh(Ys)
        Gt = U.transpose(1, 2).bmm(grad_output).bmm(U)
        X = Gt / (s.unsqueeze(2) + s.unsqueeze(1))
        return U.bmm(X).bmm(U.transpose(1, 2))


class ZCAPade(nn.Module):
    """ZCA whitening whose square root is ``MPA_Lya`` and whose whitening matrix is
    ``torch.inverse`` of it. ``running_subspace`` is registered but never read (left over from
    an earlier version, as happens in real repositories)."""

    def __init__(self, num_features, eps=1e-3, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if self.affine:
            self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.register_buffer('running_mean', torch.zeros(num_features, 1))
        self.register_buffer('running_wm', torch.eye(num_features))
        self.register_buffer('running_subspace', torch.eye(num_features))

    def forward(self, x):
        N, C, H, W = x.size()
        xv = x.transpose(0, 1).reshape(C, -1)
        if self.training:
            mu = xv.mean(1, keepdim=True)
            xc = xv - mu
            cov = xc @ xc.t() / xc.size(1) + self.eps * torch.eye(C, device=x.device, dtype=x.dtype)
            sqrt_cov = MPA_Lya.apply(cov.unsqueeze(0)).squeeze(0)
            wm = torch.inverse(sqrt_cov)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mu)
                self.running_wm.mul_(1 - self.momentum).add_(self.momentum * wm)
        else:
            xc = xv - self.running_mean
            wm = self.running_wm
        y = (wm @ xc).reshape(C, N, H, W).transpose(0, 1)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class ZCANet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.zca = ZCAPade(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.zca(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def _build_zca_pade() -> nn.Module:
    torch.manual_seed(5)
    return ZCANet()
