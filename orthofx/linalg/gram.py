r"""Exact ``(Σ + εI)^{±1/2}`` of a feature covariance through the small Gram matrix.

For features ``X`` of shape (…, C, M) (C channels, M samples, e.g. M = H·W = 49 positions in
covariance pooling) the centred covariance is ``Σ = Z Zᵀ`` with ``Z = (X − mean)/√M``. When
M < C, Σ has rank < M and its whole spectrum lives in the M×M Gram matrix ``G = Zᵀ Z``. With
``f`` = √· or 1/√· and the smooth function

    h(μ) = (f(μ + ε) − f(ε)) / μ      (h(0) = f′(ε)),

the matrix function is, exactly and for every X (no thresholding of small eigenvalues),

    f(Σ + εI) = f(ε)·I + Z h(G) Zᵀ.

``h`` has closed forms without cancellation (s = √(μ+ε), r = √ε):

* sqrt:          h(μ) = 1/(s + r)
* inverse sqrt:  h(μ) = −1/(s·r·(s + r))

and so do its divided differences ``(h(a) − h(b))/(a − b)`` (continuous, equal to h′ on the
diagonal), which give the exact Daleckii–Krein backward of ``h(G)``:

* sqrt:          −1/((s_a + s_b)(s_a + r)(s_b + r))
* inverse sqrt:  (s_a + s_b + r) / (r (s_a + s_b) s_a s_b (s_a + r)(s_b + r))

Backward: with ``Ȳs = sym(∂L/∂Y)``, ``A = Ȳs Z``, ``H̄ = Zᵀ A``,
``Ḡ = V (F ∘ (Vᵀ H̄ V)) Vᵀ``: ``∂L/∂Z = 2 A H + 2 Z Ḡ``. Costs O(C M² + C² M + M³) instead of
O(C³): at C = 256, M = 49 a 49×49 decomposition replaces a 256×256 one. ε must be > 0
(h is singular at 0 for ε = 0). G's eigenvalues are clamped at 0 (G is PSD; rounding can
make tiny ones negative).

Accuracy: exact up to the decomposition of G, computed in float64 by default
(``compute_dtype``); measured against float64 eigh of Σ in tests/test_linalg_gram.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from orthofx.errors import ConfigError, InputError
from orthofx.linalg._checks import check_finite, check_float, no_autocast, resolve_dtype, symmetrize
from orthofx.linalg._solver import eigh_via_svd, robust_eigh
from orthofx.linalg.stats import solver_stats

__all__ = ["covariance_sqrtm"]


def gram_h(mu: Tensor, eps: float, inverse: bool) -> Tensor:
    """h(μ) = (f(μ+ε) − f(ε))/μ in closed form (module doc); μ ≥ 0, ε > 0."""
    s = (mu + eps).sqrt()
    r = math.sqrt(eps)
    return -1.0 / (s * r * (s + r)) if inverse else 1.0 / (s + r)


def gram_divided_differences(mu: Tensor, eps: float, inverse: bool) -> Tensor:
    """F_ij = (h(μ_i) − h(μ_j))/(μ_i − μ_j), F_ii = h′(μ_i), in closed form; shape (…, M, M)."""
    s = (mu + eps).sqrt()
    r = math.sqrt(eps)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    if inverse:
        return (si + sj + r) / (r * (si + sj) * si * sj * (si + r) * (sj + r))
    return -1.0 / ((si + sj) * (si + r) * (sj + r))


def _decompose(g: Tensor, solver: str) -> tuple[Tensor, Tensor]:
    return eigh_via_svd(g) if solver == "svd" else robust_eigh(g)


def gram_forward(z: Tensor, eps: float, inverse: bool, solver: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``Y = f(ε)·I + Z h(G) Zᵀ`` (module doc), no autograd: returns ``(Y, μ, V, h(G))`` with
    ``μ, V`` the (clamped) eigenpairs of ``G = ZᵀZ``. Shared by the autograd Function and the
    TorchScript op of :mod:`orthofx.nn._script`."""
    g = symmetrize(z.mT @ z)
    mu, v = _decompose(g, solver)
    mu = mu.clamp_min(0.0)
    h = gram_h(mu, eps, inverse)
    hmat = (v * h.unsqueeze(-2)) @ v.mT
    c = z.shape[-2]
    f_eps = 1.0 / math.sqrt(eps) if inverse else math.sqrt(eps)
    y = f_eps * torch.eye(c, dtype=z.dtype, device=z.device) + z @ hmat @ z.mT
    return symmetrize(y), mu, v, hmat


