"""The CPU-scale models of the paper's two experiments, for 28×28 grey images, written the way
users write them (no orthofx calls other than the meta-layer module itself): the pass finds
their Pre-SVD layers.

* :class:`SmallResNetDBN` — a CIFAR-style ResNet whose stem BN is replaced by ZCA whitening
  (the paper's Sec. 6.1 at CPU scale). The 1→16 3×3 stem gives a covariance of rank ≤ 9 < 16,
  the same rank deficiency as the paper's 3→64 stem (27 < 64). With ``stem_kernel=5,
  stem_channels=64``: the closer proxy of the paper's stem, 25-dimensional patches into 64
  channels (rank ≤ 25 of 64, the paper 27 of 64).
* :class:`SmallResNetGCP` — the paper's GCP experiment (Sec. 6.2) at CPU scale: a ResNet down
  to 7×7, a 1×1 reduction to ``reduced`` ≥ 64 channels (the Pre-SVD layer) → BN → ReLU →
  covariance → matrix square root (``CovariancePooling``) → linear classifier. 49 positions
  against ≥ 64 channels: Σ has rank ≤ 48, as the paper's 49 vs 256.
* :class:`RawEighCovPool` — the same head written with a plain ``torch.linalg.eigh`` (float32,
  torch's own backward), the way user code often does: the baseline the stable meta-layer
  replaces (``SmallResNetGCP(head="raw-eigh")``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ConfigError
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm

__all__ = ["SmallResNetDBN", "SmallResNetGCP", "RawEighCovPool"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNetDBN(nn.Module):
    """ResNet (3 stages of ``blocks`` basic blocks, widths ``widths``) with ZCA whitening
    after its 3×3 stem conv. ``whitening_backend`` "eigh" is the paper's SVD meta-layer
    (exact, stable gradient); "ns" is the Newton–Schulz baseline.

    Whitening uses the authors' ε = 1e-2 and running covariance statistics: the 1→16 stem
    makes Σ rank ≤ 9, and with ε = 1e-5 (or an EMA of whitening matrices) eval-mode outputs
    blow up along the rotating null space (measured: 65–95 % test error in eval mode against
    21 % in train mode after two epochs).

    ``stem_kernel``/``stem_channels``/``stem_stride``: the stem conv (default 3×3 stride 1 into
    ``widths[0]`` channels). The paper-shaped proxy is ``stem_kernel=5, stem_channels=64``:
    Σ of rank ≤ 25 in 64 channels."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 1,
        whitening_backend: str = "eigh",
        whitening_eps: float = 1e-2,
        ns_iters: int = 5,
        whitening_running: str = "covariance",
        stem_kernel: int = 3,
        stem_channels: int | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        stem = stem_channels or widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, stem_kernel, stem_stride, stem_kernel // 2, bias=False)
        self.bn1 = DecorrelatedBatchNorm(
            stem, eps=whitening_eps, backend=whitening_backend, iters=ns_iters, running=whitening_running
        )
        stages = []
        cin = stem
        for i, w in enumerate(widths):
            layers = [_BasicBlock(cin, w, 1 if i == 0 else 2)]
            layers += [_BasicBlock(w, w, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class RawEighCovPool(nn.Module):
    """A GCP head as user code often writes it: 1×1 conv → BN → ReLU, Σ = X J Xᵀ + εI in the
    features' dtype (float32), ``L, U = torch.linalg.eigh(Σ)``, Σ^{1/2} = U diag(√max(L, 0)) Uᵀ,
    upper triangle. torch's eigh backward has 1/(λᵢ − λⱼ) terms, which are huge or infinite
    for the (near-)repeated eigenvalues of a rank-deficient Σ (its null space is ≈ ε·I).

    Not an orthofx meta-layer on purpose (``orthofx.transform`` would swap the eigh for the
    stable one); it keeps the float64 eigenvalues of its last training forward in
    ``last_eigenvalues`` for κ bookkeeping."""

    def __init__(self, in_channels: int, reduced: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduced, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(reduced)
        self.relu = nn.ReLU(inplace=True)
        self.eps = float(eps)
        self.out_features = reduced * (reduced + 1) // 2
        self.register_buffer("triu_index", torch.triu_indices(reduced, reduced), persistent=False)
        self.last_eigenvalues: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.reduce(x)))
        n, c = x.shape[:2]
        f = x.reshape(n, c, -1)
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.transpose(-1, -2) / f.shape[-1] + self.eps * torch.eye(c, dtype=f.dtype, device=f.device)
        lam, u = torch.linalg.eigh(cov)
        if self.training:
            self.last_eigenvalues = lam.detach().double()
        y = (u * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ u.transpose(-1, -2)
        i, j = self.triu_index
        return y[:, i, j]


class SmallResNetGCP(nn.Module):
    """ResNet for 28×28 grey images (3×3 stem, 3 stages of ``blocks`` basic blocks at 28, 14
    and 7 pixels, widths ``widths``) with a global covariance pooling head: 1×1 reduction to
    ``reduced`` channels (the Pre-SVD layer) → BN → ReLU → Σ + εI (per image, 7×7 = 49
    positions, so rank ≤ 48 < ``reduced``) → Σ^{1/2} → upper triangle → linear classifier.

    ``head="orthofx"`` uses :class:`orthofx.nn.CovariancePooling` with ``backend`` ("auto":
    exact via the 49×49 Gram matrix, "eigh"/"svd": exact C×C, "ns": Newton–Schulz with
    ``ns_iters``); ``head="raw-eigh"`` uses :class:`RawEighCovPool`."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
        reduced: int = 64,
        blocks: int = 1,
        backend: str = "auto",
        eps: float = 1e-5,
        ns_iters: int = 5,
        head: str = "orthofx",
    ) -> None:
        super().__init__()
        if head not in ("orthofx", "raw-eigh"):
            raise ConfigError(f"SmallResNetGCP: head must be 'orthofx' or 'raw-eigh', got {head!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = [_BasicBlock(cin, w, 1 if i == 0 else 2)]
            layers += [_BasicBlock(w, w, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        if head == "orthofx":
            self.gcp: nn.Module = CovariancePooling(cin, reduced=reduced, eps=eps, backend=backend, iters=ns_iters)
        else:
            self.gcp = RawEighCovPool(cin, reduced, eps)
        self.fc = nn.Linear(self.gcp.out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.gcp(x))
