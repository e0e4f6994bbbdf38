"""Global covariance pooling with a raw ``torch.linalg.eigh`` square root, shared by the
tests: (N, C, H, W) features → per image Σ = F̄ F̄ᵀ / (H·W) + 10⁻³ I (F̄ the centred (C, H·W)
features) → Σ^{1/2} = U diag(max(λ, 10⁻¹²))^{1/2} Uᵀ → a linear head."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EighNet", "cov_sqrt"]


def cov_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Σ^{1/2} (N, C, C) of each image's centred channel covariance, by ``torch.linalg.eigh``."""
    n, c, h, w = x.shape
    f = x.reshape(n, c, h * w)
    f = f - f.mean(dim=-1, keepdim=True)
    cov = f @ f.transpose(1, 2) / (h * w) + 1e-3 * torch.eye(c)
    lam, u = torch.linalg.eigh(cov)
    return u @ torch.diag_embed(lam.clamp_min(1e-12).sqrt()) @ u.transpose(1, 2)


class EighNet(nn.Module):
    """Conv 3→8 → ReLU → 1×1 reduction 8→6 → ReLU → :func:`cov_sqrt` → linear on all 36
    entries of Σ^{1/2}, or with ``triu=True`` on its 21 upper-triangle entries."""

    def __init__(self, classes: int = 4, triu: bool = False) -> None:
        super().__init__()
        self.triu = triu
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 6, 1, bias=False)
        self.fc = nn.Linear(21 if triu else 36, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        root = cov_sqrt(torch.relu(self.reduce(torch.relu(self.conv1(x)))))
        if not self.triu:
            return self.fc(root.flatten(1))
        c = root.shape[-1]
        i, j = torch.triu_indices(c, c)
        return self.fc(root[:, i, j])
