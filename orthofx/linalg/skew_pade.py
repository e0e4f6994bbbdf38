r"""``Y·exp(S)`` / ``exp(S)·Y`` for a skew-symmetric ``S`` by diagonal Padé approximants: the
host path's exponential beyond the fused Taylor degrees (:mod:`orthofx.linalg.skew_expm_apply`).

For the [m/m] Padé approximant ``r_m = p_m(x)/p_m(−x)`` of ``eˣ``
(``p_m(x) = Σ_j c_j x^j``, ``c_j = (2m − j)!·m!/((2m)!·j!·(m − j)!)``) and a skew S, split
``p_m(S) = V + U`` into its even part ``V`` (symmetric) and odd part ``U = S·O(S²)`` (skew);
then ``p_m(−S) = V − U = p_m(S)ᵀ`` and

    r_m(S) = (V − U)⁻¹(V + U) = I + 2(V − U)⁻¹U,

orthogonal in exact arithmetic. Applied to Y without forming ``r_m(S)``: ``Y·r = Y + 2·X·U``
with ``X = Y(V − U)⁻¹`` (one LU and one solve with Y's rows), or ``r·Y = Y + 2(V − U)⁻¹(U·Y)``.

Accuracy. S is normal with eigenvalues ``iλ``; ``|r_m(iλ)| = 1`` and ``|r_m(iλ) − e^{iλ}|``
grows with ``|λ|``, so the result is exp(S) to the unit roundoff u while ``‖S‖₂ ≤ θ_m`` with
(largest such |λ|, computed in 50-digit arithmetic, rounded down)

    float32 (u = 2⁻²⁴):  θ₃ = 0.482, θ₅ = 1.80, θ₇ = 3.70
    float64 (u = 2⁻⁵³):  θ₃ = 0.0272, θ₅ = 0.287, θ₇ = 0.955, θ₉ = 2.00, θ₁₃ = 4.60

(the table stops at 7 in float32: the terms of [9/9]'s ``V`` cancel to a tenth at ``θ₉``,
measured 7× the rounding error of [7/7] at 256²). Beyond ``θ_max`` the argument is scaled by
``2⁻ˢ`` and the result squared s times (``N ← 2N + N²``, N = r − I). ``cond(V − U)`` is
``max|p(iλ)|/min|p(iλ)| ≤ 1.14`` for [7/7] over ``|λ| ≤ θ₇`` (1.91 for [13/13]), so the solve
adds no error beyond rounding, and no polish is needed without squarings.

:func:`pade_columns` is the same approximant for the low-rank route's 2k×2k ``M = RᵀL`` of the
flat OW map (not skew, but ``L·r(M) = r(S)·L``, so the θ table bounds what reaches W), solved
for the k columns the map needs.

Cost, forward: ``S²`` (given), the even powers up to ``S^{m−1}`` ((m − 3)/2 products), ``U``
(one), ``X·U`` (one), one LU and one solve; the derivative is autograd's (twice
differentiable), with ``S²`` from :func:`~orthofx.linalg.skew_expm.skew_square`. Measured on one
CPU thread (forward + backward of ``Y·exp(B − Bᵀ)``, 256²): 7.0 ms at ``‖S‖₂ = 3`` ([7/7])
against 12.5 ms for the Taylor polynomial (degree 16, one squaring); 5.0 against 6.1 ms at 0.3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from orthofx.linalg.expm import table_dtype
from orthofx.linalg.skew_expm import identity_plus_apply, skew_square

__all__ = ["PADE_THETAS", "pade_plan", "pade_coefficients", "skew_pade_apply", "pade_columns"]

#: (m, θ_m): [m/m] is exp to the unit roundoff for ‖S‖₂ ≤ θ_m (module doc)
PADE_THETAS: dict[torch.dtype, tuple[tuple[int, float], ...]] = {
    torch.float32: ((3, 0.482), (5, 1.80), (7, 3.70)),
    torch.float64: ((3, 0.0272), (5, 0.287), (7, 0.955), (9, 2.00), (13, 4.60)),
}


def pade_coefficients(m: int) -> tuple[float, ...]:
    """``c_j = (2m − j)!·m!/((2m)!·j!·(m − j)!)``, j = 0..m, of the [m/m] Padé numerator of eˣ."""
    f = math.factorial
    return tuple(f(2 * m - j) * f(m) / (f(2 * m) * f(j) * f(m - j)) for j in range(m + 1))


def pade_plan(eta: float, dtype: torch.dtype, max_squarings: int = 14) -> tuple[int, int]:
    """(m, s): the lowest Padé degree of the table with ``η ≤ θ_m``, else the highest degree and
    the fewest squarings with ``η/2ˢ ≤ θ_m`` (at most ``max_squarings``). NaN: (top, 0)."""
    table = PADE_THETAS[table_dtype(dtype)]
    for m, theta in table:
        if eta <= theta:
            return m, 0
    m, theta = table[-1]
    if not math.isfinite(eta):
        return m, 0 if math.isnan(eta) else max_squarings
    return m, min(max_squarings, max(0, math.ceil(math.log2(eta / theta))))


def _combine(coef: tuple[float, ...], powers: list[Tensor]) -> Tensor:
    """``Σ_i coef[i]·powers[i]`` (1 ≤ len(coef) ≤ len(powers)) in one pass per term:
    the scalars ride in ``mul``/``add``'s alpha."""
    out = powers[0] * coef[0]
    for c, p in zip(coef[1:], powers[1:]):
        out = torch.add(out, p, alpha=c)
    return out


