"""Deterministic test/benchmark matrices (SPD matrices of a given spectrum, feature covariances,
GCP/DBN-like batches): used by tests/test_linalg_* and benchmarks/linalg_bench.py.

All take a ``seed`` and build on the CPU in float64, then move/cast, so every device and dtype
sees the same matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_orthogonal", "spd_with_spectrum", "random_spd", "feature_covariance", "gcp_like", "dbn_like"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _out(x: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    return x.to(device=device, dtype=dtype)


def random_orthogonal(batch: tuple[int, ...], n: int, seed: int = 0) -> Tensor:
    """Haar-ish random orthogonal (…, n, n) float64 (QR of a Gaussian, sign-fixed)."""
    g = torch.randn(*batch, n, n, generator=_gen(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def spd_with_spectrum(eigenvalues: Tensor, seed: int = 0, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q; ``eigenvalues`` (…, n) float64."""
    lam = eigenvalues.to(torch.float64)
    q = random_orthogonal(tuple(lam.shape[:-1]), lam.shape[-1], seed)
    a = (q * lam.unsqueeze(-2)) @ q.mT
    return _out((a + a.mT) / 2, dtype, device)


def random_spd(batch: tuple[int, ...], n: int, cond: float = 10.0, seed: int = 0,
               dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """SPD with eigenvalues log-spaced in [1/cond, 1] (κ = cond)."""
    lam = torch.logspace(0.0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
    lam = lam.expand(*batch, n).contiguous()
    return spd_with_spectrum(lam, seed, dtype, device)


def feature_covariance(batch: tuple[int, ...], c: int, m: int, eps: float, seed: int = 0,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                       rank: int | None = None) -> Tensor:
    """Centred ``X Xᵀ/M + εI`` of Gaussian features X (…, C, M); rank ≤ min(C, M−1, rank).

    With ``rank`` set, X = W P with W (C×rank), P (rank×M), like a stem conv on rank-sized patches.
    """
    g = _gen(seed)
    if rank is None:
        x = torch.randn(*batch, c, m, generator=g, dtype=torch.float64)
    else:
        w = torch.randn(*batch, c, rank, generator=g, dtype=torch.float64) / rank**0.5
        x = w @ torch.randn(*batch, rank, m, generator=g, dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    cov = xc @ xc.mT / m
    cov = (cov + cov.mT) / 2 + eps * torch.eye(c, dtype=torch.float64)
    return _out(cov, dtype, device)


def gcp_like(batch: int = 8, c: int = 256, m: int = 49, eps: float = 1e-5, seed: int = 0,
             dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """Global-covariance-pooling covariance: C=256 channels, M=49 positions (7×7), ε=1e-5."""
    return feature_covariance((batch,), c, m, eps, seed, dtype, device)


def dbn_like(batch: int = 4, c: int = 64, rank: int = 27, m: int = 1024, eps: float = 1e-2, seed: int = 0,
             dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """Whitening-stem covariance: 64 channels of a 3×3×3 conv (rank 27), ε=1e-2."""
    return feature_covariance((batch,), c, m, eps, seed, dtype, device, rank=rank)
