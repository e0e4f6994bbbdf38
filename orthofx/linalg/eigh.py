"""Symmetric eigendecomposition with a bounded backward: exact K by default, Taylor K on request.

Forward: ``A ← (A + Aᵀ)/2``, then ``A = U diag(L) Uᵀ`` with ``L`` ascending (as
``torch.linalg.eigh``), by ``torch.linalg.eigh`` or by the SVD route (``_solver.eigh_via_svd``),
both with the failure-recovery chain of :mod:`orthofx.linalg._solver`.

Backward:

    ∂L/∂A = sym( U ((Kᵀ ∘ (Uᵀ ∂L/∂U)) + diag(∂L/∂Λ)) Uᵀ ),   sym(X) = (X + Xᵀ)/2,

where ``K_ij`` stands for ``1/(λ_i − λ_j)`` (``K_ii = 0``); with the exact ``K`` this is the
gradient ``torch.linalg.eigh`` computes. Write ``d_ij = λ_i − λ_j``,
``s_ij = max(|λ_i|, |λ_j|)``.

**Default (``taylor_degree=None``): exact K except at near-ties.**

    K_ij = 1/d_ij                  if |d_ij| ≥ φ_ij       (every resolved pair: exact)
    K_ij = d_ij/φ_ij²              if |d_ij| <  φ_ij      (near-tie: linear ramp through 0)
    φ_ij = max(δ·s_ij, ν),   ν = √n·eps(dtype)·max_k |λ_k|   (per batch element)

* ``δ = near_tie_rel(dtype) = max(1e-6, √eps(dtype))``: **1e-6 for float64**, **3.45e-4 for
  float32** (float16/bfloat16 are decomposed in float32). A pair is a near-tie when its relative
  gap ``|d_ij|/s_ij`` is below δ. δ < 1e-3 in both dtypes, so every pair with relative gap
  ≥ 1e-3 (above the floor ν) gets the exact ``1/d_ij``, and the gradient equals torch's to
  rounding. 1e-6 caps the float64 amplification at ``|K_ij| ≤ 1e6/s_ij``; in float32 a pair at
  relative gap √eps has eigenvectors accurate to only √eps, so nothing finer is resolved.
* ``ν``: gaps below the solver's absolute eigenvalue accuracy (≈ eps·‖A‖₂, times a modest √n)
  are not resolved by the forward, so ``1/d`` there would amplify rounding. This only matters
  for pairs of eigenvalues at rounding level (the numerical null space of a rank-deficient
  covariance without ``+εI``), whose relative gaps are O(1) and would otherwise give
  ``|K| ≈ 1e16/‖A‖``.
* The ramp is continuous at ``|d| = φ`` (both branches give ``1/φ``), odd, zero for an exact tie
  (a repeated eigenvalue: the gauge-invariant part of the gradient does not depend on K inside
  the eigenspace), and bounded: ``|K_ij| ≤ 1/φ_ij ≤ 1/(δ·s_ij)``. ``φ ≥ finfo.tiny``, so an
  all-zero spectrum gives ``K = 0``.

**``taylor_degree=N`` (int ≥ 0): the stable-SVD "Taylor K"**.

* both eigenvalues **positive**: ``p_ij = min(λ_i/λ_j, λ_j/λ_i)``,
  ``a_ij = 1/λ_i if λ_i ≥ λ_j else −1/λ_j``, ``K_ij = a_ij · Σ_{k=0..N} p_ij^k``. Exact up to the
  factor ``1 − p^{N+1}`` (N = 9: 35% low for a pair of ratio 0.9); bounded by
  ``(N+1)/max(λ_i, λ_j)``; for a tie ``K_ij = (N+1)/λ_i``.
* both **negative**: the mirror image, ``K_ij(λ) = −K_ij(−λ)`` with the rule above.
* any other pair (opposite signs, or a zero eigenvalue): exact ``1/(λ_i − λ_j)`` when
  ``|λ_i − λ_j| ≥ φ_ij`` with ``φ_ij = max(|λ_i|, |λ_j|)/(N+1)`` (at least ``finfo.tiny``), else the
  linear ramp ``(λ_i − λ_j)/φ_ij²``. ``|K_ij| ≤ (N+1)/max(|λ_i|, |λ_j|)`` everywhere.

Finally ±inf in K become ±(largest finite) and NaN becomes 0. The backward is computed in the
dtype of the decomposition and is not itself differentiable (no double backward).

The gradient w.r.t. the eigenvalues alone (``eigvalsh``) is ``U diag(∂L/∂Λ) Uᵀ``, exact.

**Non-finite input** (``on_nonfinite``; with ``validate=True`` an up-front check raises first):
"propagate" (default of these functions) gives NaN outputs for those batch elements, counted in
``solver_stats().nonfinite``; "raise" raises :class:`~orthofx.errors.InputError` naming ``name``;
"skip" decomposes the identity instead (``L = 1``, ``U = I``, zero gradient into the element) and
counts the element in ``solver_stats().nonfinite`` (device-side, no sync) so that an optimizer
hook can skip the step. "raise"/"skip" add no host sync (``_solver.FiniteGuard``). Under
``torch.compile``/``torch.export`` tracing and on fake/meta tensors the guard is off (a
data-dependent raise cannot be traced): "raise" and "skip" then behave like "propagate".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from orthofx.errors import ConfigError, InputError
from orthofx.linalg._checks import check_finite, check_square, no_autocast, symmetrize, working_dtype
from orthofx.linalg._solver import FiniteGuard, eigh_via_svd, robust_eigh, robust_eigvalsh
from orthofx.linalg.stats import _untracked, solver_stats

__all__ = ["eigh", "eigvalsh"]

EIGH_BACKENDS = ("auto", "eigh", "svd")
NONFINITE_MODES = ("propagate", "raise", "skip")


def resolve_eigh_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """"auto" -> "svd" on CUDA for float32 work (gesvda, residual-checked), "eigh" otherwise.

    (gesvda is much faster than cuSOLVER's eigh at meta-layer sizes and more accurate than
    its float32 eigh; timings: benchmarks/results/timings.md.)
    """
    if backend not in EIGH_BACKENDS:
        raise ConfigError(f"unknown eigh backend {backend!r}; choose one of {EIGH_BACKENDS}")
    if backend == "auto":
        return "svd" if device.type == "cuda" and dtype == torch.float32 else "eigh"
    return backend


def _check_degree(taylor_degree: int | None) -> None:
    if taylor_degree is None:
        return
    if isinstance(taylor_degree, bool) or not isinstance(taylor_degree, int) or taylor_degree < 0:
        raise ConfigError(f"taylor_degree must be an int >= 0 or None (exact), got {taylor_degree!r}")


def _check_nonfinite_mode(on_nonfinite: str) -> None:
    if on_nonfinite not in NONFINITE_MODES:
        raise ConfigError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")


def near_tie_rel(dtype: torch.dtype) -> float:
    """δ of the default backward: ``max(1e-6, √eps(dtype))`` (float64 1e-6, float32 3.45e-4)."""
    return max(1e-6, math.sqrt(torch.finfo(working_dtype(dtype)).eps))


def _ramp_k(diff: Tensor, phi: Tensor) -> Tensor:
    """``1/d`` where ``|d| ≥ φ``, else ``d/φ²`` (φ > 0; ``(d/φ)/φ`` so that φ² cannot underflow)."""
    exact = 1.0 / torch.where(diff == 0, 1.0, diff)
    return torch.where(diff.abs() >= phi, exact, (diff / phi) / phi)


def stable_k(lam: Tensor, taylor_degree: int | None = None) -> Tensor:
    """The bounded ``K ≈ [1/(λ_i − λ_j)]_ij`` (zero diagonal) of the module doc, shape (..., n, n).

    ``lam``: (..., n) float32/float64 eigenvalues. ``taylor_degree=None``: exact ``1/d`` except
    at near-ties (relative gap < :func:`near_tie_rel`, or gap below ``√n·eps·max|λ|``); an int:
    the Taylor-expanded K of that degree. See the module docstring for the exact rule.
    """
    finfo = torch.finfo(lam.dtype)
    li = lam.unsqueeze(-1)
    lj = lam.unsqueeze(-2)
    diff = li - lj
    big = torch.maximum(li.abs(), lj.abs())

    if taylor_degree is None:
        n = lam.shape[-1]
        nu = math.sqrt(n) * finfo.eps * lam.abs().amax(-1, keepdim=True).unsqueeze(-1)
        phi = torch.maximum(near_tie_rel(lam.dtype) * big, nu).clamp_min(finfo.tiny)
        k = _ramp_k(diff, phi)
    else:
        pos = (li > 0) & (lj > 0)
        neg = (li < 0) & (lj < 0)
        same = pos | neg
        safe_big = torch.where(same, big, 1.0)
        p = torch.where(same, torch.minimum(li.abs(), lj.abs()) / safe_big, 0.0)
        series = torch.ones_like(p)
        for _ in range(taylor_degree):  # Horner: Σ_{k=0..N} p^k
            series = 1.0 + p * series
        # positive: +1 if λi ≥ λj else −1;  negative (mirrored): +1 if λi > λj else −1
        sign = torch.where(pos, torch.where(li >= lj, 1.0, -1.0), torch.where(li > lj, 1.0, -1.0))
        k_same = sign * series / safe_big
        phi = (big / (taylor_degree + 1)).clamp_min(finfo.tiny)
        k = torch.where(same, k_same, _ramp_k(diff, phi))
    k = torch.nan_to_num(k, nan=0.0, posinf=finfo.max, neginf=-finfo.max)
    return k * (1.0 - torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device))


class _StableEigh(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, taylor_degree: int | None, backend: str) -> tuple[Tensor, Tensor]:
        lam, vec = eigh_via_svd(a) if backend == "svd" else robust_eigh(a)
        ctx.taylor_degree = taylor_degree
        ctx.save_for_backward(lam, vec)
        ctx.set_materialize_grads(False)
        return lam, vec

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_lam: Tensor | None, g_vec: Tensor | None) -> tuple[Tensor | None, None, None]:
        lam, vec = ctx.saved_tensors
        if g_lam is None and g_vec is None:
            return None, None, None
        inner = torch.zeros_like(vec)
        if g_vec is not None:
            k = stable_k(lam, ctx.taylor_degree)
            inner = k.mT * (vec.mT @ g_vec.to(vec.dtype))
        if g_lam is not None:
            inner = inner + torch.diag_embed(g_lam.to(lam.dtype))
        grad = symmetrize(vec @ inner @ vec.mT)
        solver_stats().record_nonfinite(grad, event_dims=2)
        return grad, None, None


def _guard(a: Tensor, on_nonfinite: str) -> FiniteGuard | None:
    """The non-finite guard for "raise"/"skip" (none under tracing/compilation: see module doc)."""
    if on_nonfinite == "propagate" or _untracked(a):
        return None
    return FiniteGuard(a)


def _nonfinite_error(name: str, bad: int, total: int) -> InputError:
    return InputError(
        f"{name}: the matrix to decompose contains NaN or Inf in {bad} of {total} batch element(s) "
        "(torch.linalg.eigh would fail or return NaN here). Find the source upstream (learning "
        "rate, loss scaling, a missing +εI); or pass on_nonfinite='skip' to decompose the "
        "identity for those elements instead (zero gradient into them), counted in "
        "orthofx.linalg.solver_stats().nonfinite so that an optimizer hook can skip the step."
    )


def _finish_guard(guard: FiniteGuard | None, on_nonfinite: str, a: Tensor, name: str) -> None:
    """After the solver: raise ("raise") or count the skipped elements ("skip")."""
    if guard is None:
        return
    if on_nonfinite == "skip":
        solver_stats().record_nonfinite(a, event_dims=2)
        return
    bad = guard.count_bad()
    if bad:
        raise _nonfinite_error(name, bad, guard.ok.numel())


def eigh(
    A: Tensor,
    *,
    taylor_degree: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    on_nonfinite: str = "propagate",
    name: str = "eigh input",
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``A = U diag(L) Uᵀ`` of a symmetric batch, with a bounded backward.

    Args:
        A: (..., n, n) float tensor. Symmetrised first: ``A ← (A + Aᵀ)/2``. float16/bfloat16 are
            decomposed in float32 (autocast disabled inside); float32/float64 in their own dtype.
        taylor_degree: ``None`` (default): the exact ``K = 1/(λ_i − λ_j)`` of torch's gradient
            for every pair with relative gap ≥ δ (1e-6 in float64, 3.45e-4 in float32), a bounded
            linear ramp for near-ties; an int ``N``: the Taylor-expanded K of degree N (module doc).
        backend: "eigh" (``torch.linalg.eigh``), "svd" (``torch.linalg.svd``, gesvda on CUDA,
            Rayleigh-quotient eigenvalues, residual check with eigh fallback: one host sync),
            "auto" ("svd" on CUDA for float32/half input, "eigh" otherwise).
        validate: raise :class:`~orthofx.errors.InputError` on NaN/Inf (one host sync).
        on_nonfinite: "propagate" | "raise" | "skip": what a non-finite batch element gives when
            ``validate=False`` (module doc); "raise"/"skip" add no host sync.
        name: how error messages refer to ``A``.

    Returns:
        ``(L, U)``: eigenvalues (..., n) ascending and orthonormal eigenvectors (..., n, n), in
        ``A``'s dtype. Eigenvector signs are arbitrary. An empty batch gives empty outputs.

    Solver failures are recovered (float64 → jitter → CPU) and counted in ``solver_stats()``;
    a finite symmetric input does not raise.
    """
    check_square(A, name)
    _check_degree(taylor_degree)
    _check_nonfinite_mode(on_nonfinite)
    resolved = resolve_eigh_backend(backend, A.device, working_dtype(A.dtype))
    if A.numel() == 0:
        return A.new_empty(A.shape[:-1]), A.new_empty(A.shape)
    if validate:
        check_finite(A, name)
    with no_autocast(A.device.type):
        a = symmetrize(A).to(working_dtype(A.dtype))
        guard = _guard(a, on_nonfinite)
        lam, vec = _StableEigh.apply(a if guard is None else guard.clean, taylor_degree, resolved)
        _finish_guard(guard, on_nonfinite, a, name)
        if guard is not None and on_nonfinite == "skip":  # exactly L = 1, U = I for skipped elements
            lam = torch.where(guard.ok[..., None], lam, 1.0)
            vec = torch.where(guard.ok[..., None, None], vec, torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
        solver_stats().record_nonfinite(lam, event_dims=1)
        return lam.to(A.dtype), vec.to(A.dtype)


def eigvalsh(
    A: Tensor,
    *,
    backend: str = "auto",
    validate: bool = True,
    on_nonfinite: str = "propagate",
    name: str = "eigvalsh input",
) -> Tensor:
    """Ascending eigenvalues ``L`` (..., n) of the symmetrised batch ``(A + Aᵀ)/2``.

    Same dtype rules, validation, ``on_nonfinite`` and failure recovery as :func:`eigh`.
    Differentiable with the exact gradient ``U diag(∂L/∂Λ) Uᵀ``; without grad and with backend
    "eigh" (or "auto" on CPU) only eigenvalues are computed (``torch.linalg.eigvalsh``).
    """
    check_square(A, name)
    _check_nonfinite_mode(on_nonfinite)
    resolved = resolve_eigh_backend(backend, A.device, working_dtype(A.dtype))
    if A.numel() == 0:
        return A.new_empty(A.shape[:-1])
    if validate:
        check_finite(A, name)
    with no_autocast(A.device.type):
        a = symmetrize(A).to(working_dtype(A.dtype))
        guard = _guard(a, on_nonfinite)
        clean = a if guard is None else guard.clean
        if resolved == "eigh" and not (torch.is_grad_enabled() and a.requires_grad):
            lam = robust_eigvalsh(clean)
        else:
            lam, _ = _StableEigh.apply(clean, None, resolved)
        _finish_guard(guard, on_nonfinite, a, name)
        if guard is not None and on_nonfinite == "skip":
            lam = torch.where(guard.ok[..., None], lam, 1.0)
        solver_stats().record_nonfinite(lam, event_dims=1)
        return lam.to(A.dtype)
