r"""``exp(P − Pᵀ)·Y`` or ``Y·exp(P − Pᵀ)`` on the host path, with a closed-form backward at the
low Taylor degrees.

The dense routes of the flat OW map are ``W = exp(S)·Y₀`` with ``S = P − Pᵀ``, ``P = a·Y₀ᵀ``
(``side="left"``: a non-square weight's tall generator) and ``W = Y₀·exp(S)`` with ``P = B``
the square generator itself (``side="right"``).
While the generator is small (‖S‖₂ ≲ 0.09 in float32: a young or slowly moving generator) the
exponential is a Taylor polynomial of degree 2 or 4 (:func:`orthofx.linalg.skew_expm.skew_plan`:
truncation below the unit roundoff), and the whole step ``P ↦ W`` is one autograd node whose
backward is written out (:class:`_ExpSkewApply`):

* degree 2, ``N = S + S²/2``;  degree 4, ``N = S + S²/2 + S²·T`` with ``T = S/6 + S²/24``
  (computed as ``U/6``, ``U = S + S²/4``: the scalars ride in alpha, :func:`_poly`);
  ``W = Y + N·Y`` (left) or ``Y + Y·N`` (right; one ``addmm``);
* backward, with ``G_N = Ḡ·Yᵀ`` (left) or ``Yᵀ·Ḡ`` (right): the gradient on S directly, ``D`` (degree 2: ``G_N``;
  degree 4: ``G_N + S²G_N/6``) and on S², ``E`` (``G_N/2``; ``G_N/2 + G_N·Tᵀ + S²G_N/24``).
  ``S² = S·S`` gives S the skew part ``(SH)ᵀ − SH``, ``H = (E + Eᵀ)/2``, so

      ∂ℓ/∂P = Z − Zᵀ,   Z = D − S·(E + Eᵀ)      (one addmm, one strided subtraction),

  since ``P ↦ S`` maps a gradient X to ``X − Xᵀ`` (2·skew) and only the skew part of the
  gradient on S is seen through ``P − Pᵀ``. Products: forward 1 (degree 2) / 2 (degree 4)
  besides ``N·Y``; backward ``G_N``, then 1 / 3. The same count as autograd with
  :func:`~orthofx.linalg.skew_expm.skew_square`, in 5–8 tensor operations instead of ≈ 15, and
  no autograd node per operation (measured: ≈ 5% of a 256² OW step on one CPU thread).

Twice differentiable: when the backward runs with grad mode on (``create_graph=True``) it
recomputes S, S², T, N from the saved P with autograd, so its result is differentiable in P
and Y. Beyond degree 4 (‖S‖₂ ≳ 0.09 in float32) the diagonal Padé approximants of
:mod:`orthofx.linalg.skew_pade` take over (one LU, fewer products than the Taylor
polynomial: 20–45 % less time from ‖S‖₂ = 0.3 on, measured at 256²/512²; where the bound η
would cost a squaring, :func:`~orthofx.linalg.skew_expm.refine_rho_bound` tightens it first);
batches and a
NaN/Inf argument go through :func:`~orthofx.linalg.skew_expm.expm_skew_host` (autograd).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from orthofx.linalg.expm import table_dtype
from orthofx.linalg.skew_expm import (
    _power_floor, antisym, expm_skew_host, identity_plus_apply, refine_rho_bound, skew_plan,
)
from orthofx.linalg.skew_pade import PADE_THETAS, pade_plan, skew_pade_apply

__all__ = ["expm_skew_apply_host", "FUSED_DEGREES"]

#: Taylor degrees with the closed-form backward (no squarings, unbatched)
FUSED_DEGREES = (2, 4)


def _poly(S: Tensor, S2: Tensor, m: int) -> tuple[Tensor, Tensor | None]:
    """(N = T_m(S) − I, U) for m = 2 (``N = S + S²/2``, U None) or 4 (``U = S + S²/4``, so
    ``T = U/6`` and ``N = S + S²/2 + S²U/6``). The scalars ride in ``add``/``addmm``'s
    alpha: each n×n elementwise pass costs ≈ ⅓ of a 256² product on one CPU thread once the
    operands leave the cache (measured), so N takes two passes and one product, not five."""
    if m == 2:
        return torch.add(S, S2, alpha=0.5), None
    U = torch.add(S, S2, alpha=0.25)
    return torch.addmm(torch.add(S, S2, alpha=0.5), S2, U, alpha=1.0 / 6.0), U


class _ExpSkewApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, P: Tensor, Y: Tensor, S: Tensor, S2: Tensor, m: int, right: bool) -> Tensor:
        N, U = _poly(S, S2, m)
        ctx.m, ctx.right = m, right
        ctx.save_for_backward(P, Y, S, S2, U, N)
        return identity_plus_apply(Y, N, right)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        P, Y, S, S2, U, N = ctx.saved_tensors
        m, right = ctx.m, ctx.right
        if torch.is_grad_enabled():  # double backward: the intermediates as functions of P
            S = P - P.mT
            S2 = S @ S
            N, U = _poly(S, S2, m)
        gN = Y.mT @ g if right else g @ Y.mT
        if m == 2:  # D = G_N, E = G_N/2:  Z = G_N − S(G_N + G_Nᵀ)/2
            Z = torch.addmm(gN, S, gN + gN.mT, alpha=-0.5)
        else:  # D = G_N + S²G_N/6;  E = (G_N + S²G_N/12)/2 + G_N Uᵀ/6
            Y2 = S2 @ gN
            D = torch.add(gN, Y2, alpha=1.0 / 6.0)
            E = torch.addmm(torch.add(gN, Y2, alpha=1.0 / 12.0), gN, U.mT, beta=0.5, alpha=1.0 / 6.0)
            Z = torch.addmm(D, S, E + E.mT, alpha=-1.0)
        gP = Z - Z.mT if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            gY = None
        else:  # left: (I + N)ᵀ·Ḡ;  right: Ḡ·(I + N)ᵀ
            gY = identity_plus_apply(g, N.mT, right)
        return gP, gY, None, None, None, None


def expm_skew_apply_host(P: Tensor, Y: Tensor, max_squarings: int = 14, *,
                         S: Tensor | None = None, S2: Tensor | None = None,
                         side: str = "left") -> tuple[Tensor, int]:
    """``(exp(P − Pᵀ)·Y, s)`` (``side="left"``; P (n, n), Y (n, k)) or ``(Y·exp(P − Pᵀ), s)``
    (``side="right"``; Y (k, n)) for float32/float64 CPU tensors on the host path: the degree
    and squarings ``s`` of :func:`~orthofx.linalg.skew_expm.skew_plan` (truncation below the
    unit roundoff), the closed-form backward of the module doc at degree 2 or 4 without
    squarings, autograd through :func:`~orthofx.linalg.skew_expm.expm_skew_host` otherwise.
    ``S``, ``S2``: ``P − Pᵀ`` and its square already formed without gradient (``S2`` only with
    ``S``). Differentiable in P and Y (twice)."""
    if side not in ("left", "right"):
        raise ValueError(f"expm_skew_apply_host: side={side!r}; use 'left' or 'right'")
    right = side == "right"
    with torch.no_grad():
        if S is None:
            S, S2 = P.detach() - P.detach().mT, None
        if S2 is None:
            S2 = S @ S
    fusable = P.dim() == 2 and Y.dim() == 2
    m, s, eta = skew_plan(S2, max_squarings, refine_within=max(FUSED_DEGREES) if fusable else None)
    if s == 0 and m in FUSED_DEGREES and fusable:
        return _ExpSkewApply.apply(P, Y, S, S2, m, right), 0
    if fusable and math.isfinite(eta):  # beyond the fused degrees: Padé
        mp, sp = pade_plan(eta, S2.dtype, max_squarings)
        if sp and _power_floor(S2) <= PADE_THETAS[table_dtype(S2.dtype)][-1][1]:
            # a squaring (and the polish after it) may be avoidable: a tighter bound first
            mp, sp = pade_plan(refine_rho_bound(S2, eta), S2.dtype, max_squarings)
        return skew_pade_apply(antisym(P), S2, Y, mp, sp, right), sp
    N, s = expm_skew_host(antisym(P), max_squarings, S2=S2, plan=(m, s, eta))
    return identity_plus_apply(Y, N, right), s
