"""Polar factor ``polar(G) = U Vᵀ`` (thin SVD ``G = U S Vᵀ``): the nearest orthogonal direction.

Methods (all run under ``torch.no_grad``: polar() is meant for gradients and is **not
differentiable**; tall inputs are transposed to wide and back):

* ``"svd"``  exact ``U Vᵀ`` of ``torch.linalg.svd(G, full_matrices=False)``, computed in float32
  (float64 stays float64). Rank-deficient ``G``: by default (``deficient=None`` or ``"full"``)
  every singular value, zeros included, becomes 1, as in the authors' code, so the result is
  ``U Vᵀ`` of the thin SVD, whose null-space columns are whatever the SVD returned
  (orthonormal, but not unique). ``deficient="partial"`` keeps only ``σ_i > max(m, n)·u·σ_max``
  (``u`` the unit roundoff ``torch.finfo(d).eps`` of the dtype ``d`` the SVD ran in: float32,
  or float64 for float64 input and for the float64 recovery path) and returns ``U_r V_rᵀ``.
* ``"eigh"`` ``(G Gᵀ)^{-1/2} G`` on the small side (wide G), float64 eigh of the Gram matrix.
  Eigenvalues ``≤ λ_max·max(m, n)·eps(float64)`` (i.e. ``σ ≲ 1.5e-7·σ_max·√max(m,n)``) are
  treated as zero, so a rank-deficient ``G`` gives the partial isometry ``U_r V_rᵀ`` (zero
  singular values stay 0, unlike "svd").
* ``"ns"``   Muon's quintic Newton–Schulz: ``X ← G/‖G‖_F``, then ``steps`` (default 5) times
  ``X ← aX + (bA + cA²)X``, ``A = X Xᵀ``, (a, b, c) = (3.4445, −4.7750, 2.0315). It does **not**
  converge to ``U Vᵀ``: singular values end in about [0.7, 1.2]; relative error ≈ 0.15–0.25.
  ``polish`` (default 0) convergent steps may be appended.
* ``"polar_express"`` ``X ← G/(1.02‖G‖_F)``, the 5 Polar Express steps (``steps`` > 5 repeats
  the last coefficients, fewer uses the first ones), then ``polish`` (default 3) convergent
  steps ``X ← 1.875X − 1.25 X XᵀX + 0.375 (X Xᵀ)² X`` (p(1)=1, p′(1)=p″(1)=0: cubic
  convergence). The polish steps run in float32 (float64 for float64 input).
* ``"auto"`` picks by device, with the same meaning everywhere — the polar factor of a
  full-rank ``G``, and the partial isometry ``U_r V_rᵀ`` (tiny singular values *not* lifted to
  1) of a numerically rank-deficient one:

  - **CUDA: ``"polar_express"`` with 5 polish steps** (no host sync). Accuracy (float32,
    shapes 64×27 … 512×4608 with log-spaced spectra, tests/test_linalg_polar.py): relative
    distance to ``U Vᵀ`` ≤ 1e-5 when ``σ_min ≥ 1.5e-4·‖G‖_F``; singular values below
    ~2e-5·‖G‖_F are left below 1.
  - **CPU: ``"eigh"``** (float64 Gram eigh, relative error ~2.5e-8).
  - other devices: ``"svd"``.

The iterations run in ``compute_dtype``: None = float32 (float64 for float64 input);
``torch.bfloat16`` is accepted (as in Muon) but its rounding perturbs the singular *vectors*,
which the float32 polish steps cannot undo. An ill-conditioned G (σ_min/σ_max below ~1e-3)
needs more polish steps: each step multiplies a tiny singular value by only 1.875.

**Rank-deficient G** (``deficient``): ``"partial"`` = the partial isometry ``U_r V_rᵀ`` (null
directions map to 0), ``"full"`` = ``U Vᵀ`` of the full thin SVD (null directions lifted to 1
along the SVD's own, non-unique basis), ``None`` = each method's own behaviour (above). Only
the SVD returns a null-space basis: ``"full"`` runs ``"svd"`` for ``method="auto"`` (a host
synchronisation per call on CUDA, and a batched SVD's cost) and raises ConfigError for
``"eigh"``, ``"ns"`` and ``"polar_express"``, which are partial by construction (their odd
polynomials / Gram pseudo-inverse keep an exact zero singular value at 0).

Timings per method and device (and why "auto" picks what it picks): benchmarks/results/timings.md.

**Zero input gives zero output**, per batch element, without a host sync. Output dtype = input.

**Scale safety.** Every method first divides each matrix by its largest absolute entry,
max|G|, taken in G's own dtype (exact; a max never under- or overflows, unlike a sum of
squares), and the zero mask is ``max|G| == 0``. The Frobenius norms and Gram matrices are then
formed from entries in [-1, 1], so any finite nonzero G — float32 or bfloat16 gradients from
the smallest subnormal to ~3.4e38, float64 over its whole range — gives the same U Vᵀ as G
itself (checked over scales 1e-30…1e30 against a float64 SVD in tests/test_gradient_scale.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orthofx.errors import ConfigError, SolverError
from orthofx.linalg._checks import check_finite, check_matrix, no_autocast
from orthofx.linalg._solver import robust_eigh
from orthofx.linalg.stats import maybe_inject_failure, solver_stats
from orthofx.syncs import sync_free_preferred
from orthofx.vocab import POLAR_METHODS

__all__ = ["polar", "check_deficient"]

DEFICIENT = ("partial", "full")

NS_COEFFS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLISH_COEFFS = (1.875, -1.25, 0.375)
PE_SCALE = 1.02
DEFAULT_POLISH = {"ns": 0, "polar_express": 3}
AUTO_POLISH = 5


def check_deficient(method: str, deficient: str | None) -> None:
    """Raise ConfigError unless ``method`` can honour ``deficient`` (None: always)."""
    if deficient is None:
        return
    if deficient not in DEFICIENT:
        raise ConfigError(f"deficient={deficient!r}; use one of {DEFICIENT} (or None: the method's own)")
    if deficient == "full" and method not in ("auto", "svd"):
        raise ConfigError(
            f"deficient='full' needs the SVD's null-space basis, which method={method!r} does not compute "
            "(its result is a partial isometry); use method='svd' or 'auto' (which then runs the SVD: "
            "a host synchronisation per call on CUDA)"
        )


def resolve_method(method: str, device: torch.device | str, deficient: str | None = None) -> str:
    """The method ``polar(..., method=method, deficient=deficient)`` runs on ``device``
    ("auto" resolved; ``deficient="full"`` resolves "auto" to "svd")."""
    if method not in POLAR_METHODS:
        raise ConfigError(f"unknown polar method {method!r}; choose one of {POLAR_METHODS}")
    check_deficient(method, deficient)
    if method != "auto":
        return method
    if deficient == "full":
        return "svd"
    if sync_free_preferred(device):
        return "polar_express"
    return "eigh" if torch.device(device).type == "cpu" else "svd"


def _normalise(x: Tensor, base: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x / max|x| in ``base``, mask max|x| == 0), per matrix of the batch.

    max|x| is exact in x's own dtype (no sum of squares: it never under- or overflows), so
    every finite nonzero x — subnormal or near the dtype's maximum — becomes a matrix with
    entries in [-1, 1] and one entry ±1, whose Frobenius norm lies in [1, √(mn)]. The polar
    factor is scale-invariant (U Vᵀ of cG is U Vᵀ of G for c > 0), so nothing else changes.
    NaN/Inf entries give a NaN max (or x/inf), hence a NaN result; they are never "zero"."""
    amax = x.abs().amax(dim=(-2, -1), keepdim=True)
    zero = amax == 0
    return x.to(base) / torch.where(zero, 1.0, amax).to(base), zero


