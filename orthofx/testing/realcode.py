"""Small models written in the style of public research code, each with its planted truth.

The generated models of :mod:`orthofx.testing.strategies` are written to be easy to trace.
The models here are not: they imitate how covariance / whitening / second-order pooling
networks are actually written in research repositories —

* ``torch.autograd.Function`` s with hand-written backwards, concrete shapes read from
  ``x.data.shape``, index buffers built with ``nonzero``, ``torch.zeros`` scratch buffers
  filled in place, identity matrices built with ``.repeat`` from Python ints;
* running statistics updated in place inside a Function, or by *reassigning* the buffer in
  ``forward`` (``self.running_projection = ...``);
* Python control flow on tensor values (``while err.item() > tol``, ``if (s_e < 1e-5).any()``),
  ``.item()`` in a meta-layer's forward, bound ``Function.apply`` attributes, submodules that
  ``forward`` never calls, buffers that nothing reads;
* covariance helpers that are also called on features whose covariance reaches no matrix
  function (decoys), attention ``q kᵀ`` that is *not* a meta-layer.

Every model is tiny (a few channels, 8×8–32×32 inputs, batch 4) so the whole corpus runs in
seconds on a CPU. Each :class:`RealCodeCase` carries its ground truth: the Pre-SVD modules
(``producers``), their weight parameters (``producer_params``), the number of distinct
covariances that reach a matrix function (``n_meta_layers``) and the kinds of those matrix
functions (``kinds``, among :data:`KINDS`).

All code here was written for orthofx; the docstrings say which real code pattern each model
imitates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

__all__ = [
    "KINDS",
    "RealCodeCase",
    "CASES",
    "NEGATIVE_CASES",
    "ALL_CASES",
    # autograd Functions with hand-written backwards (gradchecked in tests/test_realcode.py)
    "Covpool",
    "Sqrtm",
    "Triuvec",
    "SqrtmSVD",
    "iterative_normalization_py",
    "MPA_Lya",
    "MatSqrtInvFn",
    "pade_coefficients",
]

#: the kind strings a case's ``kinds`` is drawn from
KINDS: frozenset[str] = frozenset({
    "eigh", "svd", "eig", "cholesky", "inverse", "solve", "ns_sqrt", "ns_invsqrt", "pade",
    "power_iteration",
})


@dataclass(frozen=True)
class RealCodeCase:
    """One real-code-style model and its planted ground truth.

    Attributes:
        name: key in :data:`CASES` / :data:`NEGATIVE_CASES`.
        build: returns a fresh model; deterministic (seeds torch inside).
        inputs: returns fresh example inputs (a tuple); deterministic.
        producers: qualified names of the Pre-SVD modules (the module owning the weight; for a
            bare ``nn.Parameter`` the module owning that Parameter).
        producer_params: qualified names of the producers' weight parameters.
        n_meta_layers: number of distinct covariances that reach a matrix function.
        kinds: the kinds of matrix function those covariances reach (see :data:`KINDS`).
        description: what the model imitates and why the truth is what it is.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Tensor, ...]]
    producers: frozenset[str]
    producer_params: frozenset[str]
    n_meta_layers: int
    kinds: frozenset[str]
    description: str


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(seed: int, n: int = 4, c: int = 3, h: int = 16, w: int | None = None) -> Callable[[], tuple[Tensor, ...]]:
    def make() -> tuple[Tensor, ...]:
        return (torch.randn(n, c, h, w or h, generator=_gen(seed)),)
    return make


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


# =========================================================================================
# 6. ViT, and a So-ViT-style second-order head with power iteration
# =========================================================================================
class PatchEmbed(nn.Module):
    def __init__(self, img_size=16, patch_size=4, in_chans=3, embed_dim=16):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x


class Attention(nn.Module):
    def __init__(self, dim, num_heads=2, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """timm-style ViT: conv patch embedding, cls token, learned position embedding, pre-norm
    blocks with softmax attention (``q kᵀ`` is a token Gram matrix, not a meta-layer)."""

    def __init__(self, img_size=16, patch_size=4, num_classes=10, embed_dim=16, depth=2, num_heads=2):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x[:, 0])


