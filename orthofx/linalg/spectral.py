"""Matrix square root and inverse square root of SPD batches: ``f(A + εI)``, f = √· or 1/√·.

Backends
--------
``"eigh"`` (default) / ``"svd"``: exact spectral forward ``U f(Λ̃) Uᵀ`` from a symmetric
eigendecomposition (``torch.linalg.eigh``, or the gesvda SVD route with residual check and eigh
fallback, see :mod:`orthofx.linalg._solver`), and the **exact Daleckii–Krein backward**

    ∂L/∂A = U (F ∘ (Uᵀ sym(∂L/∂Y) U)) Uᵀ,  F_ij = (f(λ_i) − f(λ_j))/(λ_i − λ_j),  F_ii = f′(λ_i),

with the cancellation-free closed forms ``F_ij = 1/(√λ_i + √λ_j)`` (sqrt) and
``F_ij = −1/(√λ_i √λ_j (√λ_i + √λ_j))`` (inverse sqrt). Unlike the Taylor-K eigen backward, this
is exact and bounded for repeated eigenvalues (the εI block of a rank-deficient covariance).

*Eigenvalue floor.* "eigh": ``λ = eig(A) + ε`` (ε is added to the computed eigenvalues, which
equals decomposing ``A + εI`` and is more accurate than adding ε to the diagonal); "svd":
``λ = eig(A + εI)`` (gesvda's vectors for the null space of a singular A are unreliable). Then
``λ̃ = max(λ, floor)``, i.e. we compute ``g(λ) = f(max(λ, floor))``, with

    floor = n·eps(compute dtype)·λ_max          (numpy's matrix_rank tolerance)
    floor = min(floor, ε/2)                     when ε > 0
    floor = max(floor, finfo.tiny)

(float64, n=256: 5.7e-14·λ_max). Below ``n·eps·λ_max`` a computed eigenvalue is rounding noise
(measured: the null eigenvalues of rank-deficient covariances reach ≈ 0.12·√n·eps·λ_max);
flooring there keeps ``f`` and its gradient smooth when ``ε = 0``. The cap at ``ε/2`` guarantees
that, for a PSD ``A``, no eigenvalue the ε shift provides is clamped (relevant only for
``compute_dtype=torch.float32``, whose noise at GCP settings is comparable to ε).
The backward is the exact Daleckii–Krein derivative of this clamped ``g``: closed forms between
unclamped eigenvalues; ``(g(λ_i) − g(λ_j))/(λ_i − λ_j)`` when one of the pair is clamped; 0 when
both are (``g`` is flat there). The floor itself is treated as a constant (no gradient flows
through ``λ_max``). Zero eigenvalues with ``eps=0`` thus give finite gradients.
Negative eigenvalues (non-PSD input) are clamped the same way.

*Compute dtype.* ``compute_dtype=None`` means **float64** for "eigh" on every device (float32
cannot resolve eigenvalues near ``1e-5·λ_max``), and the input's working dtype (float32 for
float32/half input) for "svd" and "ns": the SVD route exists for float32 speed; gesvda in
float64 is only accurate to ~1e-9 and often rejected by the residual check.

``"ns"``: coupled Newton–Schulz (:mod:`orthofx.linalg.newton_schulz`) on ``A + εI``, ``iters``
steps, differentiable through autograd. Approximate: small eigen-directions converge slowly.

``"auto"``: "svd" on CUDA, "eigh" elsewhere.

Time and accuracy of each backend on GCP/DBN shapes, and why these defaults:
benchmarks/results/sqrtm_backends_h200.md. In float64 on the CPU, "eigh" is exact to
rounding: forward ≤ 1e-13 at κ ≤ 1e4 and ≤ 1e-7 (inverse sqrt) at κ = 1e8; the gradient matches
an independent Sylvester-equation reference to ≤ 1e-7 on rank-deficient + εI covariances
(tests/test_linalg_spectral.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from orthofx.errors import ConfigError
from orthofx.linalg._checks import (
    check_finite,
    check_square,
    no_autocast,
    resolve_dtype,
    symmetrize,
)
from orthofx.linalg._solver import eigh_via_svd, robust_eigh, robust_eigvalsh
from orthofx.linalg.newton_schulz import ns_sqrtm
from orthofx.linalg.stats import solver_stats

__all__ = ["sqrtm", "invsqrtm"]

SPECTRAL_BACKENDS = ("eigh", "svd", "ns", "auto")


def spectral_floor(lam: Tensor, eps: float = 0.0) -> Tensor:
    """The eigenvalue floor of the module doc per batch element, shape (..., 1).

    ``lam``: (..., n) eigenvalues of ``A + εI``; ``eps``: that ε.
    """
    finfo = torch.finfo(lam.dtype)
    top = lam.max(dim=-1, keepdim=True).values.clamp_min(0.0)
    floor = top * (lam.shape[-1] * finfo.eps)
    if eps > 0:
        floor = floor.clamp_max(eps / 2)
    return floor.clamp_min(finfo.tiny)


def _f(s: Tensor, inverse: bool) -> Tensor:
    return 1.0 / s if inverse else s


def dk_matrix(lam: Tensor, floor: Tensor, inverse: bool) -> Tensor:
    """Daleckii–Krein matrix F (..., n, n) of ``g(λ) = f(max(λ, floor))`` (module doc)."""
    clamped = lam < floor
    s = torch.maximum(lam, floor).sqrt()
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    if inverse:
        closed = -1.0 / (si * sj * (si + sj))
    else:
        closed = 1.0 / (si + sj)
    g = _f(s, inverse)
    diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)
    nonzero = diff != 0
    divided = torch.where(nonzero, (g.unsqueeze(-1) - g.unsqueeze(-2)) / torch.where(nonzero, diff, 1.0), 0.0)
    both_free = ~(clamped.unsqueeze(-1) | clamped.unsqueeze(-2))
    return torch.where(both_free, closed, divided)


def spectral_forward(a: Tensor, inverse: bool, eps: float, solver: str) -> tuple[Tensor, Tensor, Tensor]:
    """``Y = U f(max(Λ̃, floor)) Uᵀ`` of the symmetric ``a`` (module doc), no autograd.

    Returns ``(Y, L, U)``: ``L`` the eigenvalues of ``A + εI`` before flooring, ``U`` the
    eigenvectors; the floor is ``spectral_floor(L, eps)``. Shared by the autograd Function and
    the TorchScript op of :mod:`orthofx.nn._script`, so both give the same values.
    """
    if solver == "svd":  # decompose A + εI: an SVD of a singular A has unreliable null vectors
        shifted = a + eps * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) if eps else a
        lam, vec = eigh_via_svd(shifted)
    else:
        lam, vec = robust_eigh(a)
        lam = lam + eps
    s = torch.maximum(lam, spectral_floor(lam, eps)).sqrt()
    y = symmetrize((vec * _f(s, inverse).unsqueeze(-2)) @ vec.mT)
    return y, lam, vec


def spectral_backward(g_y: Tensor, lam: Tensor, vec: Tensor, eps: float, inverse: bool) -> Tensor:
    """The exact Daleckii–Krein gradient ``U (F ∘ (Uᵀ sym(Ȳ) U)) Uᵀ`` (module doc) of
    :func:`spectral_forward`, from its ``L`` and ``U``; counts non-finite results."""
    f_mat = dk_matrix(lam, spectral_floor(lam, eps), inverse)
    inner = f_mat * (vec.mT @ symmetrize(g_y.to(vec.dtype)) @ vec)
    grad = symmetrize(vec @ inner @ vec.mT)
    solver_stats().record_nonfinite(grad, event_dims=2)
    return grad


class _SpectralFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, inverse: bool, eps: float, solver: str) -> tuple[Tensor, Tensor]:
        y, lam, vec = spectral_forward(a, inverse, eps, solver)
        ctx.inverse, ctx.eps = inverse, eps
        ctx.save_for_backward(vec, lam)
        ctx.mark_non_differentiable(lam)
        return y, lam

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_y: Tensor | None, _g_lam: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        vec, lam = ctx.saved_tensors
        if g_y is None:
            return None, None, None, None
        return spectral_backward(g_y, lam, vec, ctx.eps, ctx.inverse), None, None, None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in SPECTRAL_BACKENDS:
        raise ConfigError(f"unknown sqrtm backend {backend!r}; choose one of {SPECTRAL_BACKENDS}")
    if backend == "auto":
        return "svd" if device.type == "cuda" else "eigh"
    return backend


def _matrix_function(
    A: Tensor,
    inverse: bool,
    backend: str,
    eps: float,
    iters: int,
    compute_dtype: torch.dtype | None,
    validate: bool,
    return_eigenvalues: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    name = "invsqrtm input" if inverse else "sqrtm input"
    check_square(A, name)
    resolved = _resolve_backend(backend, A.device)
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite float >= 0, got {eps}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"iters must be an int >= 1, got {iters!r}")
    spectral = resolved in ("eigh", "svd")
    cdtype = resolve_dtype(compute_dtype, A.dtype, torch.float64 if resolved == "eigh" else None)
    if A.numel() == 0:
        y = A.new_empty(A.shape)
        return (y, A.new_empty(A.shape[:-1], dtype=cdtype)) if return_eigenvalues else y
    if validate:
        check_finite(A, name)
    stats = solver_stats()
    with no_autocast(A.device.type):
        a = symmetrize(A).to(cdtype)
        if spectral:
            y, lam = _SpectralFunction.apply(a, inverse, eps, resolved)
            stats.record_nonfinite(lam, event_dims=1)
        else:
            shifted = a + eps * torch.eye(a.shape[-1], dtype=cdtype, device=a.device) if eps else a
            y = ns_sqrtm(shifted, iters, inverse)
            stats.record_nonfinite(y, event_dims=2)
            lam = None
            if return_eigenvalues:
                with torch.no_grad():
                    lam = robust_eigvalsh(a.detach().to(torch.float64)) + eps
        y = y.to(A.dtype)
    if return_eigenvalues:
        assert lam is not None
        return y, lam.detach()
    return y


def sqrtm(
    A: Tensor,
    *,
    backend: str = "eigh",
    eps: float = 0.0,
    iters: int = 5,
    compute_dtype: torch.dtype | None = None,
    validate: bool = True,
    return_eigenvalues: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Principal square root ``(A + εI)^{1/2}`` of an SPD batch (..., n, n).

    ``A`` is symmetrised, ``(A + Aᵀ)/2``. backend: "eigh" | "svd" | "ns" | "auto" ("svd" on
    CUDA, "eigh" elsewhere); the math, eigenvalue floor, compute dtypes and measured accuracy
    of each are in the module docstring. ``eps`` ≥ 0; ``iters`` is used by "ns" only;
    ``compute_dtype`` None = float64 for "eigh", the input's working dtype for "svd"/"ns".
    ``validate`` raises InputError on NaN/Inf (one host sync). Output in ``A``'s dtype.
    With ``return_eigenvalues=True`` returns ``(Y, L)``: ``L`` the detached ascending eigenvalues
    of ``A + εI`` as decomposed (before flooring), in the compute dtype ("ns" computes them with
    an extra float64 eigvalsh).
    """
    return _matrix_function(A, False, backend, eps, iters, compute_dtype, validate, return_eigenvalues)


def invsqrtm(
    A: Tensor,
    *,
    backend: str = "eigh",
    eps: float = 0.0,
    iters: int = 5,
    compute_dtype: torch.dtype | None = None,
    validate: bool = True,
    return_eigenvalues: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Inverse square root ``(A + εI)^{-1/2}`` of an SPD batch (..., n, n).

    Same arguments and conventions as :func:`sqrtm`. With the floor, a singular ``A`` and
    ``eps=0`` gives a finite (but huge: ``(λ_max·eps(dtype))^{-1/2}``) result in the null space.
    """
    return _matrix_function(A, True, backend, eps, iters, compute_dtype, validate, return_eigenvalues)