def _svd_uvt(u: Tensor, s: Tensor, vh: Tensor, partial: bool) -> Tensor:
    """``U Vᵀ``, or with ``partial`` ``U_r V_rᵀ`` over ``σ_i > max(m, n)·eps(σ.dtype)·σ_max``."""
    if not partial:
        return u @ vh
    tol = s[..., :1] * (max(u.shape[-2], vh.shape[-1]) * torch.finfo(s.dtype).eps)
    return (u * (s > tol).to(u.dtype).unsqueeze(-2)) @ vh


def _svd_factor(x: Tensor, partial: bool = False) -> Tensor:
    """U Vᵀ of a wide x (float32/float64) with recovery: float64, then CPU. NaN elements -> NaN.
    ``partial``: U_r V_rᵀ (:func:`_svd_uvt`)."""
    stats = solver_stats()
    try:
        maybe_inject_failure("svd")
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return _svd_uvt(u, s, vh, partial)
    except torch.linalg.LinAlgError as exc:
        stats.record_failure()
        first = exc
    bad = ~torch.isfinite(x).flatten(-2).all(-1)
    clean = torch.where(bad[..., None, None], 0.0, x)
    attempts = [("float64", lambda: clean.double()), ("cpu", lambda: clean.double().cpu())]
    for name, make in attempts:
        try:
            maybe_inject_failure(f"svd fallback {name}")
            u, s, vh = torch.linalg.svd(make(), full_matrices=False)
        except torch.linalg.LinAlgError:
            stats.record_failure()
            continue
        stats.record_fallback(name)
        q = _svd_uvt(u, s, vh, partial).to(device=x.device, dtype=x.dtype)
        return torch.where(bad[..., None, None], torch.nan, q)
    raise SolverError(f"SVD failed for a batch of shape {tuple(x.shape)} after every recovery step: {first}")