class SoTHead(nn.Module):
    """Second-order token head: a token-mixing ``nn.Linear`` reduces the N visual tokens,
    two projections give q and k (``proj_q``/``proj_k``, or one ``proj_qk`` whose output is
    ``.chunk(2, -1)``), the cross-covariance ``qᵀ k / N`` is normalised by its top singular
    value, found by power iteration with a data-dependent stop (``err.item() > tol``)."""

    def __init__(self, num_tokens, embed_dim, reduced_tokens=8, proj_dim=6, num_classes=10,
                 fused=False, max_iter=30, tol=1e-5):
        super().__init__()
        self.fused = fused
        self.max_iter = max_iter
        self.tol = tol
        self.token_reduce = nn.Linear(num_tokens, reduced_tokens)
        if fused:
            self.proj_qk = nn.Linear(embed_dim, 2 * proj_dim)
        else:
            self.proj_q = nn.Linear(embed_dim, proj_dim)
            self.proj_k = nn.Linear(embed_dim, proj_dim)
        self.fc = nn.Linear(proj_dim * proj_dim, num_classes)

    def power_iteration(self, A):
        B, d, _ = A.shape
        v = torch.ones(B, d, 1, device=A.device, dtype=A.dtype) / math.sqrt(d)
        u = F.normalize(A.bmm(v), dim=1)
        err = torch.tensor(float('inf'))
        it = 0
        while it < self.max_iter and err.item() > self.tol:
            u = F.normalize(A.bmm(v), dim=1)
            v_new = F.normalize(A.transpose(1, 2).bmm(u), dim=1)
            err = (v_new - v).abs().max()
            v = v_new
            it += 1
        sigma = u.transpose(1, 2).bmm(A).bmm(v)
        return u, sigma, v

    def forward(self, x):
        x = self.token_reduce(x.transpose(1, 2)).transpose(1, 2)
        if self.fused:
            q, k = self.proj_qk(x).chunk(2, -1)
        else:
            q = self.proj_q(x)
            k = self.proj_k(x)
        N = x.shape[1]
        cov = q.transpose(1, 2) @ k / N
        _, sigma, _ = self.power_iteration(cov)
        cov = cov / (sigma.abs() + 1e-5)
        return self.fc(cov.flatten(1))


class SoViT(VisionTransformer):
    def __init__(self, fused=False, **kw):
        super().__init__(**kw)
        self.so_head = SoTHead(self.patch_embed.num_patches, self.head.in_features, fused=fused,
                               num_classes=self.head.out_features)

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x[:, 0]) + self.so_head(x[:, 1:])


def _build_sovit_head() -> nn.Module:
    torch.manual_seed(6)
    return SoViT(fused=False)


def _build_sovit_head_chunk() -> nn.Module:
    torch.manual_seed(7)
    return SoViT(fused=True)


def _build_vit_plain() -> nn.Module:
    torch.manual_seed(8)
    return VisionTransformer()


# =========================================================================================
# 7. WCT style transfer
# =========================================================================================
class MatSqrtInvFn(Function):
    """``Σ^{-1/2} = U diag(λ^{-1/2}) Uᵀ`` by ``torch.linalg.eigh`` with the Daleckii–Krein
    backward (``K_ij = 1/(λi − λj)``; the closed form where eigenvalues are close)."""

    @staticmethod
    def forward(ctx, cov):
        lam, U = torch.linalg.eigh(cov)
        f = lam.rsqrt()
        out = U @ torch.diag_embed(f) @ U.transpose(-1, -2)
        ctx.save_for_backward(lam, U)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        lam, U = ctx.saved_tensors
        g = 0.5 * (grad_output + grad_output.transpose(-1, -2))
        li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
        diff = li - lj
        close = diff.abs() <= 1e-6 * lam.abs().amax(-1, keepdim=True).unsqueeze(-1)
        K = torch.where(close, torch.zeros_like(diff), 1.0 / torch.where(close, torch.ones_like(diff), diff))
        f = lam.rsqrt()
        fi, fj = f.unsqueeze(-1), f.unsqueeze(-2)
        si, sj = li.sqrt(), lj.sqrt()
        L = torch.where(close, -1.0 / (si * sj * (si + sj)), (fi - fj) * K)
        inner = U.transpose(-1, -2) @ g @ U
        return U @ (L * inner) @ U.transpose(-1, -2)


def _vgg_encoder() -> nn.Sequential:
    enc = nn.Sequential(
        nn.Conv2d(3, 3, 1),
        nn.ReflectionPad2d(1), nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True),
        nn.ReflectionPad2d(1), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.ReflectionPad2d(1), nn.Conv2d(8, 12, 3), nn.ReLU(inplace=True),
    )
    for m in enc.modules():  # stands in for the pretrained VGG weights WCT loads
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            with torch.no_grad():  # zero-mean (edge-detector-like) filters: no channel is dead
                m.weight -= m.weight.mean(dim=(1, 2, 3), keepdim=True)
            nn.init.constant_(m.bias, 0.5)
    return enc


