r"""``exp(S) − I`` of a skew-symmetric ``S`` (Sᵀ = −S) on the host path, with a derivative that
uses the skew structure: the dense route of the flat OW map (:mod:`orthofx.treatments.stiefel`).

A skew S is normal with eigenvalues ``iλ`` (real λ), so for the Taylor polynomial
``T_m(x) = Σ_{k≤m} x^k/k!``

    ‖T_m(S) − e^S‖₂ = max_λ |T_m(iλ) − e^{iλ}| ≤ ρ^{m+1}/(m+1)!,   ρ = ‖S‖₂,

(the derivatives of ``y ↦ e^{iy}`` have modulus 1). The degree m and the squarings s are the
cheapest pair with ``(η/2^s)^{m+1}/(m+1)! ≤ u`` (u = 2⁻²⁴ in float32, 2⁻⁵³ in float64:
:func:`orthofx.linalg.expm.expm_plan` with ``imaginary=True``) for the upper bound

    η = min(‖S²‖_F, ‖S²‖₁)^{1/2} ≥ ρ     (‖S²‖ ≥ ρ(S²) = ρ² in any submultiplicative
                                          norm; measured ≈ 2.1–2.3 ρ for a trained 256²/512² S),

lowered with ‖S⁴‖^{1/4} (≈ 1.4 ρ) where that can save products (:func:`skew_plan`), and
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

Why Taylor and not the diagonal Padé approximants (exactly orthogonal for skew S: q_m(S) =
p_m(S)ᵀ, so r_m = p_m^{−T}p_m, one LU): on one CPU thread (MKL, torch 2.14) an LU of a 256²
matrix costs ≈ 1.3 products and a solve with 256 right-hand sides ≈ 3.5 (512²: 0.9 and 1.7),
so [2/2] (S² + a solve, ρ ≤ 0.134) costs more than degree-4 Taylor (2 products, ρ ≤ 0.094)
forward and backward; by this count [5/5]/[7/7] save ≈ 20–30% only for ρ ≳ 1 at n ≥ 512,
still far from the one-LU Cayley map, and are not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orthofx.linalg.expm import _NORMAL_THETAS, _taylor, expm_plan, norm1, table_dtype, taylor_matmuls
from orthofx.linalg.stats import solver_stats

__all__ = ["antisym", "skew_square", "expm_skew_host", "skew_plan", "skew_rho_bounds", "refine_rho_bound",
           "identity_plus_apply"]


class _Antisym(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, p: Tensor) -> Tensor:
        return p - p.mT

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g - g.mT


def antisym(P: Tensor) -> Tensor:
    """``P − Pᵀ`` of (..., n, n), whose backward ``G − Gᵀ`` is one strided subtraction (autograd's
    own takes a negation and a strided addition)."""
    return _Antisym.apply(P)


class _SkewSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, s: Tensor, value: Tensor | None) -> Tensor:
        ctx.save_for_backward(s)
        return s @ s if value is None else value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        h = g + g.mT  # 2H, H = sym(G)
        x = _half_product(s, h)  # S·H
        return x.mT - x, None  # (SH)ᵀ − SH (differentiable: gradgradcheck works through it)


def _half_product(a: Tensor, b: Tensor) -> Tensor:
    """``a·b/2`` with the ½ inside the product (``addmm``/``baddbmm`` alpha; beta = 0 ignores the
    input argument)."""
    if a.dim() == 2:
        return torch.addmm(b, a, b, beta=0.0, alpha=0.5)
    if a.dim() == 3:
        return torch.baddbmm(b, a, b, beta=0.0, alpha=0.5)
    return 0.5 * (a @ b)


def skew_square(S: Tensor, value: Tensor | None = None) -> Tensor:
    """``S²`` for a skew-symmetric ``S`` (..., n, n), one product forward and one backward
    (``value``: ``S²`` already formed without gradient, returned as the forward's result).

    Its backward returns the gradient on the skew-symmetric matrices (what the derivative of a
    function of ``S = P − Pᵀ`` can see): for ``d(S²) = dS·S + S·dS`` and ``H = (G + Gᵀ)/2``,
    ``skew(SᵀG + GSᵀ) = (SH)ᵀ − SH`` (with Sᵀ = −S: ``−(HS + SH)``, and ``HS = −(SH)ᵀ``), one
    product instead of the two of ``GSᵀ + SᵀG``. The symmetric part of the true gradient is
    dropped, so the input must be confined to skew matrices (built as ``P − Pᵀ``) for the
    result to be the exact derivative; on such inputs it is (gradcheck, twice differentiable).
    """
    return _SkewSquare.apply(S, value)


def skew_rho_bounds(S2: Tensor) -> tuple[Tensor, Tensor]:
    """(η, λ) per matrix from ``S2 = S²`` of a skew S (no grad), ``λ ≤ ‖S‖₂ ≤ η``:

    * ``η = min(‖S²‖_F, ‖S²‖₁)^{1/2}`` (each norm ≥ ρ(S²) = ‖S‖₂²; η ≤ ‖S‖_F since
      ‖S²‖_F ≤ ‖S‖_F²);
    * ``λ = max(‖S²‖_F, ‖S²‖₁)^{1/2}/n^{1/4}`` (both norms are ≤ √n·‖S²‖₂)."""
    s2 = S2.detach()
    fro, one = torch.linalg.matrix_norm(s2), norm1(s2)
    return torch.minimum(fro, one).sqrt(), torch.maximum(fro, one).sqrt() / s2.shape[-1] ** 0.25


def _norm_pairs(x: Tensor) -> list[list[float]]:
    """``[[‖x_i‖_F, ‖x_i‖₁], ...]`` per matrix of (..., n, n) as host floats (one host read)."""
    x = x.detach().reshape(-1, x.shape[-2], x.shape[-1])
    return torch.stack([torch.linalg.matrix_norm(x), norm1(x)], dim=-1).tolist()


def identity_plus_apply(Y: Tensor, N: Tensor, right: bool) -> Tensor:
    """``Y·(I + N)`` (``right``) or ``(I + N)·Y`` without forming ``I + N``: one fused ``addmm``
    for matrices, broadcasting products for batches."""
    if N.dim() == 2 and Y.dim() == 2:
        return torch.addmm(Y, Y, N) if right else torch.addmm(Y, N, Y)
    return Y + Y @ N if right else Y + N @ Y


def _power_floor(S2: Tensor) -> float:
    """A lower bound of ``max ‖S‖₂`` over the batch from one power step on ``−S² = SᵀS``
    (PSD): ``ρ² ≥ ‖S²x‖/‖x‖`` for any x ≠ 0, here ``x = S²·1`` (O(n²), one host read; 0
    where x = 0). Typically within ≈ 2 of ρ, against ``n^{-1/4}`` for the norm floor of
    :func:`skew_rho_bounds`, so :func:`skew_plan` forms ``S⁴`` only where it can pay."""
    s2 = S2.detach()
    x = s2.sum(-1)
    y = torch.linalg.vecdot(s2, x.unsqueeze(-2))  # S²x, row by row (no n×n product)
    nx = torch.linalg.vector_norm(x, dim=-1)
    ratio = torch.where(nx > 0, torch.linalg.vector_norm(y, dim=-1) / nx.clamp_min(torch.finfo(s2.dtype).tiny), 0.0)
    return math.sqrt(max(float(ratio.max()), 0.0))


def refine_rho_bound(S2: Tensor, eta: float) -> float:
    """A tighter upper bound of ``max ‖S‖₂`` than ``eta`` from ``S⁴ = (S²)²`` and ``S⁸``: each
    ``‖S^{2j}‖^{1/(2j)}`` in the Frobenius and 1-norm is ≥ ρ and falls towards ρ as j grows
    (measured for a random 256² S: ≈ 1.4ρ at S⁴, ≈ 1.15ρ at S⁸). Two products without
    gradient and one host read; used where it can save a squaring."""
    s4 = S2.detach() @ S2.detach()
    s8 = s4 @ s4
    q4, q8 = _norm_pairs(s4), _norm_pairs(s8)
    etas = [min(min(p4) ** 0.25, min(p8) ** 0.125) for p4, p8 in zip(q4, q8)]
    return min(eta, max(etas))


def _cost(m: int, s: int) -> int:
    """Products of forward + backward at degree m with s squarings (S² back: one product)."""
    return 3 * taylor_matmuls(m) - 1 + 3 * s


def skew_plan(S2: Tensor, max_squarings: int = 14, *, refine_within: int | None = None) -> tuple[int, int, float]:
    """(degree m ≥ 2, squarings s, η) for the exponential of a skew S given ``S2 = S²`` (no
    grad; float32/float64; one plan for a batch: its largest η).

    η, λ: :func:`skew_rho_bounds` (computed on the host from the two norms of each S², one
    read); when the plan for λ, and then for the tighter floor of :func:`_power_floor` (one
    more read), would cost at least 2 products less (forward + backward), ``S⁴ = (S²)²`` is
    formed (one product, no gradient) and η lowered to ``min(η, ‖S⁴‖_F^{1/4}, ‖S⁴‖₁^{1/4})``
    (measured ≈ 1.4 ρ against ≈ 2.2 ρ for a trained 256² generator: degree 2 instead of 4 for
    0.003 ≲ ρ ≲ 0.005); ``refine_within``: form it only where the cheaper plan would be at most
    that degree without squarings (a caller that computes higher degrees otherwise, as the
    Padé route of :func:`~orthofx.linalg.skew_expm_apply.expm_skew_apply_host`). Three host
    reads at most. η beyond
    ``θ·2^max_squarings`` is counted in ``solver_stats().fallbacks["expm-range"]`` (the result
    is then inaccurate); η is NaN for NaN/Inf input."""
    dtype = S2.dtype
    table = _NORMAL_THETAS[table_dtype(dtype)]
    pairs = _norm_pairs(S2)
    if any(math.isnan(v) for pair in pairs for v in pair):
        return expm_plan(math.nan, dtype, max_squarings, imaginary=True, min_degree=2) + (math.nan,)
    etas = [math.sqrt(min(pair)) for pair in pairs]
    eta = max(etas)
    m, s = expm_plan(eta, dtype, max_squarings, imaginary=True, min_degree=2)
    if math.isfinite(eta) and (m, s) != (2, 0):
        floor = max(math.sqrt(max(pair)) for pair in pairs) / S2.shape[-1] ** 0.25
        m_lo, s_lo = expm_plan(floor, dtype, max_squarings, imaginary=True, min_degree=2)
        if _cost(m_lo, s_lo) + 1 < _cost(m, s):  # a tighter floor first: two matrix-vector products
            floor = max(floor, _power_floor(S2))
            m_lo, s_lo = expm_plan(floor, dtype, max_squarings, imaginary=True, min_degree=2)
        useful = refine_within is None or (s_lo == 0 and m_lo <= refine_within)
        if useful and _cost(m_lo, s_lo) + 1 < _cost(m, s):
            s2 = S2.detach()
            etas = [min(e, min(pair) ** 0.25) for e, pair in zip(etas, _norm_pairs(s2 @ s2))]
            eta = max(etas)
            m, s = expm_plan(eta, dtype, max_squarings, imaginary=True, min_degree=2)
    if s == max_squarings and max_squarings:
        over = sum(e > table[-1][1] * 2.0**max_squarings for e in etas)
        if over:
            solver_stats().record_fallback("expm-range", over)
    return m, s, eta


def expm_skew_host(S: Tensor, max_squarings: int = 14, *, S2: Tensor | None = None,
                   plan: tuple[int, int, float] | None = None) -> tuple[Tensor, int]:
    """``(exp(S) − I, s)`` for skew-symmetric ``S`` (..., n, n), float32/float64, on the host
    path (module doc): Taylor degree and squarings ``s`` from :func:`skew_plan`, differentiable
    by autograd (with :func:`skew_square`). ``S2`` (``S²`` without gradient) and ``plan`` (its
    :func:`skew_plan`) may be passed when the caller has them.

    ``S`` must be exactly skew-symmetric and built so that its gradient is read on the skew
    matrices only (``S = P − Pᵀ``), see :func:`skew_square`. NaN/Inf input gives NaN, counted
    in ``solver_stats().nonfinite``. Cost: ``taylor_matmuls(m)`` products (``S²`` among them)
    + s, and S⁴ where it pays."""
    if S2 is None:
        sd = S.detach()
        S2 = sd @ sd
    m, s, eta = skew_plan(S2, max_squarings) if plan is None else plan
    S2g = skew_square(S, S2)
    x, x2 = (S, S2g) if s == 0 else (S * 2.0**-s, S2g * 4.0**-s)
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

