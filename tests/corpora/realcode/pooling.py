"""Global covariance pooling in the style of iSQRT-COV and MPN-COV (and a bilinear-pooling
negative that reaches no matrix function).

Part of :mod:`corpora.realcode`; the docstrings say which real code pattern each model imitates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function



# =========================================================================================
# 1-2. Global covariance pooling (iSQRT-COV / MPN-COV style)
# =========================================================================================
class Covpool(Function):
    """Covariance pooling ``X Î Xᵀ`` with the centring matrix ``Î = (1/M)(I - 11ᵀ/M)``,
    written as iSQRT-COV's ``Covpool`` is: shapes read from ``x.data.shape``, ``Î`` built
    from Python ints and repeated over the batch, hand-written backward."""

    @staticmethod
    def forward(ctx, input):
        x = input
        batchSize, dim, h, w = x.data.shape
        M = h * w
        x = x.reshape(batchSize, dim, M)
        I_hat = (-1. / M / M) * torch.ones(M, M, device=x.device) + (1. / M) * torch.eye(M, M, device=x.device)
        I_hat = I_hat.view(1, M, M).repeat(batchSize, 1, 1).type(x.dtype)
        y = x.bmm(I_hat).bmm(x.transpose(1, 2))
        ctx.save_for_backward(input, I_hat)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, I_hat = ctx.saved_tensors
        x = input
        batchSize, dim, h, w = x.data.shape
        M = h * w
        x = x.reshape(batchSize, dim, M)
        # y = x Î xᵀ  =>  dL/dx = (G + Gᵀ) x Î   (Î symmetric)
        grad_input = grad_output + grad_output.transpose(1, 2)
        grad_input = grad_input.bmm(x).bmm(I_hat)
        grad_input = grad_input.reshape(batchSize, dim, h, w)
        return grad_input


class Sqrtm(Function):
    """Coupled Newton–Schulz iteration for the matrix square root, pre-normalised by the
    trace and post-compensated by ``sqrt(trace)`` (iSQRT-COV's ``Sqrtm``). Y/Z iterates are
    kept in ``torch.zeros(batchSize, iterN, dim, dim)`` buffers for the backward, which
    back-propagates through every iteration by hand."""

    @staticmethod
    def forward(ctx, input, iterN):
        x = input
        batchSize = x.data.shape[0]
        dim = x.data.shape[1]
        dtype = x.dtype
        I3 = 3.0 * torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(batchSize, 1, 1).type(dtype)
        normA = (1.0 / 3.0) * x.mul(I3).sum(dim=1).sum(dim=1)
        A = x.div(normA.view(batchSize, 1, 1).expand_as(x))
        Y = torch.zeros(batchSize, iterN, dim, dim, requires_grad=False, device=x.device).type(dtype)
        Z = torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(batchSize, iterN, 1, 1).type(dtype)
        if iterN < 2:
            ZY = 0.5 * (I3 - A)
            YZY = A.bmm(ZY)
        else:
            ZY = 0.5 * (I3 - A)
            Y[:, 0, :, :] = A.bmm(ZY)
            Z[:, 0, :, :] = ZY
            for i in range(1, iterN - 1):
                ZY = 0.5 * (I3 - Z[:, i - 1, :, :].bmm(Y[:, i - 1, :, :]))
                Y[:, i, :, :] = Y[:, i - 1, :, :].bmm(ZY)
                Z[:, i, :, :] = ZY.bmm(Z[:, i - 1, :, :])
            YZY = 0.5 * Y[:, iterN - 2, :, :].bmm(I3 - Z[:, iterN - 2, :, :].bmm(Y[:, iterN - 2, :, :]))
        y = YZY * torch.sqrt(normA).view(batchSize, 1, 1).expand_as(x)
        ctx.save_for_backward(input, A, YZY, normA, Y, Z)
        ctx.iterN = iterN
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, A, YZY, normA, Y, Z = ctx.saved_tensors
        iterN = ctx.iterN
        x = input
        batchSize = x.data.shape[0]
        dim = x.data.shape[1]
        I = torch.eye(dim, dim, device=x.device).view(1, dim, dim).repeat(batchSize, 1, 1).type(x.dtype)
        sqrt_normA = torch.sqrt(normA).view(batchSize, 1, 1)
        g = grad_output * sqrt_normA                       # dL/dYZY
        grad_norm = (grad_output * YZY).sum(dim=(1, 2)) / (2.0 * torch.sqrt(normA))
        tr = lambda t: t.transpose(1, 2)  # noqa: E731
        if iterN < 2:
            # YZY = 1.5 A - 0.5 A²
            gA = 1.5 * g - 0.5 * (g.bmm(tr(A)) + tr(A).bmm(g))
        else:
            Yl = Y[:, iterN - 2, :, :]
            Zl = Z[:, iterN - 2, :, :]
            # YZY = 1.5 Y - 0.5 Y Z Y
            gY = 1.5 * g - 0.5 * (g.bmm(tr(Zl.bmm(Yl))) + tr(Yl.bmm(Zl)).bmm(g))
            gZ = -0.5 * tr(Yl).bmm(g).bmm(tr(Yl))
            for i in range(iterN - 2, 0, -1):
                Yp = Y[:, i - 1, :, :]
                Zp = Z[:, i - 1, :, :]
                T = 0.5 * (3.0 * I - Zp.bmm(Yp))           # Y_i = Y_{i-1} T, Z_i = T Z_{i-1}
                gT = tr(Yp).bmm(gY) + gZ.bmm(tr(Zp))
                gY, gZ = (gY.bmm(tr(T)) - 0.5 * tr(Zp).bmm(gT),
                          tr(T).bmm(gZ) - 0.5 * gT.bmm(tr(Yp)))
            ZY0 = 0.5 * (3.0 * I - A)                       # Y_0 = A ZY0, Z_0 = ZY0
            gZY0 = tr(A).bmm(gY) + gZ
            gA = gY.bmm(tr(ZY0)) - 0.5 * gZY0
        # A = x / tr(x)
        grad_input = gA / normA.view(batchSize, 1, 1)
        grad_norm = grad_norm - (gA * x).sum(dim=(1, 2)) / (normA * normA)
        grad_input = grad_input + grad_norm.view(batchSize, 1, 1) * I
        return grad_input, None


class Triuvec(Function):
    """Upper-triangular vectorisation with an index built by ``torch.ones(dim,dim).triu()``
    and ``nonzero`` (iSQRT-COV's ``Triuvec``); the backward scatters into a zero buffer."""

    @staticmethod
    def forward(ctx, input):
        x = input
        batchSize = x.data.shape[0]
        dim = x.data.shape[1]
        dtype = x.dtype
        x = x.reshape(batchSize, dim * dim)
        I = torch.ones(dim, dim).triu().view(dim * dim)
        index = I.nonzero(as_tuple=False).view(-1).to(x.device)
        y = torch.zeros(batchSize, int(dim * (dim + 1) / 2), device=x.device).type(dtype)
        y = x[:, index]
        ctx.save_for_backward(input, index)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, index = ctx.saved_tensors
        x = input
        batchSize = x.data.shape[0]
        dim = x.data.shape[1]
        grad_input = torch.zeros(batchSize, dim * dim, device=x.device, requires_grad=False).type(x.dtype)
        grad_input[:, index] = grad_output
        grad_input = grad_input.reshape(batchSize, dim, dim)
        return grad_input


class SqrtmSVD(Function):
    """Matrix square root by ``torch.svd`` in float64 with the eigen-formula backward
    (``dL/dA = U (L ∘ Uᵀ Ḡ U) Uᵀ`` with ``L_ij = (√λi − √λj) K_ij``, ``K_ij = 1/(λi − λj)``),
    as in the SVD baselines of the MPN-COV / iSQRT-COV papers."""

    @staticmethod
    def forward(ctx, input, eps):
        x = input.double()
        batchSize = x.data.shape[0]
        dim = x.data.shape[1]
        I = torch.eye(dim, dim, device=x.device, dtype=x.dtype).view(1, dim, dim).repeat(batchSize, 1, 1)
        U, S, V = torch.svd(x + eps * I)
        y = U.bmm(torch.diag_embed(S.sqrt())).bmm(U.transpose(1, 2))
        ctx.save_for_backward(U, S)
        ctx.in_dtype = input.dtype
        return y.type(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        U, S = ctx.saved_tensors
        g = grad_output.double()
        g = 0.5 * (g + g.transpose(1, 2))
        diff = S.unsqueeze(2) - S.unsqueeze(1)             # λi − λj
        K = 1.0 / diff
        close = diff.abs() <= 1e-10 * S.max(dim=1, keepdim=True).values.unsqueeze(2)
        K[close] = 0.0
        f = S.sqrt()
        fi, fj = f.unsqueeze(2), f.unsqueeze(1)
        L = torch.where(close, 1.0 / (fi + fj), (fi - fj) * K)
        inner = U.transpose(1, 2).bmm(g).bmm(U)
        grad = U.bmm(L * inner).bmm(U.transpose(1, 2))
        return grad.type(ctx.in_dtype), None


def CovpoolLayer(var):
    return Covpool.apply(var)


def SqrtmLayer(var, iterN):
    return Sqrtm.apply(var, iterN)


def TriuvecLayer(var):
    return Triuvec.apply(var)


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        out = self.relu(out)
        return out


class GCPResNet(nn.Module):
    """iSQRT-COV ResNet: stem, basic blocks, ``layer_reduce`` (1×1 conv, BN, ReLU), then the
    three Functions ``Covpool`` → ``Sqrtm`` (5 NS iterations) → ``Triuvec``, then ``fc``."""

    def __init__(self, layers=(1, 1), num_classes=10, width=8, reduced=8, iterN=5):
        super().__init__()
        self.inplanes = width
        self.iterN = iterN
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(BasicBlock, width * 2, layers[1], stride=2)
        self.layer_reduce = nn.Sequential(
            nn.Conv2d(width * 2, reduced, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(int(reduced * (reduced + 1) / 2), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer_reduce(x)
        x = CovpoolLayer(x)
        x = SqrtmLayer(x, self.iterN)
        x = TriuvecLayer(x)
        x = x.view(x.size(0), -1)
        x = self.fc(x)
        return x


class MPNCOV(nn.Module):
    """MPN-COV representation block: optional ``conv_dr_block`` (1×1 conv, BN, ReLU), then
    covariance pooling, matrix square root and triu vectorisation. ``method`` picks the
    square root: ``"ns"`` (``Sqrtm``) or ``"svd"`` (``SqrtmSVD``, float64)."""

    def __init__(self, iterNum=5, is_sqrt=True, is_vec=True, input_dim=16, dimension_reduction=None,
                 method="svd", eps=1e-6):
        super().__init__()
        self.iterNum = iterNum
        self.is_sqrt = is_sqrt
        self.is_vec = is_vec
        self.dr = dimension_reduction
        self.method = method
        self.eps = eps
        if self.dr is not None:
            self.conv_dr_block = nn.Sequential(
                nn.Conv2d(input_dim, self.dr, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(self.dr),
                nn.ReLU(inplace=True),
            )
        output_dim = self.dr if self.dr else input_dim
        if self.is_vec:
            self.output_dim = int(output_dim * (output_dim + 1) / 2)
        else:
            self.output_dim = int(output_dim * output_dim)
        self._init_weight()

    def _init_weight(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _cov_pool(self, x):
        return Covpool.apply(x)

    def _sqrtm(self, x):
        if self.method == "svd":
            return SqrtmSVD.apply(x, self.eps)
        return Sqrtm.apply(x, self.iterNum)

    def _triuvec(self, x):
        return Triuvec.apply(x)

    def forward(self, x):
        if self.dr is not None:
            x = self.conv_dr_block(x)
        x = self._cov_pool(x)
        if self.is_sqrt:
            x = self._sqrtm(x)
        if self.is_vec:
            x = self._triuvec(x)
        return x


class GCPNetSVD(nn.Module):
    """A small conv trunk with an ``MPNCOV(method="svd")`` representation and ``fc``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.representation = MPNCOV(input_dim=16, dimension_reduction=8, method="svd")
        self.fc = nn.Linear(self.representation.output_dim, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.representation(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def _build_gcp_isqrt() -> nn.Module:
    torch.manual_seed(0)
    return GCPResNet()


def _build_gcp_svd() -> nn.Module:
    torch.manual_seed(1)
    return GCPNetSVD()


class GCPNoMatFn(nn.Module):
    """Bilinear (covariance) pooling without a matrix function: ``layer_reduce`` → batched
    ``X Xᵀ / M`` → element-wise signed square root → L2 normalisation → flatten → fc
    (B-CNN style). Negative case."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.layer_reduce = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.fc = nn.Linear(36, num_classes)

    def forward(self, x):
        x = self.layer_reduce(self.features(x))
        batchSize, dim, h, w = x.data.shape
        x = x.view(batchSize, dim, h * w)
        x = torch.bmm(x, torch.transpose(x, 1, 2)) / (h * w)
        x = x.view(batchSize, dim * dim)
        x = torch.sign(x) * torch.sqrt(torch.abs(x) + 1e-10)
        x = F.normalize(x)
        return self.fc(x)


def _build_gcp_no_matfn() -> nn.Module:
    torch.manual_seed(2)
    return GCPNoMatFn()
