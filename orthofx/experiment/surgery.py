"""Insert meta-layers into torchvision models the way users write them (raw ``torch.linalg``).

Used by ``orthofx report`` to show the pass on real architectures, and by the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from orthofx.errors import ConfigError

__all__ = ["TorchGCPHead", "TorchZCAWhitening", "add_gcp_head", "add_whitening_stem"]


class TorchGCPHead(nn.Module):
    """A GCP head as users write it: 1×1 conv reduction + BN + ReLU, centred covariance,
    ``torch.linalg.eigh`` and U diag(√λ) Uᵀ, upper triangle."""

    def __init__(self, in_channels: int, reduced: int = 256, eps: float = 1e-5) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduced, 1, bias=False)
        self.bn = nn.BatchNorm2d(reduced)
        self.eps = eps
        self.out_features = reduced * (reduced + 1) // 2
        self.register_buffer("idx", torch.triu_indices(reduced, reduced), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.reduce(x)))
        n, c, h, w = x.shape
        f = x.reshape(n, c, h * w)
        f = f - f.mean(dim=2, keepdim=True)
        cov = f @ f.transpose(1, 2) / (h * w) + self.eps * torch.eye(c, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        root = u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)
        return root[:, self.idx[0], self.idx[1]]


class TorchZCAWhitening(nn.Module):
    """ZCA whitening as users write it (training-mode batch statistics only)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        f = x.permute(1, 0, 2, 3).reshape(c, -1)
        f = f - f.mean(dim=1, keepdim=True)
        cov = f @ f.t() / f.shape[1] + self.eps * torch.eye(c, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        white = u @ torch.diag(lam.rsqrt()) @ u.t() @ f
        y = white.reshape(c, n, h, w).permute(1, 0, 2, 3)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def _require(model: nn.Module, *names: str) -> None:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise ConfigError(
            f"{type(model).__name__} has no {', '.join(missing)}: head/stem insertion supports "
            "ResNet-style models (conv1, bn1, avgpool, fc); pass a module:callable spec instead"
        )


def add_gcp_head(model: nn.Module, reduced: int = 256) -> nn.Module:
    """Replace a ResNet-style ``avgpool``+``fc`` by :class:`TorchGCPHead` + a new ``fc``."""
    _require(model, "avgpool", "fc")
    in_ch = model.fc.in_features
    model.avgpool = TorchGCPHead(in_ch, reduced)
    model.fc = nn.Linear(model.avgpool.out_features, model.fc.out_features)
    return model


def add_whitening_stem(model: nn.Module) -> nn.Module:
    """Replace a ResNet-style ``bn1`` (after the stem conv) by :class:`TorchZCAWhitening`."""
    _require(model, "conv1", "bn1")
    model.bn1 = TorchZCAWhitening(model.conv1.out_channels)
    return model