def _even_odd(S2: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(V, O) with ``V = Σ c_{2i} S^{2i}`` and ``O = Σ c_{2i+1} S^{2i}`` (so ``U = S·O``), from
    the powers of ``S2``: S⁴ and S⁶ as products, the identity terms on the diagonal, and for
    m > 7 the terms beyond S⁶ as ``S⁶·(c S² + c' S⁴ + c'' S⁶)`` (one product each for V and O)."""
    c = pade_coefficients(m)
    powers = [S2]
    for _ in range(2, min(m // 2, 3) + 1):  # S⁴, S⁶
        powers.append(powers[-1] @ S2)

    def poly(coef: tuple[float, ...]) -> Tensor:  # coef[0]·I + Σ_{i≥1} coef[i]·S^{2i}
        low, high = coef[1:4], coef[4:]
        out = _combine(low, powers)
        if high:
            out = out + powers[2] @ _combine(high, powers)
        out.diagonal(dim1=-2, dim2=-1).add_(coef[0])
        return out

    return poly(c[0::2]), poly(c[1::2])


def skew_pade_apply(S: Tensor, S2: Tensor, Y: Tensor, m: int, s: int, right: bool) -> Tensor:
    """``Y·exp(S)`` (``right``) or ``exp(S)·Y`` by the [m/m] Padé approximant with s squarings
    (:func:`pade_plan`), module doc. ``S`` must be skew-symmetric and built as ``P − Pᵀ``
    (its gradient is read on the skew matrices, :func:`~orthofx.linalg.skew_expm.skew_square`);
    ``S2`` = ``S²`` without gradient. float32/float64, (n, n) with Y (k, n) / (n, k)."""
    S2g = skew_square(S, S2)
    if s:
        S, S2g = S * 2.0**-s, S2g * 4.0**-s
    V, O = _even_odd(S2g, m)
    U = S @ O
    D = V - U
    if s == 0 and right:
        X = torch.linalg.solve_ex(D, Y, left=False, check_errors=False)[0]
        return torch.addmm(Y, X, U, alpha=2.0)
    if s == 0:
        X = torch.linalg.solve_ex(D, U @ Y, check_errors=False)[0]
        return torch.add(Y, X, alpha=2.0)
    N = 2.0 * torch.linalg.solve_ex(D, U, check_errors=False)[0]  # r − I
    for _ in range(s):
        N = torch.addmm(N, N, N, beta=2.0)
    return identity_plus_apply(Y, N, right)


def pade_columns(M: Tensor, M2: Tensor, j: int, m: int, s: int) -> Tensor:
    """``exp(M)[:, j:]`` by the [m/m] Padé approximant with s squarings, for a matrix M whose
    exponential acts through a normal matrix with imaginary spectrum (the low-rank M = RᵀL of
    the flat OW map: ``L·r(M) = r(S)·L`` for every rational r, so the θ table of the module
    doc bounds the error that reaches W). ``M2`` = ``M @ M`` *with* gradient (M is not skew).
    Without squarings only the needed columns are solved for:
    ``r(M)[:, j:] = I[:, j:] + 2(V − U)⁻¹U[:, j:]``. Differentiable by autograd (twice)."""
    V, O = _even_odd(M2, m) if s == 0 else _even_odd(M2 * 4.0**-s, m)
    U = (M if s == 0 else M * 2.0**-s) @ O
    D = V - U
    n = M.shape[-1]
    eye_cols = torch.eye(n, dtype=M.dtype, device=M.device)[:, j:]
    if s == 0:
        return torch.add(eye_cols, torch.linalg.solve_ex(D, U[..., j:], check_errors=False)[0], alpha=2.0)
    N = 2.0 * torch.linalg.solve_ex(D, U, check_errors=False)[0]
    for _ in range(s - 1):
        N = torch.addmm(N, N, N, beta=2.0)
    return torch.add(eye_cols, torch.addmm(N[..., j:], N, N[..., j:], beta=2.0))  # last squaring on the columns
