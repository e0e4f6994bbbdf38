r"""Matrix exponential ``exp(A)`` whose CUDA path never synchronises with the host.

``torch.linalg.matrix_exp`` picks its Taylor degree and its number of squarings on the host
(on CUDA it copies the 1-norm to the CPU, and its backward evaluates a 2n×2n exponential the
same way), so every call stalls the stream. :func:`expm` uses one fixed degree and decides
the squarings on the device:

1. ``s = clamp(⌈log₂(‖A‖₁/θ)⌉, 0, max_squarings)`` (a device tensor), ``X = 2^{−s} A``, θ = 2;
2. ``T = Σ_{k≤m} X^k/k!`` by Paterson–Stockmeyer (7 matmuls in float32, 9 in float64),
   degree ``m = 16`` (float32) or ``m = 25`` (float64): for ``‖X‖₁ ≤ θ`` the truncation error
   relative to ``‖e^X‖`` is ``≤ θ^{m+1}/(m+1)! · e^{2θ}``, 2.0e-8 (float32) and 9e-18
   (float64), below the unit roundoff of each dtype. The large θ keeps the squarings — whose
   rounding errors double at every step — two fewer than a θ = 1/2 scheme;
3. ``exp(A) = T^{2^s}``. With ``sync_free=True`` the loop always runs ``max_squarings``
   times and step ``i`` is ``T ← T² if i < s else T`` (``torch.where``, per batch element);
   with ``sync_free=False`` ``s`` is read on the host (free on the CPU) and exactly
   ``max(s)`` squarings run.

Backward (a custom ``autograd.Function``): the exact adjoint Fréchet derivative
``∂⟨exp(A), Ḡ⟩/∂A = L_exp(Aᵀ, Ḡ)``, read off the block exponential
``exp([[Aᵀ, Ḡ], [0, Aᵀ]]) = [[e^{Aᵀ}, L_exp(Aᵀ, Ḡ)], [0, e^{Aᵀ}]]`` (Higham, *Functions of
Matrices*, Thm. 3.6; Ḡ is scaled to ‖A‖₁ first, L being linear in it, so a large or tiny
gradient costs no extra squarings and loses no accuracy), computed by the same sync-free routine, so the backward costs one 2n×2n
exponential (≈ 60 kernels at the default 14 squarings instead of ≈ 190 for autograd through
the loop) and is twice differentiable (the backward calls :func:`expm` again).

``‖A‖₁ > θ·2^max_squarings`` (default 14: ‖A‖₁ > 32768) is beyond the scaling range and
the result is inaccurate; with ``sync_free=False`` such matrices are counted in
``solver_stats().fallbacks["expm-range"]`` (the sync-free path cannot see it without a sync).
NaN/Inf input gives NaN output (counted in ``solver_stats().nonfinite``). float16/bfloat16 are
computed in float32 with autocast off and returned in their dtype.
"""

from __future__ import annotations

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


def expm_degree(dtype: torch.dtype) -> int:
    """Taylor degree used for ``dtype`` (16 for float32 and below, 25 for float64)."""
    return _DEGREE[torch.float64 if dtype == torch.float64 else torch.float32]


_COEF_CACHE: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}


def _coefficients(m: int, q: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(m//q + 1, q) matrix of 1/k! (k = j·q + i), cached per device: the host→device copy
    (which synchronises) happens once, at the first call, not every step."""
    key = (m, q, dtype, device)
    c = _COEF_CACHE.get(key)
    if c is None:
        c = torch.zeros(m // q + 1, q, dtype=torch.float64)
        for k in range(m + 1):
            c[k // q, k % q] = 1.0 / math.factorial(k)
        c = c.to(dtype=dtype, device=device)
        _COEF_CACHE[key] = c
    return c


def _taylor(x: Tensor, m: int) -> Tensor:
    """Σ_{k=0}^{m} x^k/k! for x of shape (B, n, n) by Paterson–Stockmeyer with block size
    q = ⌈√(m+1)⌉: all blocks ``B_j = Σ_{i<q} c_{jq+i} x^i`` in one small matmul over the stacked
    powers, then Horner in x^q with fused multiply-adds (baddbmm)."""
    q = max(2, math.ceil(math.sqrt(m + 1)))
    b, n = x.shape[0], x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    powers = [eye, x]
    for _ in range(2, q + 1):
        powers.append(torch.bmm(powers[-1], x))
    nblocks = m // q + 1
    stacked = torch.stack(powers[:q], dim=1).reshape(b, q, n * n)  # (B, q, n²)
    blocks = torch.matmul(_coefficients(m, q, x.dtype, x.device), stacked).reshape(b, nblocks, n, n)
    out = blocks[:, -1]
    for j in range(nblocks - 2, -1, -1):
        out = torch.baddbmm(blocks[:, j], powers[q], out)
    return out


def _expm_forward(a: Tensor, max_squarings: int, sync_free: bool) -> Tensor:
    """exp(a) for a float32/float64 batch, no autograd (see module doc)."""
    shape = a.shape
    a = a.reshape(-1, shape[-2], shape[-1])
    norm = torch.linalg.matrix_norm(a, ord=1)  # ‖A‖₁ = max column sum, (B,)
    s = torch.ceil(torch.log2(norm / EXPM_THETA)).clamp(0, max_squarings)
    s = torch.where(torch.isnan(norm), norm, s)[:, None, None]  # NaN input -> NaN output
    y = _taylor(a * torch.exp2(-s), expm_degree(a.dtype))
    if sync_free:
        if max_squarings:
            steps = torch.arange(max_squarings, device=a.device, dtype=s.dtype)
            active = s > steps  # (B, 1, max_squarings): one comparison for all steps
            for i in range(max_squarings):
                y = torch.where(active[..., i : i + 1], torch.bmm(y, y), y)
        return y.reshape(shape)
    top = int(torch.nan_to_num(s, nan=0.0).max())  # the host decides: free on the CPU
    if top == max_squarings:  # maybe out of range: count the matrices that are
        over = int((torch.nan_to_num(norm, nan=0.0) > EXPM_THETA * 2.0**max_squarings).sum())
        if over:
            solver_stats().record_fallback("expm-range", over)
    for i in range(top):
        y = torch.where(s > i, torch.bmm(y, y), y) if s.numel() > 1 else torch.bmm(y, y)
    return y.reshape(shape)


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
            default); ``False`` reads ``s`` on the host and squares exactly that often (the
            CPU default); ``None`` = :func:`orthofx.syncs.sync_free_preferred` (CUDA, or
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
        y = _Expm.apply(A.to(cd), max_squarings, sync_free)
        solver_stats().record_nonfinite(y, event_dims=2)
        return y.to(A.dtype)
