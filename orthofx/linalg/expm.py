r"""Matrix exponential ``exp(A)`` whose CUDA path never synchronises with the host.

``torch.linalg.matrix_exp`` picks its Taylor degree and its number of squarings on the host
(on CUDA it copies the 1-norm to the CPU, and its backward evaluates a 2n×2n exponential the
same way), so every call stalls the stream. :func:`expm` has two paths computing the same
function (they differ by rounding):

**Sync-free path** (``sync_free=True``: CUDA, ``cuda_policy``, compile/export/trace). One fixed
degree, squarings decided on the device:

1. ``s = clamp(⌈log₂(‖A‖₁/θ)⌉, 0, max_squarings)`` (a device tensor), ``X = 2^{−s} A``, θ = 2;
2. ``T = Σ_{k≤m} X^k/k!`` by Paterson–Stockmeyer (6 matmuls in float32, 8 in float64),
   degree ``m = 16`` (float32) or ``m = 25`` (float64): for ``‖X‖₁ ≤ θ`` the truncation error
   relative to ``‖e^X‖`` is ``≤ θ^{m+1}/(m+1)! · e^{2θ}``, 2.0e-8 (float32) and 9e-18
   (float64), below the unit roundoff of each dtype;
3. ``exp(A) = T^{2^s}``: the loop always runs ``max_squarings`` times and step ``i`` is
   ``T ← T² if i < s else T`` (``torch.where``, per batch element).

Backward (a custom ``autograd.Function``): the exact adjoint Fréchet derivative
``∂⟨exp(A), Ḡ⟩/∂A = L_exp(Aᵀ, Ḡ)``, read off the block exponential
``exp([[Aᵀ, Ḡ], [0, Aᵀ]]) = [[e^{Aᵀ}, L_exp(Aᵀ, Ḡ)], [0, e^{Aᵀ}]]`` (Higham, *Functions of
Matrices*, Thm. 3.6; Ḡ is scaled to ‖A‖₁ first, L being linear in it, so a large or tiny
gradient costs no extra squarings and loses no accuracy), computed by the same sync-free
routine (≈ 60 kernels at 14 squarings instead of ≈ 190 for autograd through the loop), twice
differentiable.

**Host path** (``sync_free=False``: the CPU; :func:`expm_host`). ‖A‖₁ is read on the host and
:func:`expm_plan` picks the cheapest (degree m, squarings s) among the Paterson–Stockmeyer
degrees 1, 2, 4, 6, 9, 12, 16 (float32; + 20, 25 in float64) whose truncation bound (as above,
with θ_m from ``θ^{m+1}/(m+1)!·e^{2θ} ≤ u``, u = 2⁻²⁴ / 2⁻⁵³) holds: degree 4 (2 products) for
‖A‖₁ ≤ 0.09 in float32 instead of 16 (6 products). The derivative is autograd through those
products (the exact derivative of the computed approximant, ≈ 2× the forward's products, against
≈ 8× for the 2n×2n block), so twice differentiable too. Measured (benchmarks/ow_shapes.py, one
512² OW layer, 1 CPU thread): the OW step went from 287 ms to ≈ 32 ms.

``‖A‖₁ > θ·2^max_squarings`` (default 14: ‖A‖₁ > 32768) is beyond the scaling range on both
paths and the result is inaccurate; with ``sync_free=False`` such matrices are counted in
``solver_stats().fallbacks["expm-range"]`` (the sync-free path cannot see it without a sync).
NaN/Inf input gives NaN output (counted in ``solver_stats().nonfinite``). float16/bfloat16 are
computed in float32 with autocast off and returned in their dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from orthofx.errors import ConfigError
from orthofx.linalg._checks import check_finite, check_square, no_autocast, working_dtype
from orthofx.linalg.stats import solver_stats
from orthofx.syncs import sync_free_preferred

__all__ = ["expm"]

EXPM_THETA = 2.0
_DEGREE = {torch.float32: 16, torch.float64: 25}
#: Paterson–Stockmeyer-optimal degrees (the largest degree for each number of matmuls)
_PS_DEGREES = (1, 2, 4, 6, 9, 12, 16, 20, 25)
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The key of the θ tables (Taylor here, Padé in :mod:`orthofx.linalg.skew_pade`) for
    ``dtype``: float64, or float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm1(x: Tensor) -> Tensor:
    """‖x‖₁ (largest column sum of |x|) per matrix of (..., m, n): ``|x|.sum(-2).amax(-1)``, the
    value of ``torch.linalg.matrix_norm(x, ord=1)`` at ≈ 1/5 of its CPU time (measured, 512²)."""
    return x.abs().sum(-2).amax(-1)


def expm_degree(dtype: torch.dtype) -> int:
    """Largest Taylor degree used for ``dtype`` (16 for float32 and below, 25 for float64): the
    sync-free path's fixed degree."""
    return _DEGREE[table_dtype(dtype)]


