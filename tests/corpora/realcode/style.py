"""WCT style transfer (whitening and colouring transforms of encoder features).

Part of :mod:`corpora.realcode`; the docstrings say which real code pattern each model imitates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from corpora.case import _gen


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