def gram_backward(g_y: Tensor, z: Tensor, mu: Tensor, v: Tensor, hmat: Tensor, eps: float, inverse: bool) -> Tensor:
    """``∂L/∂Z = 2 A H + 2 Z Ḡ`` (module doc) from :func:`gram_forward`'s outputs; counts
    non-finite results."""
    ys = symmetrize(g_y.to(z.dtype))
    a = ys @ z
    h_bar = z.mT @ a
    f_mat = gram_divided_differences(mu, eps, inverse)
    g_bar = v @ (f_mat * (v.mT @ h_bar @ v)) @ v.mT
    grad = 2.0 * (a @ hmat + z @ g_bar)
    solver_stats().record_nonfinite(grad, event_dims=2)
    return grad


class _GramFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, eps: float, inverse: bool, solver: str) -> tuple[Tensor, Tensor]:
        y, mu, v, hmat = gram_forward(z, eps, inverse, solver)
        ctx.eps, ctx.inverse = eps, inverse
        ctx.save_for_backward(z, v, mu, hmat)
        ctx.mark_non_differentiable(mu)
        return y, mu

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, _g_mu: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        if g_y is None:
            return None, None, None, None
        z, v, mu, hmat = ctx.saved_tensors
        return gram_backward(g_y, z, mu, v, hmat, ctx.eps, ctx.inverse), None, None, None


def covariance_sqrtm(
    X: Tensor,
    *,
    eps: float,
    inverse: bool = False,
    backend: str = "auto",
    compute_dtype: torch.dtype | None = None,
    validate: bool = True,
    return_eigenvalues: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``(Σ + εI)^{1/2}`` (or ``^{-1/2}`` with ``inverse=True``) of the centred covariance
    ``Σ = (X − mean)(X − mean)ᵀ/M`` of features ``X`` (…, C, M), through the M×M Gram matrix
    (module doc): exact, with the exact closed-form backward, cheap when M < C.

    Args:
        X: (…, C, M) float features; centring over the last dim happens inside (autograd).
        eps: ε > 0 added to Σ.
        backend: decomposition of G: "eigh", "svd" (gesvda route), "auto" ("svd" on CUDA for
            float32 work, "eigh" otherwise).
        compute_dtype: None = float64 for "eigh", the working dtype (≥ float32) for "svd".
        validate: raise InputError on NaN/Inf (one host sync).
        return_eigenvalues: also return the detached ascending eigenvalues (…, C) of Σ + εI
            (the M Gram eigenvalues, padded with zeros when M < C, plus ε).
    """
    check_float(X, "covariance_sqrtm input")
    if X.dim() < 2:
        raise InputError(f"covariance_sqrtm expects (..., C, M) features, got shape {tuple(X.shape)}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"covariance_sqrtm needs eps > 0 (h is singular at 0 for eps = 0), got {eps}")
    if backend not in ("auto", "eigh", "svd"):
        raise ConfigError(f"unknown covariance_sqrtm backend {backend!r}; use 'auto', 'eigh' or 'svd'")
    c, m = X.shape[-2], X.shape[-1]
    if backend == "auto":
        backend = "svd" if X.is_cuda and compute_dtype != torch.float64 else "eigh"
    cdtype = resolve_dtype(compute_dtype, X.dtype, torch.float64 if backend == "eigh" else None)
    if X.numel() == 0:
        y = X.new_empty(X.shape[:-1] + (c,))
        return (y, X.new_empty(X.shape[:-1], dtype=cdtype)) if return_eigenvalues else y
    if m < 1:
        raise InputError("covariance_sqrtm needs at least one sample (M >= 1)")
    if validate:
        check_finite(X, "covariance_sqrtm input")
    with no_autocast(X.device.type):
        x = X.to(cdtype)
        z = (x - x.mean(dim=-1, keepdim=True)) / math.sqrt(m)
        y, mu = _GramFunction.apply(z, eps, inverse, backend)
        solver_stats().record_nonfinite(y, event_dims=2)
        y = y.to(X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32)
    if not return_eigenvalues:
        return y
    with torch.no_grad():
        top = mu.flip(-1)[..., :c]
        if top.shape[-1] < c:
            top = torch.cat([top, top.new_zeros(top.shape[:-1] + (c - top.shape[-1],))], dim=-1)
        lam = top.flip(-1) + eps
    return y, lam.detach()
