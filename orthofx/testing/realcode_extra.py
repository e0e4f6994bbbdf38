"""A held-out real-code corpus: ten more models in the style of public research code.

These were written *after* :mod:`orthofx.testing.realcode`, by a user who did not look at
orthofx's discovery code, to check that the discovery generalises. Each model imitates a
pattern of a published repository (re-written from scratch for orthofx, tiny channels) and
carries its planted truth as a :class:`~orthofx.testing.realcode.RealCodeCase`:

* ``sw_resnet`` — Switchable Whitening (BW/IW/BN/IN statistics mixed by learned softmax
  weights, group whitening by ``torch.svd`` of the mixed covariance) after the convs of a
  ResNet BasicBlock, before the residual add;
* ``gw_after_add`` — group whitening *after* each residual block's add;
* ``concept_whitening`` — ZCA whitening (eigh) followed by an orthogonal rotation buffer
  applied with ``einsum``, concept statistics accumulated under ``no_grad``;
* ``wmse_loss`` — W-MSE: a model whose ``forward`` returns the self-supervised loss, with
  Cholesky whitening (``torch.triangular_solve``, applied as a 1×1 ``conv2d``) per view,
  sub-batches picked by ``torch.randperm`` and written back with index assignment;
* ``mpncov_fn`` — MPN-COV ResNet head: one ``autograd.Function`` forms the covariance *and*
  the matrix power by a per-sample ``torch.svd`` loop, hand-written backward;
* ``gw_mlp_deep`` — a 32-layer MLP, Linear → group whitening (``baddbmm`` covariance,
  batched ``eigh``) → ReLU;
* ``soca_sr`` — SAN-style second-order channel attention *inside* a super-resolution net
  (cropped covariance → plain-autograd Newton–Schulz sqrt → row mean → 1×1 convs → sigmoid
  reweighting), more convs after it;
* ``dbn_groups`` — grouped DBN (``x.view(G, C//G, -1)``, batched ``torch.linalg.eigh``,
  ``momentum=None`` cumulative averages, ``float(num_batches_tracked)``) after convs and
  after a Linear;
* negatives ``gram_style`` (Gatys style transfer, PyTorch-tutorial layout: Gram matrices
  only compared by MSE, losses stored as module attributes in ``forward``) and
  ``vit_cov_reg`` (einsum attention ``q kᵀ`` + a VICReg/Barlow-style covariance regulariser
  feeding only trace / Frobenius / off-diagonal sums).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from orthofx.testing.realcode import RealCodeCase

__all__ = [
    "EXTRA_CASES",
    "EXTRA_NEGATIVE_CASES",
    "ALL_EXTRA_CASES",
    "MPNCOVFunction",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(seed: int, n: int = 4, c: int = 3, h: int = 16) -> Callable[[], tuple[Tensor, ...]]:
    def make() -> tuple[Tensor, ...]:
        return (torch.randn(n, c, h, h, generator=_gen(seed)),)
    return make


# =========================================================================================
# 1. Switchable Whitening (XingangPan/Switchable-Whitening style) inside BasicBlocks
# =========================================================================================
class SwitchWhiten2d(nn.Module):
    """Switchable whitening, ``sw_type=5`` (BW, IW, BN, IN, LN-free): batch and instance
    means / covariances of channel groups mixed by ``softmax`` weights, ``+ εI``, whitened by
    ``torch.svd`` of the mixed (per sample, per group) covariance. Running batch statistics
    are updated in place through ``.data``; the identity is made with ``new().resize_`` and
    ``nn.init.eye_``."""

    def __init__(self, num_features, num_pergroup=4, sw_type=4, eps=1e-3, momentum=0.9, affine=True):
        super().__init__()
        self.num_features = num_features
        self.num_pergroup = num_pergroup
        self.num_groups = num_features // num_pergroup
        self.sw_type = sw_type
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        num_components = sw_type
        self.sw_mean_weight = nn.Parameter(torch.ones(num_components))
        self.sw_var_weight = nn.Parameter(torch.ones(num_components))
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(self.num_groups, num_pergroup, 1))
        self.register_buffer('running_cov', torch.eye(num_pergroup).unsqueeze(0).repeat(self.num_groups, 1, 1))
        self.softmax = nn.Softmax(0)

    def forward(self, x):
        N, C, H, W = x.size()
        c, g = self.num_pergroup, self.num_groups
        in_data_t = x.transpose(0, 1).contiguous()
        in_data_t = in_data_t.view(g, c, -1)
        if self.training:
            mean_bn = in_data_t.mean(-1, keepdim=True)
            in_data_bn = in_data_t - mean_bn
            cov_bn = torch.bmm(in_data_bn, in_data_bn.transpose(1, 2)).div(H * W * N)
            self.running_mean.mul_(self.momentum)
            self.running_mean.add_((1 - self.momentum) * mean_bn.data)
            self.running_cov.mul_(self.momentum)
            self.running_cov.add_((1 - self.momentum) * cov_bn.data)
        else:
            mean_bn = self.running_mean
            cov_bn = self.running_cov
        mean_bn = mean_bn.view(1, g, c, 1).expand(N, g, c, 1).contiguous().view(N * g, c, 1)
        cov_bn = cov_bn.view(1, g, c, c).expand(N, g, c, c).contiguous().view(N * g, c, c)

        in_data = x.view(N * g, c, -1)
        eye = in_data.data.new().resize_(c, c)
        eye = torch.nn.init.eye_(eye).view(1, c, c).expand(N * g, c, c)
        mean_in = in_data.mean(-1, keepdim=True)
        x_in = in_data - mean_in
        cov_in = torch.bmm(x_in, torch.transpose(x_in, 1, 2)).div(H * W)

        mean_weight = self.softmax(self.sw_mean_weight)
        var_weight = self.softmax(self.sw_var_weight)
        # BW + IW + BN + IN
        mean = (mean_weight[0] * mean_bn + mean_weight[1] * mean_in
                + mean_weight[2] * mean_bn + mean_weight[3] * mean_in)
        cov = (var_weight[0] * cov_bn + var_weight[1] * cov_in
               + var_weight[2] * (cov_bn * eye) + var_weight[3] * (cov_in * eye)
               + self.eps * eye)

        u, s, _ = torch.svd(cov)
        wm = u.bmm(torch.diag_embed(s.rsqrt())).bmm(u.transpose(1, 2))
        x_hat = torch.bmm(wm, in_data - mean)
        x_hat = x_hat.view(N, C, H, W)
        if self.affine:
            x_hat = x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return x_hat


class SWBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.sw1 = SwitchWhiten2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.sw2 = SwitchWhiten2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.sw1(self.conv1(x)))
        out = self.sw2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class SWResNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(SWBasicBlock(width, width))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(SWBasicBlock(width, 2 * width, 2, down))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build_sw_resnet() -> nn.Module:
    torch.manual_seed(201)
    return SWResNet()


# =========================================================================================
# 2. Group whitening after each residual block's add
# =========================================================================================
class GroupWhitening(nn.Module):
    """Per-sample group whitening (Huang et al., "Group Whitening"): the ``G`` channel groups
    of each sample are the variables, ``x.view(N, G, -1)``, covariance ``G×G`` per sample,
    ZCA by ``torch.linalg.eigh``; per-channel affine."""

    def __init__(self, num_features, num_groups=4, eps=1e-3):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x):
        N, C, H, W = x.shape
        G = self.num_groups
        xg = x.view(N, G, -1)
        xc = xg - xg.mean(-1, keepdim=True)
        cov = xc @ xc.transpose(-1, -2) / xc.shape[-1]
        cov = cov + self.eps * torch.eye(G, dtype=x.dtype, device=x.device)
        lam, U = torch.linalg.eigh(cov)
        wm = U @ torch.diag_embed(lam.rsqrt()) @ U.transpose(-1, -2)
        out = (wm @ xc).view(N, C, H, W)
        return out * self.weight + self.bias


class GWBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.gw = GroupWhitening(planes)

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.gw(out)
        return F.relu(out)


class GWResNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(GWBlock(width, width), GWBlock(width, width))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(GWBlock(width, 2 * width, 2, down))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _build_gw_after_add() -> nn.Module:
    torch.manual_seed(202)
    return GWResNet()


# =========================================================================================
# 3. Concept whitening (zhiCHEN96/ConceptWhitening style)
# =========================================================================================
class ConceptWhitening(nn.Module):
    """Whitening (batch ZCA by ``torch.linalg.eigh``, running mean / whitening matrix for
    eval) followed by an orthogonal rotation ``running_rot`` (a buffer, updated by a Cayley
    step in ``update_rotation_matrix``, never in ``forward``) applied with ``einsum``. When
    ``mode >= 0`` the mean activation of the rotated features is accumulated under
    ``no_grad`` in ``sum_G[mode]`` (index assignment) and ``counter[mode] += 1``."""

    def __init__(self, num_features, num_concepts=2, eps=1e-3, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.mode = -1
        if affine:
            self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.register_buffer('running_mean', torch.zeros(num_features, 1))
        self.register_buffer('running_wm', torch.eye(num_features))
        q, _ = torch.linalg.qr(torch.randn(num_features, num_features, generator=_gen(5)))
        self.register_buffer('running_rot', q)
        self.register_buffer('sum_G', torch.zeros(num_concepts, num_features))
        self.register_buffer('counter', torch.ones(num_concepts) * 0.001)

    def update_rotation_matrix(self, lr=0.1):
        """Cayley transform step toward the concept directions (not called by forward)."""
        with torch.no_grad():
            G = self.sum_G / self.counter.view(-1, 1)
            R = self.running_rot
            grad = -G.t() @ (G @ R)
            A = grad @ R.t() - R @ grad.t()
            I = torch.eye(self.num_features, dtype=R.dtype)
            self.running_rot = torch.linalg.solve(I + 0.5 * lr * A, (I - 0.5 * lr * A) @ R)

    def forward(self, X):
        N, C, H, W = X.shape
        x = X.transpose(0, 1).reshape(C, -1)
        if self.training:
            mean = x.mean(1, keepdim=True)
            xc = x - mean
            sigma = xc @ xc.t() / xc.shape[1] + self.eps * torch.eye(C, dtype=x.dtype, device=x.device)
            e, v = torch.linalg.eigh(sigma)
            wm = v @ torch.diag(e.rsqrt()) @ v.t()
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
                self.running_wm.mul_(1 - self.momentum).add_(wm, alpha=self.momentum)
        else:
            xc = x - self.running_mean
            wm = self.running_wm
        xn = (wm @ xc).reshape(C, N, H, W).transpose(0, 1)
        X_hat = torch.einsum('bchw,dc->bdhw', xn, self.running_rot)
        with torch.no_grad():
            if self.mode >= 0:
                act = X_hat.mean(dim=(2, 3)).mean(0)
                self.sum_G[self.mode] = self.momentum * act + (1. - self.momentum) * self.sum_G[self.mode]
                self.counter[self.mode] += 1
        if self.affine:
            X_hat = X_hat * self.weight + self.bias
        return X_hat


class CWNet(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 2, 1, bias=False)
        self.cw = ConceptWhitening(width)
        self.cw.mode = 0
        self.conv3 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.cw(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _build_concept_whitening() -> nn.Module:
    torch.manual_seed(203)
    return CWNet()


# =========================================================================================
# 4. W-MSE (htdt/self-supervised style): forward returns the loss
# =========================================================================================
class Whitening2d(nn.Module):
    """W-MSE's ``Whitening2d``: embeddings as ``N×C×1×1``, covariance ``TTᵀ/(N-1)`` shrunk
    toward I, ``inv_sqrt = triangular_solve(I, cholesky(Σ))`` applied as a 1×1 ``conv2d``."""

    def __init__(self, num_features, eps=1e-2):
        super().__init__()
        self.num_features = num_features
        self.eps = eps

    def forward(self, x):
        x = x.unsqueeze(2).unsqueeze(3)
        m = x.mean(0).view(self.num_features, -1).mean(-1).view(1, -1, 1, 1)
        xn = x - m
        T = xn.permute(1, 0, 2, 3).contiguous().view(self.num_features, -1)
        f_cov = torch.mm(T, T.permute(1, 0)) / (T.shape[-1] - 1)
        eye = torch.eye(self.num_features).type(f_cov.type())
        f_cov_shrinked = (1 - self.eps) * f_cov + self.eps * eye
        inv_sqrt = torch.triangular_solve(eye, torch.linalg.cholesky(f_cov_shrinked), upper=False)[0]
        inv_sqrt = inv_sqrt.contiguous().view(self.num_features, self.num_features, 1, 1)
        decorrelated = F.conv2d(xn, inv_sqrt)
        return decorrelated.squeeze(2).squeeze(2)


def norm_mse_loss(x0, x1):
    x0 = F.normalize(x0)
    x1 = F.normalize(x1)
    return 2 - 2 * (x0 * x1).sum(dim=-1).mean()


class WMSE(nn.Module):
    """Two views through one encoder + projection head; embeddings whitened per view and
    sub-batch (sub-batches from ``torch.randperm``, written back by index assignment into
    ``torch.empty_like``), loss = normalised MSE between the whitened views."""

    def __init__(self, emb=4, w_iter=1, w_size=8):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, emb))
        self.whitening = Whitening2d(emb)
        self.w_iter = w_iter
        self.w_size = w_size
        self.loss_f = norm_mse_loss

    def forward(self, x1, x2):
        samples = [x1, x2]
        bs = len(x1)
        h = self.head(self.backbone(torch.cat(samples)))
        loss = 0
        for _ in range(self.w_iter):
            z = torch.empty_like(h)
            perm = torch.randperm(bs).view(-1, self.w_size)
            for idx in perm:
                for i in range(len(samples)):
                    z[idx + i * bs] = self.whitening(h[idx + i * bs])
            for i in range(len(samples) - 1):
                for j in range(i + 1, len(samples)):
                    x0 = z[i * bs: (i + 1) * bs]
                    x1_ = z[j * bs: (j + 1) * bs]
                    loss += self.loss_f(x0, x1_)
        loss /= self.w_iter
        return loss


def _build_wmse() -> nn.Module:
    torch.manual_seed(204)
    return WMSE()


def _wmse_inputs() -> tuple[Tensor, ...]:
    g = _gen(304)
    x = torch.randn(8, 3, 12, 12, generator=g)
    return (x + 0.1 * torch.randn(8, 3, 12, 12, generator=g), x + 0.1 * torch.randn(8, 3, 12, 12, generator=g))


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
# 6. Deep MLP with many group-whitening layers
# =========================================================================================
class GroupWhitening1d(nn.Module):
    """Batch group whitening for ``N×C`` features: covariance by ``torch.baddbmm`` (εI as the
    added term), batched ``torch.linalg.eigh``, ``wm = U (λ^{-1/2} ∘ Uᵀ)``; running stats by
    ``lerp_`` under ``no_grad``."""

    def __init__(self, num_features, num_groups=2, eps=1e-3, momentum=0.1):
        super().__init__()
        self.G = num_groups
        self.eps = eps
        self.momentum = momentum
        c = num_features // num_groups
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_wm', torch.eye(c).repeat(num_groups, 1, 1))

    def forward(self, x):
        N, C = x.shape
        G, c = self.G, C // self.G
        if self.training:
            mean = x.mean(0)
            xc = (x - mean).t().reshape(G, c, N)
            eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(G, c, c)
            cov = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=self.eps, alpha=1.0 / N)
            lam, U = torch.linalg.eigh(cov)
            wm = U @ (lam.rsqrt().unsqueeze(-1) * U.transpose(1, 2))
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_wm.lerp_(wm, self.momentum)
        else:
            xc = (x - self.running_mean).t().reshape(G, c, N)
            wm = self.running_wm
        out = torch.bmm(wm, xc).reshape(C, N).t()
        return out * self.weight + self.bias


class GWMLP(nn.Module):
    def __init__(self, in_dim=12, hidden=8, depth=32, num_classes=5):
        super().__init__()
        layers = []
        d = in_dim
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(d, hidden), GroupWhitening1d(hidden), nn.ReLU()))
            d = hidden
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.layers(x))


_GW_DEPTH = 32


def _build_gw_mlp_deep() -> nn.Module:
    torch.manual_seed(206)
    return GWMLP(depth=_GW_DEPTH)


def _vec_inputs() -> tuple[Tensor, ...]:
    return (torch.randn(16, 12, generator=_gen(306)),)


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


# =========================================================================================
# 8. Grouped DBN with momentum=None (cumulative moving average)
# =========================================================================================
class DBNGroups(nn.Module):
    """Grouped decorrelated BN: ``x.view(G, C//G, -1)``, batched ``torch.linalg.eigh``,
    ``wm = R diag(λ^{-1/2}) Rᵀ``; with ``momentum=None`` the running statistics are a
    cumulative average with factor ``1/float(num_batches_tracked)`` (the BN convention),
    updated in place under ``torch.no_grad()``. Works on ``N×C`` (``dim=2``) and ``N×C×H×W``."""

    def __init__(self, num_features, num_groups=2, dim=4, eps=1e-3, momentum=None, affine=True):
        super().__init__()
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        shape = [1, num_features] + [1] * (dim - 2)
        if affine:
            self.weight = nn.Parameter(torch.ones(*shape))
            self.bias = nn.Parameter(torch.zeros(*shape))
        c = num_features // num_groups
        self.register_buffer('running_mean', torch.zeros(num_groups, c, 1))
        self.register_buffer('running_projection', torch.eye(c).expand(num_groups, c, c).clone())
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, X):
        size = X.size()
        C, G = size[1], self.num_groups
        x = X.transpose(0, 1).contiguous().view(G, C // G, -1)
        if self.training:
            with torch.no_grad():
                self.num_batches_tracked += 1
            if self.momentum is None:
                f = 1.0 / float(self.num_batches_tracked)
            else:
                f = self.momentum
            mean = x.mean(-1, keepdim=True)
            xc = x - mean
            I = torch.eye(C // G, dtype=X.dtype, device=X.device)
            sigma = torch.matmul(xc, xc.transpose(1, 2)) / xc.size(2) + self.eps * I
            eig, rotation = torch.linalg.eigh(sigma)
            wm = rotation.matmul(torch.diag_embed(eig.pow(-0.5))).matmul(rotation.transpose(1, 2))
            with torch.no_grad():
                self.running_mean.mul_(1 - f).add_(mean, alpha=f)
                self.running_projection.mul_(1 - f).add_(wm, alpha=f)
        else:
            xc = x - self.running_mean
            wm = self.running_projection
        xn = wm.matmul(xc)
        Xn = xn.view(size[1], size[0], *size[2:]).transpose(0, 1).contiguous()
        if self.affine:
            Xn = Xn * self.weight + self.bias
        return Xn


class DBNGroupNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.dbn1 = DBNGroups(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.dbn2 = DBNGroups(8)
        self.fc1 = nn.Linear(32, 8)
        self.dbn3 = DBNGroups(8, dim=2)
        self.fc2 = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.dbn1(self.conv1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.dbn2(self.conv2(x))), 2).flatten(1)
        x = F.relu(self.dbn3(self.fc1(x)))
        return self.fc2(x)


def _build_dbn_groups() -> nn.Module:
    torch.manual_seed(208)
    return DBNGroupNet()


# =========================================================================================
# Negative 1. Gatys style transfer (PyTorch tutorial layout)
# =========================================================================================
def gram_matrix(input):
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class ContentLoss(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target.detach()

    def forward(self, input):
        self.loss = F.mse_loss(input, self.target)
        return input


class StyleLoss(nn.Module):
    def __init__(self, target_feature):
        super().__init__()
        self.target = gram_matrix(target_feature).detach()

    def forward(self, input):
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def forward(self, img):
        return (img - self.mean) / self.std


class StyleTransferModel(nn.Module):
    """``get_style_model_and_losses`` of the PyTorch neural-style tutorial on a tiny VGG:
    ``ContentLoss`` / ``StyleLoss`` modules inserted after convs store ``self.loss`` in
    forward; the Gram matrices are only compared by MSE (no matrix function). Returns
    ``(features, style_score, content_score)``."""

    def __init__(self, style_img, content_img, style_weight=1e3, content_weight=1.0):
        super().__init__()
        cnn = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        )
        content_layers, style_layers = ['conv_3'], ['conv_1', 'conv_2', 'conv_3', 'conv_4']
        normalization = Normalization([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        self.content_losses, self.style_losses = [], []
        model = nn.Sequential(normalization)
        i = 0
        for layer in cnn.children():
            if isinstance(layer, nn.Conv2d):
                i += 1
                name = 'conv_{}'.format(i)
            elif isinstance(layer, nn.ReLU):
                name = 'relu_{}'.format(i)
                layer = nn.ReLU(inplace=False)
            elif isinstance(layer, nn.MaxPool2d):
                name = 'pool_{}'.format(i)
            model.add_module(name, layer)
            with torch.no_grad():
                if name in content_layers:
                    content_loss = ContentLoss(model(content_img))
                    model.add_module("content_loss_{}".format(i), content_loss)
                    self.content_losses.append(content_loss)
                if name in style_layers:
                    style_loss = StyleLoss(model(style_img))
                    model.add_module("style_loss_{}".format(i), style_loss)
                    self.style_losses.append(style_loss)
        self.model = model
        self.style_weight = style_weight
        self.content_weight = content_weight

    def forward(self, input_img):
        out = self.model(input_img)
        style_score = sum(sl.loss for sl in self.style_losses) * self.style_weight
        content_score = sum(cl.loss for cl in self.content_losses) * self.content_weight
        return out, style_score, content_score


def _build_gram_style() -> nn.Module:
    torch.manual_seed(209)
    g = _gen(409)
    return StyleTransferModel(torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g))


def _style_inputs() -> tuple[Tensor, ...]:
    return (torch.rand(1, 3, 16, 16, generator=_gen(309)),)


# =========================================================================================
# Negative 2. ViT (einsum attention) with a covariance regulariser
# =========================================================================================
class EinsumAttention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        dots = torch.einsum('bhid,bhjd->bhij', q, k) * self.scale
        attn = dots.softmax(dim=-1)
        out = torch.einsum('bhij,bhjd->bhid', attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EinsumAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class ViTCovReg(nn.Module):
    """lucidrains-style ViT (einsum attention, mean pooling) whose projected embedding gets a
    VICReg/Barlow-style regulariser: batch covariance → off-diagonal squared sum, trace
    penalty, Frobenius norm (``torch.linalg.matrix_norm(ord='fro')``); plus a per-sample token
    covariance whose trace (``diagonal().sum``) is penalised. No matrix function anywhere.
    Returns ``(logits, reg)``."""

    def __init__(self, img=16, patch=4, dim=16, depth=2, emb=8, num_classes=10):
        super().__init__()
        self.to_patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, emb)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.to_patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        tok = x - x.mean(1, keepdim=True)
        tok_cov = tok.transpose(1, 2) @ tok / tok.shape[1]
        tok_reg = tok_cov.diagonal(dim1=-2, dim2=-1).sum(-1).mean()
        pooled = x.mean(1)
        z = self.proj(pooled)
        B, D = z.shape
        zc = z - z.mean(dim=0)
        cov = (zc.T @ zc) / (B - 1)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        reg = (off_diagonal(cov).pow(2).sum() / D + 1e-2 * (torch.trace(cov) - D) ** 2
               + 1e-3 * torch.linalg.matrix_norm(cov, ord='fro') + F.relu(1 - std).mean() + 1e-3 * tok_reg)
        return self.head(pooled), reg


def _build_vit_cov_reg() -> nn.Module:
    torch.manual_seed(210)
    return ViTCovReg()


# =========================================================================================
# The held-out corpus
# =========================================================================================
def _case(name, build, inputs, producers, n_meta, kinds, description) -> RealCodeCase:
    producers = frozenset(producers)
    return RealCodeCase(
        name=name, build=build, inputs=inputs, producers=producers,
        producer_params=frozenset(f"{p}.weight" for p in producers),
        n_meta_layers=n_meta, kinds=frozenset(kinds), description=description,
    )


EXTRA_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("sw_resnet", _build_sw_resnet, _images(301),
          ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"], 4, ["svd"],
          "ResNet whose BasicBlocks use SwitchWhiten2d (BW+IW+BN+IN mixed by softmax weights, torch.svd of the "
          "per-sample/per-group mixed covariance) after conv1 and conv2, before the residual add. The stem conv "
          "and the downsample conv feed no SW covariance (the stem reaches only layer1.0.conv1, which is the "
          "nearest producer; the downsample joins after sw2)."),
    _case("gw_after_add", _build_gw_after_add, _images(302),
          ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.0.downsample.0"], 3, ["eigh"],
          "ResNet with GroupWhitening (per-sample ZCA over 4 channel groups, eigh) applied AFTER each block's "
          "residual add. Truth = the nearest conv on every path into the add: layer1.0's add <- layer1.0.conv2 "
          "(via bn2) and the identity <- the stem conv1 (via bn1/relu); layer1.1's add <- layer1.1.conv2 and the "
          "identity, which walks back through layer1.0's whitening to layer1.0.conv2 and conv1 again; layer2.0's "
          "add <- layer2.0.conv2 and the 1x1 downsample conv layer2.0.downsample.0. The conv1 of each block feeds "
          "only its conv2 and is not a producer."),
    _case("concept_whitening", _build_concept_whitening, _images(303),
          ["conv2"], 1, ["eigh"],
          "Concept whitening after conv2: batch ZCA (eigh), then an orthogonal rotation buffer via einsum, "
          "concept stats accumulated under no_grad with index assignment (mode=0). conv1 precedes conv2; conv3 "
          "follows the whitening."),
    _case("wmse_loss", _build_wmse, _wmse_inputs,
          ["head.3"], 1, ["cholesky"],
          "W-MSE: forward(x1, x2) returns the loss. The last projection Linear head.3 (after BN1d/ReLU) feeds the "
          "Whitening2d covariance, called once per view (two covariances of one module with one producer: orthofx "
          "counts them as ONE meta-layer with 2 calls, by design): Cholesky + torch.triangular_solve, applied as "
          "a 1x1 conv2d; sub-batches from torch.randperm, written back by index assignment."),
    _case("mpncov_fn", _build_mpncov_fn, _images(305),
          ["layer_reduce"], 1, ["svd"],
          "MPN-COV ResNet: layer_reduce 1x1 conv + BN + ReLU, then ONE autograd.Function that forms the "
          "covariance x Î xᵀ and its matrix power (α=0.5) by a per-sample torch.svd loop in float64 "
          "(hand-written backward); triu indices as a non-persistent buffer."),
    _case("gw_mlp_deep", _build_gw_mlp_deep, _vec_inputs,
          [f"layers.{i}.0" for i in range(_GW_DEPTH)], _GW_DEPTH, ["eigh"],
          f"{_GW_DEPTH} x (Linear -> GroupWhitening1d (baddbmm covariance, batched eigh) -> ReLU) -> classifier; "
          "every hidden Linear is a producer, the classifier is not."),
    _case("soca_sr", _build_soca_sr, _images(307),
          ["groups.0.conv_last", "groups.1.conv_last"], 2, ["ns_sqrt"],
          "SAN-style SR net: each residual group ends conv_last -> SOCA (centre crop 12x12 of 16x16, covariance, "
          "plain-autograd NS sqrt, row mean, 1x1 conv_du bottleneck + sigmoid, reweights the input). The SOCA "
          "conv_du convs, body_tail, upsample and tail convs come after the matrix function."),
    _case("dbn_groups", _build_dbn_groups, _images(308, n=8),
          ["conv1", "conv2", "fc1"], 3, ["eigh"],
          "Grouped DBN (2 groups, batched linalg.eigh, momentum=None cumulative averages with "
          "1/float(num_batches_tracked), in-place updates under no_grad) after conv1, conv2 and fc1."),
]}

EXTRA_NEGATIVE_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gram_style", _build_gram_style, _style_inputs, [], 0, [],
          "Gatys style transfer (PyTorch tutorial): Gram matrices compared by MSE to fixed targets, losses "
          "stored as module attributes in forward; no matrix function."),
    _case("vit_cov_reg", _build_vit_cov_reg, _images(310, n=8), [], 0, [],
          "ViT with einsum q kᵀ attention and a covariance that only feeds off-diagonal/trace/Frobenius "
          "regularisers; no matrix function."),
]}

#: positive and negative held-out cases together
ALL_EXTRA_CASES: dict[str, RealCodeCase] = {**EXTRA_CASES, **EXTRA_NEGATIVE_CASES}
