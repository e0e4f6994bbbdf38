"""Coupled Newton–Schulz iteration for the matrix square root and inverse square root.

For an SPD ``A`` (iSQRT-COV): ``c = tr(A)``, ``Y₀ = A/c``, ``Z₀ = I``, and for each step

    T = ½(3I − Z Y),   Y ← Y T,   Z ← T Z

(on the last step only the factor that is returned is updated). ``Y → (A/c)^{1/2}`` and
``Z → (A/c)^{-1/2}``; the result is ``√c·Y`` (square root) or ``Z/√c`` (inverse square root).
Trace normalisation puts the spectrum of ``A/c`` in (0, 1], where the iteration converges, but
slowly for small eigenvalues: directions with ``λ/tr(A) ≪ 1`` are far from converged after the
usual 5 steps. Differentiable through ordinary autograd (only matrix products).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orthofx.errors import ConfigError

__all__ = ["ns_sqrtm"]


def ns_sqrtm(a: Tensor, iters: int = 5, inverse: bool = False) -> Tensor:
    """Coupled Newton–Schulz ``A^{1/2}`` (or ``A^{-1/2}`` if ``inverse``) of a symmetric batch.

    ``a``: (..., n, n) float32/float64, assumed SPD (not checked). ``tr(A)`` is clamped to
    ``finfo.tiny`` so a zero matrix gives a zero square root (and a huge, finite inverse root
    only if ``iters`` is small; it is not meaningful). Output symmetrised, same dtype as ``a``.
    """
    if iters < 1:
        raise ConfigError(f"newton_schulz iters must be an int >= 1, got {iters!r}")
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(a.dtype).tiny)
    tr = tr[..., None, None]
    y = a / tr
    z = eye.expand_as(a)
    for k in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        if k == iters - 1:
            if inverse:
                z = t @ z
            else:
                y = y @ t
        else:
            y, z = y @ t, t @ z
    out = z / tr.sqrt() if inverse else y * tr.sqrt()
    return (out + out.mT) * 0.5
