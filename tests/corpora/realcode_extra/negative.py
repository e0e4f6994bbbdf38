"""The held-out corpus's negatives: Gram matrices (Gatys style transfer) and a covariance
regulariser in a ViT, neither reaching a matrix function.

Part of :mod:`corpora.realcode_extra`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corpora.case import _gen


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
