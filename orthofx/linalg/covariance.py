"""Sample covariance of feature batches: ``Σ = Xc Xcᵀ / M + εI``.

``X`` is (..., C, M): C channels (rows), M samples (columns). ``Xc = X − mean over M`` (the
batch mean, as in the paper's ``X J Xᵀ`` with ``J = (I − 11ᵀ/M)/M``); the divisor is ``M``
(biased, not ``M − 1``). ``rank(Σ − εI) ≤ min(C, M − 1)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from orthofx.errors import ConfigError, InputError
from orthofx.linalg._checks import check_finite, check_matrix, no_autocast, symmetrize, working_dtype

__all__ = ["covariance"]


def covariance(X: Tensor, *, eps: float = 0.0, validate: bool = True) -> Tensor:
    """Centred covariance ``Xc Xcᵀ/M + eps·I`` of ``X`` (..., C, M) -> (..., C, C).

    float16/bfloat16 are accumulated in float32 (autocast disabled) and returned in the input
    dtype. The result is exactly symmetric. Differentiable. ``M = 0`` with a non-empty batch
    raises InputError; an empty batch returns an empty (..., C, C) tensor. ``validate`` raises
    InputError on NaN/Inf (one host sync). ``eps`` must be finite and ≥ 0.
    """
    check_matrix(X, "covariance input")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite float >= 0, got {eps}")
    *batch, c, m = X.shape
    out_shape = (*batch, c, c)
    if m == 0 and math.prod(batch) * c > 0:
        raise InputError(f"covariance needs at least one sample (M >= 1); got shape {tuple(X.shape)}")
    if X.numel() == 0:
        return X.new_zeros(out_shape)
    if validate:
        check_finite(X, "covariance input")
    with no_autocast(X.device.type):
        x = X.to(working_dtype(X.dtype))
        xc = x - x.mean(dim=-1, keepdim=True)
        cov = symmetrize(xc @ xc.mT) / m
        if eps:
            cov = cov + eps * torch.eye(c, dtype=cov.dtype, device=cov.device)
        return cov.to(X.dtype)
