"""Second-order pooling and attention of the held-out corpus: an MPN-COV head whose one
``autograd.Function`` forms the covariance and its matrix power, and SAN-style second-order
channel attention inside a super-resolution net.

Part of :mod:`corpora.realcode_extra`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function



# =========================================================================================
# 5. MPN-COV (jiangtaoxie/MPN-COV style): one Function for covariance + SVD power

# =========================================================================================
class MPNCOVFunction(Function):
    """Covariance ``x Î xᵀ`` *and* matrix power ``U diag(λ^α) Uᵀ`` in one Function, the SVD
    computed per sample in a Python loop into ``torch.zeros`` scratch tensors (float64).
    Backward: ``dL/dΣ = U (P ∘ Uᵀ sym(G) U) Uᵀ`` with ``P_ij = (λi^α − λj^α)/(λi − λj)``,
    ``P_ii = α λi^{α−1}``, then ``dL/dx = 2 dL/dΣ x Î``."""

    @staticmethod
    def forward(ctx, input, alpha, eps):
        x = input.double()
        batchSize, dim, h, w = x.data.shape
        M = h * w
        x = x.reshape(batchSize, dim, M)
        I_hat = (-1. / M / M) * torch.ones(M, M, dtype=x.dtype, device=x.device) \
            + (1. / M) * torch.eye(M, M, dtype=x.dtype, device=x.device)
        y = x.bmm(I_hat.unsqueeze(0).expand(batchSize, M, M)).bmm(x.transpose(1, 2))
        y = y + eps * torch.eye(dim, dtype=x.dtype, device=x.device)
        U = torch.zeros(batchSize, dim, dim, dtype=x.dtype, device=x.device)
        S = torch.zeros(batchSize, dim, dtype=x.dtype, device=x.device)
        for i in range(batchSize):
            u, s, _ = torch.svd(y[i])
            U[i] = u
            S[i] = s
        Z = U.bmm(torch.diag_embed(S.pow(alpha))).bmm(U.transpose(1, 2))
        ctx.save_for_backward(x, I_hat, U, S)
        ctx.alpha = alpha
        ctx.shape = (batchSize, dim, h, w)
        ctx.in_dtype = input.dtype
        return Z.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, I_hat, U, S = ctx.saved_tensors
        alpha = ctx.alpha
        g = grad_output.double()
        g = 0.5 * (g + g.transpose(1, 2))
        f = S.pow(alpha)
        diff = S.unsqueeze(2) - S.unsqueeze(1)
        close = diff.abs() <= 1e-9 * S.max(dim=1, keepdim=True).values.unsqueeze(2)
        safe = torch.where(close, torch.ones_like(diff), diff)
        deriv = alpha * S.pow(alpha - 1)
        P = torch.where(close, 0.5 * (deriv.unsqueeze(2) + deriv.unsqueeze(1)),
                        (f.unsqueeze(2) - f.unsqueeze(1)) / safe)
        gy = U.bmm(P * U.transpose(1, 2).bmm(g).bmm(U)).bmm(U.transpose(1, 2))
        gx = 2.0 * gy.bmm(x).matmul(I_hat)
        return gx.reshape(ctx.shape).to(ctx.in_dtype), None, None


class _Block(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class MPNCOVResNet(nn.Module):
    def __init__(self, num_classes=10, width=8, reduced=6, alpha=0.5):
        super().__init__()
        self.alpha = alpha
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _Block(width, width)
        self.layer2 = _Block(width, 2 * width, 2)
        self.layer_reduce = nn.Conv2d(2 * width, reduced, 1, bias=False)
        self.layer_reduce_bn = nn.BatchNorm2d(reduced)
        self.layer_reduce_relu = nn.ReLU(inplace=True)
        self.register_buffer('index', torch.triu(torch.ones(reduced, reduced)).view(-1).nonzero().squeeze(1),
                             persistent=False)
        self.fc = nn.Linear(reduced * (reduced + 1) // 2, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.layer_reduce_relu(self.layer_reduce_bn(self.layer_reduce(x)))
        x = MPNCOVFunction.apply(x, self.alpha, 1e-4)
        x = x.view(x.size(0), -1)[:, self.index]
        return self.fc(x)


def _build_mpncov_fn() -> nn.Module:
    torch.manual_seed(205)
    return MPNCOVResNet()


# =========================================================================================
# 7. Second-order channel attention inside a super-resolution network (SAN style)

# =========================================================================================
def covpool(x):
    B, C, h, w = x.shape
    M = h * w
    x = x.reshape(B, C, M)
    x = x - x.mean(2, keepdim=True)
    return x.bmm(x.transpose(1, 2)) / M


def sqrtm_ns(A, iterN=5):
    """Trace-normalised Newton–Schulz square root in plain autograd (no Function)."""
    B, d, _ = A.shape
    I = torch.eye(d, dtype=A.dtype, device=A.device).expand(B, d, d)
    normA = A.diagonal(dim1=1, dim2=2).sum(-1).view(B, 1, 1)
    Y = A / normA
    Z = I
    for _ in range(iterN):
        T = 0.5 * (3.0 * I - Z.bmm(Y))
        Y, Z = Y.bmm(T), T.bmm(Z)
    return Y * normA.sqrt()


class SOCA(nn.Module):
    """Second-order channel attention: centre crop (Python-int slicing when the map is larger
    than ``crop``), covariance, NS square root, mean over rows, 1×1 conv bottleneck, sigmoid,
    multiply the (uncropped) input."""

    def __init__(self, channel, reduction=2, crop=12):
        super().__init__()
        self.crop = crop
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=True), nn.ReLU(inplace=True),
            nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=True), nn.Sigmoid(),
        )

    def forward(self, x):
        batch_size, C, h, w = x.shape
        h1 = w1 = self.crop
        if h < h1 and w < w1:
            x_sub = x
        elif h < h1:
            W = (w - w1) // 2
            x_sub = x[:, :, :, W:(W + w1)]
        elif w < w1:
            H = (h - h1) // 2
            x_sub = x[:, :, H:H + h1, :]
        else:
            H = (h - h1) // 2
            W = (w - w1) // 2
            x_sub = x[:, :, H:(H + h1), W:(W + w1)]
        cov_mat = covpool(x_sub)
        cov_mat_sqrt = sqrtm_ns(cov_mat, 5)
        cov_mat_sum = torch.mean(cov_mat_sqrt, 1)
        cov_mat_sum = cov_mat_sum.view(batch_size, C, 1, 1)
        y_cov = self.conv_du(cov_mat_sum)
        return y_cov * x


class RB(nn.Module):
    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat, 3, 1, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_feat, n_feat, 3, 1, 1))

    def forward(self, x):
        return self.body(x) + x


class LSRAG(nn.Module):
    def __init__(self, n_feat, n_resblocks=2):
        super().__init__()
        self.rcab = nn.ModuleList([RB(n_feat) for _ in range(n_resblocks)])
        self.conv_last = nn.Conv2d(n_feat, n_feat, 3, 1, 1)
        self.soca = SOCA(n_feat)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        residual = x
        for blk in self.rcab:
            x = blk(x)
        x = self.soca(self.conv_last(x))
        return x + self.gamma * residual + residual


class SANet(nn.Module):
    def __init__(self, n_feat=8, n_groups=2, scale=2):
        super().__init__()
        self.head = nn.Conv2d(3, n_feat, 3, 1, 1)
        self.groups = nn.ModuleList([LSRAG(n_feat) for _ in range(n_groups)])
        self.body_tail = nn.Conv2d(n_feat, n_feat, 3, 1, 1)
        self.upsample = nn.Sequential(nn.Conv2d(n_feat, n_feat * scale * scale, 3, 1, 1), nn.PixelShuffle(scale))
        self.tail = nn.Conv2d(n_feat, 3, 3, 1, 1)

    def forward(self, x):
        x = self.head(x)
        res = x
        for g in self.groups:
            res = g(res)
        res = self.body_tail(res) + x
        return self.tail(self.upsample(res))


def _build_soca_sr() -> nn.Module:
    torch.manual_seed(207)
    return SANet()
