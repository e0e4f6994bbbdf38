"""Condition number of a covariance: the paper's central metric.

Convention: ``κ(A) = λ_max / λ_min`` of the **float64** eigenvalues of exactly ``(A + Aᵀ)/2``
plus ``eps·I`` (``eps`` is added to the computed eigenvalues, which is the same as decomposing
``A + eps·I``, only more accurate). ``λ_min ≤ 0`` gives ``+inf``; NaN eigenvalues give NaN.
For a whitening covariance built with ``ε`` (e.g. rank-27 stem, ε = 1e-2) pass the matrix
that was decomposed, εI included, so that ``κ = (λ_max + ε)/ε`` for a rank-deficient Σ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from orthofx.errors import ConfigError
from orthofx.linalg._checks import check_finite, check_square, no_autocast, symmetrize
from orthofx.linalg._solver import robust_eigvalsh

__all__ = ["condition_number", "condition_number_from_eigenvalues"]


def condition_number_from_eigenvalues(L: Tensor) -> Tensor:
    """κ = L[..., -1] / L[..., 0] of ascending eigenvalues (..., n), in float64, same convention.

    Lets a monitor reuse eigenvalues a meta-layer already computed (no second decomposition).
    """
    lam = L.detach().to(torch.float64)
    if lam.shape[-1] == 0:
        return lam.new_empty(lam.shape[:-1])
    lo, hi = lam[..., 0], lam[..., -1]
    kappa = torch.where(lo > 0, hi / torch.where(lo > 0, lo, 1.0), torch.inf)
    return torch.where(torch.isnan(lo) | torch.isnan(hi), torch.nan, kappa)


def condition_number(A: Tensor, *, eps: float = 0.0, validate: bool = True) -> Tensor:
    """κ = λ_max/λ_min of float64 eigvalsh of ``(A + Aᵀ)/2 + eps·I``; λ_min ≤ 0 -> +inf.

    ``A``: (..., n, n) float tensor. Returns a detached float64 tensor of shape ``A.shape[:-2]``
    on ``A``'s device (no gradient). ``validate`` raises InputError on NaN/Inf (one host sync);
    with ``validate=False`` a non-finite element gives NaN. Solver failures are recovered as in
    :func:`orthofx.linalg.eigh`.
    """
    check_square(A, "condition_number input")
    eps = float(eps)
    if not math.isfinite(eps):
        raise ConfigError(f"eps must be finite, got {eps}")
    if A.numel() == 0:
        return torch.empty(A.shape[:-2], dtype=torch.float64, device=A.device)
    if validate:
        check_finite(A, "condition_number input")
    with torch.no_grad(), no_autocast(A.device.type):
        lam = robust_eigvalsh(symmetrize(A.detach().to(torch.float64))) + eps
        return condition_number_from_eigenvalues(lam)
