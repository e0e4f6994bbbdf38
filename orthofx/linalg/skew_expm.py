r"""``exp(S) − I`` of a skew-symmetric ``S`` (Sᵀ = −S) on the host path, with a derivative that
uses the skew structure: the dense route of the flat OW map (:mod:`orthofx.treatments.stiefel`).

A skew S is normal with eigenvalues ``iλ`` (real λ), so for the Taylor polynomial
``T_m(x) = Σ_{k≤m} x^k/k!``

    ‖T_m(S) − e^S‖₂ = max_λ |T_m(iλ) − e^{iλ}| ≤ ρ^{m+1}/(m+1)!,   ρ = ‖S‖₂,

(the derivatives of ``y ↦ e^{iy}`` have modulus 1). The degree m and the squarings s are the
cheapest pair with ``(η/2^s)^{m+1}/(m+1)! ≤ u`` (u = 2⁻²⁴ in float32, 2⁻⁵³ in float64:
:func:`orthofx.linalg.expm.expm_plan` with ``imaginary=True``) for the upper bound

    η = min(‖S‖_F, ‖S²‖_F^{1/2}, ‖S²‖₁^{1/2}) ≥ ρ     (Gelfand: ‖S²‖ ≥ ρ(S²) = ρ² in any
                                                       submultiplicative norm),

read on the host (free on the CPU, so this module is for CPU tensors outside
``cuda_policy``/compile/export; CUDA uses :func:`orthofx.linalg.expm.expm`'s sync-free path).
So the result is exp(S) to the unit roundoff of the dtype (truncation; the squarings multiply
it by 2^s as in any scaling and squaring), not an approximation of another map.

What it returns is ``N = T_m(2^{−s}S)^{2^s} − I``, carried in that form (``N ← 2N + N²`` per
squaring): ``I + N`` holds the small part of exp(S) to full relative accuracy, and the caller's
``exp(S)·Y₀ = Y₀ + N·Y₀`` is one fused ``addmm`` (no identity added, no n×n ``I`` built).

Derivative: autograd through the products (the exact derivative of the computed polynomial),
with ``S²`` from :func:`skew_square`, whose backward costs one product instead of two. The
degree is at least 2 (even for S = 0), so the second derivative at S = 0 is exp's, (EF + FE)/2,
and the first derivative differs from exp's Fréchet derivative by at most θ_m^m/m! relative
(≈ (m+1)·u/θ_m: 2.5e-5 at degree 2, 3e-6 at degree 4 in float32 — the value, not the
derivative, is what the degree is chosen for). Cost at ‖S‖₂ ≤ 0.007 (float32): forward 1
product (degree 2), backward 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orthofx.linalg.expm import _NORMAL_THETAS, _taylor, expm_plan, norm1
from orthofx.linalg.stats import solver_stats

__all__ = ["skew_square", "expm_skew_host", "skew_eta"]


class _SkewSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: Tensor) -> Tensor:
        ctx.save_for_backward(s)
        return s @ s

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        x = s @ (g + g.mT)  # 2·S·H, H = sym(G)
        return 0.5 * (x.mT - x)  # (SH)ᵀ − SH (differentiable: gradgradcheck works through it)


def skew_square(S: Tensor) -> Tensor:
    """``S²`` for a skew-symmetric ``S`` (..., n, n), one product forward and one backward.

    Its backward returns the gradient on the skew-symmetric matrices (what the derivative of a
    function of ``S = P − Pᵀ`` can see): for ``d(S²) = dS·S + S·dS`` and ``H = (G + Gᵀ)/2``,
    ``skew(SᵀG + GSᵀ) = (SH)ᵀ − SH`` (with Sᵀ = −S: ``−(HS + SH)``, and ``HS = −(SH)ᵀ``), one
    product instead of the two of ``GSᵀ + SᵀG``. The symmetric part of the true gradient is
    dropped, so the input must be confined to skew matrices (built as ``P − Pᵀ``) for the
    result to be the exact derivative; on such inputs it is (gradcheck, twice differentiable).
    """
    return _SkewSquare.apply(S)


def skew_eta(S: Tensor, S2: Tensor | None) -> Tensor:
    """Upper bound on ``‖S‖₂`` per matrix (..., no grad): ``‖S‖_F``, and with ``S2 = S²``
    ``min(‖S‖_F, ‖S²‖_F^{1/2}, ‖S²‖₁^{1/2})`` (each ≥ ρ(S) = ‖S‖₂ for a normal S)."""
    eta = torch.linalg.matrix_norm(S.detach())
    if S2 is None:
        return eta
    s2 = S2.detach()
    return torch.minimum(eta, torch.minimum(torch.linalg.matrix_norm(s2), norm1(s2)).sqrt())


def _read_max(x: Tensor) -> float:
    """Largest entry of ``x`` as a host float, NaN if any entry is NaN (one host read)."""
    return math.nan if bool(x.isnan().any()) else float(x.max())


def expm_skew_host(S: Tensor, max_squarings: int = 14) -> tuple[Tensor, int]:
    """``(exp(S) − I, s)`` for skew-symmetric ``S`` (..., n, n), float32/float64, on the host
    path (module doc): Taylor degree and squarings ``s`` from the bound η of the batch's largest
    matrix (one plan for the batch), differentiable by autograd (with :func:`skew_square`).

    ``S`` must be exactly skew-symmetric and built so that its gradient is read on the skew
    matrices only (``S = P − Pᵀ``), see :func:`skew_square`. η beyond ``θ·2^max_squarings`` is
    counted in ``solver_stats().fallbacks["expm-range"]`` (the result is then inaccurate);
    NaN/Inf input gives NaN, counted in ``solver_stats().nonfinite``. Cost: ``taylor_matmuls(m)`` products (``S²`` among them) + s."""
    table = _NORMAL_THETAS[torch.float64 if S.dtype == torch.float64 else torch.float32]
    S2 = skew_square(S)
    eta_t = skew_eta(S, S2)
    eta = _read_max(eta_t)
    m, s = expm_plan(eta, S.dtype, max_squarings, imaginary=True, min_degree=2)
    if s == max_squarings and max_squarings:
        over = int((eta_t.nan_to_num(0.0) > table[-1][1] * 2.0**max_squarings).sum())
        if over:
            solver_stats().record_fallback("expm-range", over)
    x, x2 = (S, S2) if s == 0 else (S * 2.0**-s, S2 * 4.0**-s)
    n = _taylor(x, m, x2, identity=False)
    for _ in range(s):
        n = _square_step(n)
    if not math.isfinite(eta):  # a finite η bounds every entry: only then can N hold NaN/Inf
        solver_stats().record_nonfinite(n, event_dims=2)
    return n, s


def _square_step(n: Tensor) -> Tensor:
    """``(I + N)² − I = 2N + N²`` in one fused product (``addmm``/``baddbmm``: beta = 2)."""
    if n.dim() == 2:
        return torch.addmm(n, n, n, beta=2.0)
    if n.dim() == 3:
        return torch.baddbmm(n, n, n, beta=2.0)
    return 2.0 * n + n @ n

