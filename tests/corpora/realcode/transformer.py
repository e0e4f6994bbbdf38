"""A ViT, and a So-ViT-style second-order head with power iteration.

Part of :mod:`corpora.realcode`; the docstrings say which real code pattern each model imitates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn



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