@functools.lru_cache(maxsize=None)
def _ps_block(m: int) -> int:
    """Block size q of the Paterson–Stockmeyer scheme for degree m (the cheapest q; cached: the
    host path plans every call)."""
    return min(range(2, m + 1), key=lambda q: (q - 1 + m // q - (m % q == 0), q)) if m > 1 else 1


def taylor_matmuls(m: int) -> int:
    """Matrix products of :func:`_taylor` at degree m: (q − 1) powers + ⌊m/q⌋ − [q | m] Horner
    steps (0, 1, 2, 3, 4, 5, 6, 7, 8 for m = 1, 2, 4, 6, 9, 12, 16, 20, 25)."""
    q = _ps_block(m)
    return 0 if m == 1 else q - 1 + m // q - (m % q == 0)


def _theta(m: int, u: float) -> float:
    """Largest θ with θ^{m+1}/(m+1)! · e^{2θ} ≤ u (bisection): for ‖X‖₁ ≤ θ the degree-m
    Taylor truncation error relative to ‖e^X‖ (≥ e^{−θ}) is below the unit roundoff u."""
    lo, hi = 0.0, 16.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        bound = math.exp((m + 1) * math.log(mid) - math.lgamma(m + 2) + 2 * mid)
        lo, hi = (mid, hi) if bound <= u else (lo, mid)
    return lo


def _theta_normal(m: int, u: float) -> float:
    """Largest θ with θ^{m+1}/(m+1)! ≤ u (bisection): for a normal X with purely imaginary
    eigenvalues (X skew-symmetric, or similar to one on the range that matters) and ρ(X) ≤ θ,
    ``‖T_m(X) − e^X‖₂ = max_λ |T_m(iλ) − e^{iλ}| ≤ θ^{m+1}/(m+1)!`` (Lagrange remainder of
    ``e^{iy}``, whose derivatives have modulus 1): no ``e^{2θ}`` factor."""
    lo, hi = 0.0, 16.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (m + 1) * math.log(mid) - math.lgamma(m + 2) <= math.log(u) else (lo, mid)
    return lo


#: dtype -> ((degree, θ_degree), ...), increasing; the top degree's θ is EXPM_THETA (its bound
#: holds there: 2.0e-8 in float32, 9e-18 in float64), so the scaling range is unchanged
_THETAS = {
    dt: tuple((m, EXPM_THETA if m == _DEGREE[dt] else _theta(m, u)) for m in _PS_DEGREES if m <= _DEGREE[dt])
    for dt, u in _UNIT_ROUNDOFF.items()
}
#: the same for a bound η on the spectral radius of a matrix with imaginary spectrum
#: (:func:`_theta_normal`; top degree: θ ≈ 2.7 in float32, 2.6 in float64, ≥ EXPM_THETA)
_NORMAL_THETAS = {
    dt: tuple((m, _theta_normal(m, u)) for m in _PS_DEGREES if m <= _DEGREE[dt]) for dt, u in _UNIT_ROUNDOFF.items()
}


def expm_plan(norm: float, dtype: torch.dtype, max_squarings: int = 14, *, imaginary: bool = False,
              min_degree: int = 1) -> tuple[int, int]:
    """(degree m, squarings s) for ‖X‖₁ = ``norm`` (a host float): the pair of least cost
    ``taylor_matmuls(m) + s`` (ties: fewer squarings, whose rounding errors double each step)
    with ``‖X‖₁/2^s ≤ θ_m`` (truncation below the unit roundoff of ``dtype``), s ≤ max_squarings.
    NaN gives the top degree and s = 0 (NaN propagates); beyond the range, s = max_squarings.
    ``imaginary=True``: ``norm`` bounds the spectral radius of a matrix whose spectrum is
    imaginary and the truncation is measured there (θ_m of ``_NORMAL_THETAS``). Degrees below
    ``min_degree`` are not used (2: the derivative of the approximant has the exact second
    derivative of exp at 0, which degree 1, ``I + X``, has not)."""
    table = (_NORMAL_THETAS if imaginary else _THETAS)[table_dtype(dtype)]
    if not math.isfinite(norm):
        return table[-1][0], 0 if math.isnan(norm) else max_squarings
    best: tuple[int, int, int] | None = None
    for m, theta in table:
        if m < min_degree:
            continue
        s = max(0, math.ceil(math.log2(norm / theta))) if norm > theta else 0
        if s > max_squarings:
            continue
        key = (taylor_matmuls(m) + s, s, m)
        best = key if best is None or key < best else best
    if best is None:
        return table[-1][0], max_squarings
    return best[2], best[1]


def _taylor(x: Tensor, m: int, x2: Tensor | None = None, identity: bool = True) -> Tensor:
    """Σ_{k=0}^{m} x^k/k! for x (B, n, n) by Paterson–Stockmeyer: blocks
    ``B_j = Σ_{i<q} x^i/(jq+i)!`` from the powers x..x^{q−1} (elementwise sums), then Horner in
    x^q; :func:`taylor_matmuls` products (one fewer when ``x2`` = x² is given), no in-place ops
    (autograd goes through it). ``identity=False`` leaves out the k = 0 term (the sum from
    k = 1: ``T − I``, which keeps the small part of T to full relative accuracy)."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device) if identity or m // _ps_block(m) > 1 else None
    if m == 1:
        return eye + x if eye is not None else x
    q = _ps_block(m)
    powers: list[Tensor | None] = [None, x]  # x^0 = I is added as a diagonal
    for j in range(2, q + 1):
        powers.append(x2 if j == 2 and x2 is not None else torch.matmul(powers[-1], x))  # type: ignore[arg-type]

    def block(j: int) -> Tensor | None:
        out: Tensor | None = None
        for i in range(1, q):
            k = j * q + i
            if k <= m:
                term = powers[i] if k == 1 else powers[i] * (1.0 / math.factorial(k))  # type: ignore[operator]
                out = term if out is None else out + term
        return out

    top = m // q
    c_top = 1.0 / math.factorial(top * q)
    # B_top (its identity term c_top·I plus the powers of degree > top·q), applied to x^q
    rest = block(top)
    out = powers[q] * c_top if rest is None else powers[q] * c_top + torch.matmul(powers[q], rest)  # type: ignore[operator]
    for j in range(top - 1, -1, -1):
        bj = block(j)
        out = out if bj is None else out + bj
        if j or identity:
            out = out + (eye if j == 0 else eye * (1.0 / math.factorial(j * q)))  # type: ignore[operator]
        if j:
            out = torch.matmul(powers[q], out)  # type: ignore[arg-type]
    return out


def _expm_forward(a: Tensor, max_squarings: int, sync_free: bool) -> Tensor:
    """exp(a) on the sync-free path (top degree, masked squarings; see the module doc)."""
    shape = a.shape
    a = a.reshape(-1, shape[-2], shape[-1])
    norm = torch.linalg.matrix_norm(a, ord=1)  # ‖A‖₁ = max column sum, (B,)
    s = torch.ceil(torch.log2(norm / EXPM_THETA)).clamp(0, max_squarings)
    s = torch.where(torch.isnan(norm), norm, s)[:, None, None]  # NaN input -> NaN output
    y = _taylor(a * torch.exp2(-s), expm_degree(a.dtype))
    if max_squarings:
        steps = torch.arange(max_squarings, device=a.device, dtype=s.dtype)
        active = s > steps  # (B, 1, max_squarings): one comparison for all steps
        for i in range(max_squarings):
            y = torch.where(active[..., i : i + 1], torch.bmm(y, y), y)
    return y.reshape(shape)


def expm_host(a: Tensor, max_squarings: int = 14, *, normal_spectrum: bool = False) -> tuple[Tensor, int]:
    """(exp(a), squarings of the largest element) on the host path, differentiable by autograd
    through the Taylor and squaring steps (the exact derivative of the computed approximant:
    about 2× the forward's products, against ≈ 8× for the 2n×2n block exponential). Degree
    and squarings from :func:`expm_plan` of the batch's largest η (one host read: free on the
    CPU); each element is scaled by its own 2^{−s_i}. Counts out-of-range matrices.

    η = ‖A‖₁, or with ``normal_spectrum=True`` (the caller's promise: the truncation error
    only matters through a *normal* matrix N with A's nonzero eigenvalues, all imaginary — A
    skew, or the low-rank M of the OW map, where L·p(M) = p(S)·L) η = min(‖A‖₁, ‖A‖_F,
    ‖A²‖_F^{1/2}, ‖A²‖₁^{1/2}): a bound on ρ(A) = ‖N‖₂ (Gelfand), for which
    ``‖Σ_{k>m} N^k/k!‖₂ ≤ ρ^{m+1}/(m+1)!`` (the θ_m of ``expm_plan(..., imaginary=True)``). A²
    is the Taylor's own first product, so the sharper bound costs nothing (measured in training
    a 512² OW layer: 4× below ‖A‖₁, so degree 2 or 4 instead of 4 or 6)."""
    shape = a.shape
    a = a.reshape(-1, shape[-2], shape[-1])
    dt = table_dtype(a.dtype)
    table = (_NORMAL_THETAS if normal_spectrum else _THETAS)[dt]
    norm = norm1(a.detach())
    nan = bool(norm.isnan().any())
    eta = float(norm.nan_to_num(0.0).max()) if not nan else math.nan
    a2 = None
    if normal_spectrum and not nan and eta > table[0][1]:
        # ρ(A) ≤ ‖A‖ and ‖A²‖^{1/2} in any submultiplicative norm
        a2 = a @ a
        a2d = a2.detach()
        rho = torch.minimum(torch.linalg.matrix_norm(a2d), norm1(a2d)).sqrt()
        norm = torch.minimum(norm, torch.minimum(torch.linalg.matrix_norm(a.detach()), rho))
        eta = min(eta, float(norm.max()))
    m, top = expm_plan(eta, a.dtype, max_squarings, imaginary=normal_spectrum, min_degree=2 if normal_spectrum else 1)
    if top == max_squarings and max_squarings:
        over = int((torch.nan_to_num(norm, nan=0.0) > EXPM_THETA * 2.0**max_squarings).sum())
        if over:
            solver_stats().record_fallback("expm-range", over)
    if a.shape[0] == 1:
        scale = 2.0**-top
        y = _taylor(a * scale if top else a, m, None if a2 is None else (a2 * scale**2 if top else a2))
        for _ in range(top):
            y = y @ y
        return y.reshape(shape), top
    theta = dict(table)[m]
    s = torch.ceil(torch.log2(norm / theta)).clamp(0, top).nan_to_num(0.0)[:, None, None]
    y = _taylor(a * torch.exp2(-s), m, None if a2 is None else a2 * torch.exp2(-2 * s))
    for i in range(top):
        y = torch.where(s > i, y @ y, y)
    return y.reshape(shape), top


class _Expm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, max_squarings: int, sync_free: bool) -> Tensor:
        ctx.max_squarings, ctx.sync_free = max_squarings, sync_free
        ctx.save_for_backward(a)
        return _expm_forward(a, max_squarings, sync_free)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        (a,) = ctx.saved_tensors
        n = a.shape[-1]
        at = a.mT
        # L is linear in Ḡ: scale Ḡ to the size of A so that the block needs no more squarings
        # than A (γ on the device; Ḡ = 0 gives 0)
        g_norm = torch.linalg.matrix_norm(g, ord=1)[..., None, None]
        a_norm = torch.linalg.matrix_norm(a, ord=1)[..., None, None].clamp_min(EXPM_THETA)
        gamma = (g_norm / a_norm).clamp_min(torch.finfo(a.dtype).tiny)
        top = torch.cat([at, g / gamma], dim=-1)
        bottom = torch.cat([torch.zeros_like(at), at], dim=-1)
        block = torch.cat([top, bottom], dim=-2)  # [[Aᵀ, Ḡ/γ], [0, Aᵀ]]
        # one more squaring of headroom: ‖block‖₁ ≤ 2·max(‖A‖₁, θ)
        e = expm(block, max_squarings=ctx.max_squarings + 1, sync_free=ctx.sync_free)
        return gamma * e[..., :n, n:], None, None


def expm(A: Tensor, *, max_squarings: int = 14, sync_free: bool | None = None, validate: bool = False) -> Tensor:
    """``exp(A)`` of a batch of square matrices (..., n, n) by scaling and squaring (module doc).

    Args:
        A: float tensor (..., n, n); differentiable.
        max_squarings: upper bound on the squarings, so ``‖A‖₁ ≤ 2·2^max_squarings`` is
            computed to full accuracy.
        sync_free: ``True`` runs ``max_squarings`` masked squarings (no host sync: the CUDA
            default); ``False`` reads ‖A‖₁ on the host, picks degree and squarings by
            :func:`expm_plan` and differentiates by autograd (the CPU default); ``None`` = :func:`orthofx.syncs.sync_free_preferred` (CUDA, or
            inside ``orthofx.syncs.cuda_policy()``), and always while ``torch.compile``,
            ``torch.export`` or ``torch.jit.trace`` trace the call.
        validate: raise InputError on NaN/Inf (one host sync). Default False: NaN/Inf give NaN.

    Returns:
        exp(A) in A's dtype. Orthogonal up to rounding when A is skew-symmetric.
    """
    check_square(A, "expm input")
    if isinstance(max_squarings, bool) or not isinstance(max_squarings, int) or max_squarings < 0:
        raise ConfigError(f"max_squarings must be an int >= 0, got {max_squarings!r}")
    if A.numel() == 0:
        return A.clone()
    if validate:
        check_finite(A, "expm input")
    if sync_free is None:  # traced/compiled graphs must not depend on data on the host
        sync_free = sync_free_preferred(A.device) or torch.compiler.is_compiling() or torch.jit.is_tracing()
    cd = working_dtype(A.dtype)
    with no_autocast(A.device.type):
        if sync_free:
            y = _Expm.apply(A.to(cd), max_squarings, True)
        else:
            y = expm_host(A.to(cd), max_squarings)[0]
        solver_stats().record_nonfinite(y, event_dims=2)
        return y.to(A.dtype)
