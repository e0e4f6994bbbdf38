"""Whitening layers of the held-out corpus: Switchable Whitening, group whitening after the
residual add, concept whitening, W-MSE (a model whose forward returns the loss), a deep MLP
of group-whitening layers and grouped DBN.

Part of :mod:`corpora.realcode_extra`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corpora.case import _gen


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