class WCTGenerator(nn.Module):
    """Universal-style-transfer WCT: a shared ``encoder`` (VGG relu2_1-like, ends with
    ``encoder.9`` conv + ReLU) encodes content and style; content features are whitened by
    ``self.sqrt_inv`` (``MatSqrtInvFn.apply`` bound in ``__init__``) of their covariance + I,
    then coloured with ``U Λ^{1/2} Uᵀ`` of the style covariance from ``torch.svd`` (truncated
    at the first eigenvalue below 1e-5, a data-dependent Python loop); ``decoder`` maps back.
    ``c_encoder``/``s_encoder`` are the per-domain encoders a training loop uses for its
    perceptual losses; ``forward`` never calls them."""

    def __init__(self, alpha=0.6):
        super().__init__()
        self.alpha = alpha
        self.encoder = _vgg_encoder()
        self.c_encoder = _vgg_encoder()
        self.s_encoder = _vgg_encoder()
        self.decoder = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(12, 8, 3), nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode='nearest'),
            nn.ReflectionPad2d(1), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(8, 3, 3),
        )
        self.sqrt_inv = MatSqrtInvFn.apply

    def whiten_and_color(self, cF, sF):
        B, C, H, W = cF.size()
        cF = cF.view(B, C, -1)
        c_mean = torch.mean(cF, 2, keepdim=True)
        cF = cF - c_mean
        I = torch.eye(C, device=cF.device, dtype=cF.dtype).unsqueeze(0)
        contentConv = torch.bmm(cF, cF.transpose(1, 2)) / (H * W - 1) + I
        whiten_cF = torch.bmm(self.sqrt_inv(contentConv), cF)

        sB, sC, sH, sW = sF.size()
        sF = sF.view(sB, sC, -1)
        s_mean = torch.mean(sF, 2, keepdim=True)
        sF = sF - s_mean
        styleConv = torch.bmm(sF, sF.transpose(1, 2)) / (sH * sW - 1)
        s_u, s_e, s_v = torch.svd(styleConv)
        k_s = sC
        for i in range(sC - 1, -1, -1):
            if (s_e[:, i] >= 0.00001).all():
                break
            k_s = i
        s_d = s_e[:, :k_s].pow(0.5)
        color = torch.bmm(torch.bmm(s_u[:, :, :k_s], torch.diag_embed(s_d)), s_u[:, :, :k_s].transpose(1, 2))
        targetFeature = torch.bmm(color, whiten_cF) + s_mean
        return targetFeature.view(B, C, H, W)

    def forward(self, content, style):
        cF = self.encoder(content)
        sF = self.encoder(style)
        csF = self.whiten_and_color(cF, sF)
        csF = self.alpha * csF + (1.0 - self.alpha) * cF
        return self.decoder(csF)


def _build_wct() -> nn.Module:
    torch.manual_seed(9)
    return WCTGenerator()


def _wct_inputs() -> tuple[Tensor, ...]:
    g = _gen(109)
    return torch.randn(4, 3, 16, 16, generator=g), 2 * torch.rand(4, 3, 16, 16, generator=g) - 1


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


# =========================================================================================
# The corpus
# =========================================================================================
def _params(names) -> frozenset[str]:
    return frozenset(f"{n}.weight" for n in names)


_ITERNORM_CONVS = _vgg_conv_names(_VGG16_CFG, "features", 3)
_DBN_CONVS = _vgg_conv_names(_VGG16E_CFG, "features", 3)


def _case(name, build, inputs, producers, n_meta, kinds, description, params=None) -> RealCodeCase:
    producers = frozenset(producers)
    return RealCodeCase(
        name=name, build=build, inputs=inputs, producers=producers,
        producer_params=frozenset(params) if params is not None else _params(producers),
        n_meta_layers=n_meta, kinds=frozenset(kinds), description=description,
    )


CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gcp_isqrt", _build_gcp_isqrt, _images(100), ["layer_reduce.0"], 1, ["ns_sqrt"],
          "iSQRT-COV ResNet: layer_reduce (1x1 conv, BN, ReLU) -> Covpool -> Sqrtm (coupled NS, 5 iters, "
          "trace-normalised) -> Triuvec -> fc; all three autograd.Functions with hand-written backwards."),
    _case("gcp_svd", _build_gcp_svd, _images(101), ["representation.conv_dr_block.0"], 1, ["svd"],
          "MPN-COV block with conv_dr_block; square root by torch.svd in float64 inside a Function with the "
          "1/(λi−λj) backward."),
    _case("iternorm_vgg", _build_iternorm_vgg, _images(102, h=32), _ITERNORM_CONVS, len(_ITERNORM_CONVS),
          ["ns_invsqrt"],
          "VGG-16 (13 convs, 8-16 channels) with IterNorm (groups of 4 channels, T=5 NS inverse-sqrt steps by "
          "baddbmm, running stats updated in place inside the Function) after every conv."),
    _case("dbn_vgg16", _build_dbn_vgg16, _images(103, h=32), _DBN_CONVS, len(_DBN_CONVS), ["svd"],
          "VGG with 16 convs (the 'E' layout, 8 channels) each followed by DBN: sigma.svd() ZCA whitening, "
          "running_projection reassigned in forward; eval uses running_projection."),
    _case("zca_pade", _build_zca_pade, _images(104), ["conv2"], 1, ["pade"],
          "ZCA whitening: covariance -> MPA_Lya (Padé [5/5] square root via linalg.solve, Lyapunov backward) "
          "-> torch.inverse; an unused registered buffer (running_subspace). conv1 feeds conv2, only conv2 is "
          "the Pre-SVD layer."),
    _case("sovit_head", _build_sovit_head, _images(105), ["so_head.proj_q", "so_head.proj_k"], 1,
          ["power_iteration"],
          "ViT (2 blocks of softmax attention, not meta-layers) + So-ViT-like head: token_reduce Linear on the "
          "token axis, proj_q / proj_k, cross-covariance qᵀk/N, power iteration with `while ... err.item() > "
          "tol`. token_reduce precedes the projections, so it is not a producer."),
    _case("sovit_head_chunk", _build_sovit_head_chunk, _images(106), ["so_head.proj_qk"], 1, ["power_iteration"],
          "As sovit_head, but q, k = proj_qk(x).chunk(2, -1): one Linear produces both sides."),
    _case("wct", _build_wct, _wct_inputs, ["encoder.9"], 2, ["eigh", "svd"],
          "WCT generator forward(content, style): the shared encoder's last conv (encoder.9, then ReLU) feeds "
          "both the content covariance (whitened by MatSqrtInvFn.apply bound as self.sqrt_inv: eigh inside a "
          "Function) and the style covariance (coloured via torch.svd). c_encoder / s_encoder are never called "
          "by forward and hold no producer."),
    _case("spd_net", _build_spd_net, _spd_inputs, ["bimap1", "bimap2"], 2, ["eigh"],
          "SPDNet: covariance of raw signals formed in forward, BiMap (bare nn.Parameter W, Wᵀ X W) -> ReEig "
          "(eigh, clamp) -> BiMap -> ReEig -> LogEig (eigh, log). The covariances are the two congruences "
          "W1ᵀΣW1 and W2ᵀ X1 W2; LogEig decomposes ReEig2's output (no new covariance, producer still bimap2).",
          params=["bimap1.W", "bimap2.W"]),
    _case("cholesky_whiten", _build_cholesky_whiten, _images(111), ["conv1", "conv2"], 2, ["cholesky"],
          "Group whitening by Cholesky (2 groups): linalg.cholesky, solve_triangular for L^{-1}, applied by "
          "F.conv2d(x, w.view(C, C//G, 1, 1), groups=G); after conv1 and after conv2."),
    _case("decoy_cov", _build_decoy_cov, _images(112), ["conv3"], 1, ["eigh"],
          "Per-sample ZCA after conv3 (eigh). The same covariance helper is applied to conv1's and conv2's "
          "outputs (DeCov Frobenius penalty, returned) and to the whitened output (logged via .item()); those "
          "reach no matrix function. forward returns (logits, penalty)."),
    _case("item_forward", _build_item_forward, _token_inputs, ["proj"], 1, ["eigh"],
          "Token features -> Linear proj -> covariance square root whose ε is computed with .item() in the "
          "meta-layer's forward (eigh)."),
]}

NEGATIVE_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gcp_no_matfn", _build_gcp_no_matfn, _images(120), [], 0, [],
          "Bilinear pooling (bmm covariance) -> signed sqrt -> L2 normalise -> fc: a covariance, no matrix "
          "function."),
    _case("vit_plain", _build_vit_plain, _images(121), [], 0, [],
          "Plain ViT: attention q kᵀ -> softmax -> @ v only."),
    _case("buffer_reassign_untraceable", _build_buffer_reassign_untraceable, _images(122), [], 0, [],
          "Running buffers reassigned in forward, data-dependent `if`/`while` on tensor values (symbolic fx "
          "tracing fails); no covariance, no matrix function."),
]}

#: positive and negative cases together
ALL_CASES: dict[str, RealCodeCase] = {**CASES, **NEGATIVE_CASES}
