"""The paper's torchvision architectures as the experiments build them (the ``models`` extra).

* :func:`cifar_resnet50_dbn` — torchvision ResNet-50 with a 3×3 stride-1 stem, no max-pool,
  and ``bn1`` replaced by whitening (the paper's decorrelated-BN model).
* :func:`resnet18_gcp` — torchvision ResNet-18 whose average pool is replaced by global
  covariance pooling with a 1×1 reduction to 256 channels (the paper's GCP model). Its
  ``backend`` defaults to "eigh"; the public :func:`orthofx.models.resnet18_gcp` (keyword
  options, ``backend="auto"``) calls it.
"""

from __future__ import annotations

from torch import nn

from orthofx._optional import require
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm

__all__ = ["cifar_resnet50_dbn", "resnet18_gcp"]


def cifar_resnet50_dbn(
    num_classes: int = 10, whitening_backend: str = "eigh", whitening_eps: float = 1e-2, in_channels: int = 3
) -> nn.Module:
    """torchvision ResNet-50, CIFAR stem (3×3, stride 1, no max-pool), ``bn1`` → ZCA whitening."""
    torchvision = require("torchvision", "models", purpose="resnet50-dbn")

    m = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.bn1 = DecorrelatedBatchNorm(64, eps=whitening_eps, backend=whitening_backend, running="covariance")
    return m


def resnet18_gcp(
    num_classes: int = 1000, reduced: int = 256, backend: str = "eigh", eps: float = 1e-5, in_channels: int = 3
) -> nn.Module:
    """torchvision ResNet-18 with global covariance pooling: 1×1 conv to ``reduced`` channels
    (the Pre-SVD layer) + BN + ReLU, covariance, matrix square root, upper triangle, FC."""
    torchvision = require("torchvision", "models", purpose="resnet18-gcp")

    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    m.avgpool = CovariancePooling(512, reduced=reduced, eps=eps, backend=backend)
    m.fc = nn.Linear(m.avgpool.out_features, num_classes)
    return m