def _eigh_factor(x: Tensor) -> Tensor:
    """(X Xᵀ)^{-1/2} X for wide x, pseudo-inverse on the numerically-zero spectrum."""
    x64 = x.to(torch.float64)
    gram = x64 @ x64.mT
    gram = (gram + gram.mT) * 0.5
    lam, w = robust_eigh(gram)
    tol = lam[..., -1:].clamp_min(0.0) * (max(x.shape[-2:]) * torch.finfo(torch.float64).eps)
    keep = lam > tol
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0).sqrt(), 0.0)
    return ((w * inv.unsqueeze(-2)) @ w.mT @ x64).to(x.dtype)


def _odd_poly_steps(x: Tensor, coeffs: list[tuple[float, float, float]]) -> Tensor:
    """``x ← a x + (b g + c g²) x`` with ``g = x xᵀ``: three fused GEMMs per step (baddbmm)."""
    if not coeffs:
        return x
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    for a, b, c in coeffs:
        g = torch.bmm(x, x.mT)
        p = torch.baddbmm(g, g, g, beta=b, alpha=c)
        x = torch.baddbmm(x, p, x, beta=a)
    return x.reshape(shape)


def polar(
    G: Tensor,
    *,
    method: str = "auto",
    steps: int | None = None,
    polish: int | None = None,
    compute_dtype: torch.dtype | None = None,
    validate: bool = True,
    track_nonfinite: bool = True,
    deficient: str | None = None,
) -> Tensor:
    """Polar factor ``U Vᵀ`` of a batch ``G`` (..., m, n) (module doc for the methods).

    Args:
        G: float tensor (..., m, n); any m, n. Not differentiable (runs under no_grad).
        method: "auto" | "svd" | "eigh" | "ns" | "polar_express".
        steps: iteration steps for "ns"/"polar_express" (default 5).
        polish: convergent polishing steps appended (default 0 for "ns", 3 for
            "polar_express"); ignored by "svd"/"eigh".
        compute_dtype: dtype of the "ns"/"polar_express" iteration; None = float32 (float64
            for float64 input); torch.bfloat16 is faster on GPUs but limits the accuracy.
        validate: raise InputError on NaN/Inf (one host sync). With ``validate=False`` a
            non-finite batch element gives a NaN output (counted in ``solver_stats().nonfinite``).
        track_nonfinite: count non-finite outputs in ``solver_stats()`` (a few small kernels;
            callers that sanitise their input, like NOG, turn it off).
        deficient: rank-deficient G: None (each method's own behaviour), ``"partial"``
            (``U_r V_rᵀ``; "svd" truncates at ``σ ≤ max(m, n)·eps·σ_max`` in its dtype) or
            ``"full"`` (null directions lifted to 1: "svd", or "auto" run as "svd"; other
            methods raise ConfigError). See the module doc.

    Returns:
        (..., m, n) in ``G``'s dtype; rows (m ≤ n) or columns (m > n) orthonormal for full-rank
        G (exactly for "svd"/"eigh", approximately for the iterations); zero where G is zero.
    """
    check_matrix(G, "polar input")
    resolved = resolve_method(method, G.device, deficient)
    if method == "auto" and resolved == "polar_express" and polish is None:
        polish = AUTO_POLISH
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ConfigError(f"steps must be an int >= 0, got {steps!r}")
    if polish is not None and (isinstance(polish, bool) or not isinstance(polish, int) or polish < 0):
        raise ConfigError(f"polish must be an int >= 0, got {polish!r}")
    if G.numel() == 0:
        return G.new_zeros(G.shape)
    if validate:
        check_finite(G, "polar input")
    with torch.no_grad(), no_autocast(G.device.type):
        tall = G.shape[-2] > G.shape[-1]
        x = G.mT if tall else G
        base = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, zero = _normalise(x, base)
        if resolved == "svd":
            q = _svd_factor(x, partial=deficient == "partial")
        elif resolved == "eigh":
            q = _eigh_factor(x)
        else:
            it_dtype = compute_dtype or base
            n_steps = 5 if steps is None else steps
            if resolved == "ns":
                coeffs = [NS_COEFFS] * n_steps
                scale = 1.0
            else:
                coeffs = [POLAR_EXPRESS_COEFFS[min(i, len(POLAR_EXPRESS_COEFFS) - 1)] for i in range(n_steps)]
                scale = PE_SCALE
            n_polish = DEFAULT_POLISH[resolved] if polish is None else polish
            norm = torch.linalg.matrix_norm(x)[..., None, None]  # in [1, √(mn)] (or NaN)
            xs = (x / (norm * scale)).to(it_dtype)
            xs = _odd_poly_steps(xs, coeffs)
            q = _odd_poly_steps(xs.to(base), [POLISH_COEFFS] * n_polish)
        q = torch.where(zero, 0.0, q).to(G.dtype)
        if track_nonfinite:
            solver_stats().record_nonfinite(q, event_dims=2)
        return q.mT if tall else q
