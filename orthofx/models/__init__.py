"""The paper's architectures, as a public import path.

* :func:`resnet18_gcp` — torchvision ResNet-18 whose average pool is global covariance
  pooling: a 1×1 conv to ``reduced`` channels (the Pre-SVD layer) → BN → ReLU → Σ = X Xᵀ/M + εI →
  Σ^{1/2} → upper triangle → FC (Song et al. Sec. 6.2).
* :func:`resnet50_dbn` — torchvision ResNet-50 with a CIFAR stem (3×3, stride 1, no max-pool)
  whose ``bn1`` is ZCA whitening (Σ + εI)^{-1/2} (decorrelated BN, Sec. 6.1).
* :class:`SmallResNetGCP`, :class:`SmallResNetDBN` — the same heads on small ResNets for
  28×28 grey images (the CPU-scale experiments of ``orthofx train``); :class:`RawEighCovPool`,
  the GCP head written with a plain ``torch.linalg.eigh`` (the baseline row).
* :func:`build_model`, :data:`MODELS` — the four models by the names ``orthofx train`` uses.

The two torchvision models need the ``models`` extra (``pip install 'orthofx[models]'``).
The builders live in :mod:`orthofx.models.small`, :mod:`orthofx.models.resnet` and
:mod:`orthofx.models.registry`; the experiments (:mod:`orthofx.experiment`) import them from here.
"""

from __future__ import annotations

from torch import nn

from orthofx._optional import require
from orthofx.models import resnet as _resnet
from orthofx.models.registry import MODELS, build_model
from orthofx.models.small import RawEighCovPool, SmallResNetDBN, SmallResNetGCP

__all__ = ["resnet18_gcp", "resnet50_dbn", "SmallResNetGCP", "SmallResNetDBN", "RawEighCovPool", "build_model",
           "MODELS"]


def resnet18_gcp(
    num_classes: int = 1000, *, reduced: int = 256, backend: str = "auto", eps: float = 1e-5, in_channels: int = 3
) -> nn.Module:
    """ResNet-18 with global covariance pooling (matrix square root of Σ = X Xᵀ/M + εI, ε=``eps``)
    over ``reduced`` channels; ``backend`` is :class:`orthofx.nn.CovariancePooling`'s."""
    require("torchvision", "models", purpose="orthofx.models.resnet18_gcp")
    return _resnet.resnet18_gcp(num_classes, reduced=reduced, backend=backend, eps=eps, in_channels=in_channels)


def resnet50_dbn(
    num_classes: int = 10, *, backend: str = "auto", eps: float = 1e-2, in_channels: int = 3
) -> nn.Module:
    """CIFAR-stem ResNet-50 whose stem BN whitens: x ↦ (Σ + εI)^{-1/2}(x − μ), ε=``eps``;
    ``backend`` is :class:`orthofx.nn.DecorrelatedBatchNorm`'s."""
    require("torchvision", "models", purpose="orthofx.models.resnet50_dbn")
    return _resnet.cifar_resnet50_dbn(num_classes, whitening_backend=backend, whitening_eps=eps, in_channels=in_channels)
