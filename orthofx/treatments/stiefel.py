r"""The flat OW map on the Stiefel manifold: ``W_tall = f(c·S) Y₀`` with ``S = a Y₀ᵀ − Y₀ aᵀ``
(a square weight: ``Y₀ f(c·(B − Bᵀ))``, :func:`square_map`), ``f = exp`` or the Cayley map,
dense (n'×n') or low-rank (2k×2k), polished; see
:class:`orthofx.treatments.flat_ow.FlatOrthogonal` for the math and the accuracy contract.

Two paths compute the same function (they differ by rounding only):

* **host path** (a CPU tensor outside ``cuda_policy``/compile/export/trace: host reads are
  free, :func:`orthofx.linalg._checks.host_read_is_free`): the exponential follows a bound
  η ≥ ρ(X) on the spectral radius (the spectrum of S, and of M, is imaginary). Up to Taylor
  degree 4 (η ≤ 0.094 in float32) it is the Taylor polynomial — on the dense routes
  :func:`orthofx.linalg.skew_expm_apply.expm_skew_apply_host` (``Y₀ + N·Y₀`` or ``Y₀ + Y₀·N``,
  one fused ``addmm``, a closed-form backward: 4 products per forward + backward at degree 2
  and 7 at degree 4 for a square weight); beyond it the diagonal Padé approximant of
  :mod:`orthofx.linalg.skew_pade` (one LU; on the low-rank route only the k needed columns),
  with a tighter bound (:func:`~orthofx.linalg.skew_expm.refine_rho_bound`) where the first
  would cost a squaring. Derivatives are closed-form or autograd through those products. The
  saturation ``c`` is skipped (exactly 1) when ‖X‖₁ ≤ OW_RANGE; the polish runs only after
  squarings (exp) or for ‖X‖₁ > 2 (Cayley; on the square route only past the rounding scale
  of its solve, ``SQUARE_CAYLEY_FLOOR``), and then only until ``‖QᵀQ − I‖_F ≤ 4·u·√k``
  (u the unit roundoff: 2⁻²⁴ float32, 2⁻⁵³ float64), at most ``OW_MAX_POLISH`` steps, one
  when the first check already finds the error small (benchmarks/results/ow_shapes_cpu.md);
* **sync-free path** (CUDA, ``cuda_policy``, tracing): nothing is read on the host — the
  exponential's fixed degree and masked squarings with its block-exponential backward,
  ``c`` always applied, ``OW_POLISH`` polish steps always.

Both build the small matrices from their structure: ``S = P − Pᵀ`` with ``P = a Y₀ᵀ`` (one
n'²k product; ``P = B`` for a square weight) and ``M = [[Y₀ᵀa, t·Y₀ᵀY₀], [−aᵀa/t, −aᵀY₀]]``
(three n'k² products, one of them without gradient) with ``t = max(‖a‖_F, eps)`` (detached),
which keeps ‖M‖ of the order of ‖S‖ (so a small generator gets a small degree) — the function
does not depend on t.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from orthofx.linalg._checks import host_read_is_free
from orthofx.linalg.expm import (
    _NORMAL_THETAS, EXPM_THETA, _taylor, expm, expm_host, expm_plan, norm1, table_dtype, taylor_matmuls,
)
from orthofx.linalg.polar import POLISH_COEFFS
from orthofx.linalg.skew_expm import antisym, expm_skew_host, identity_plus_apply, refine_rho_bound
from orthofx.linalg.skew_expm_apply import expm_skew_apply_host
from orthofx.linalg.skew_pade import pade_columns, pade_plan
from orthofx.linalg.stats import solver_stats

__all__ = ["OW_RANGE", "OW_POLISH", "OW_MAX_POLISH", "choose_lowrank", "route_cost", "stiefel_map",
           "stiefel_map_flagged", "square_map", "square_map_flagged"]


#: largest ‖X‖₁ of the map's argument X (S, or M on the low-rank route): the exact range of
#: :func:`orthofx.linalg.expm.expm` with its default 14 squarings, θ·2^14 = 32768
OW_RANGE = EXPM_THETA * 2.0**14
#: polish steps X ← X(a I + b XᵀX + c (XᵀX)²) on the tall result, sync-free path (always)
OW_POLISH = 2
#: most polish steps on the host path (each one checked first; cubic convergence: an error
#: of 1e-2 is at the float32 floor after two)
OW_MAX_POLISH = 3
_MAX_SQUARINGS = 14
#: Taylor degree of the flop model below: 4 (‖X‖₁ ≤ 0.09 in float32), where training keeps OW
_MODEL_DEGREE = 4


def route_cost(k: int, n_big: int, method: str, lowrank: bool) -> float:
    """Multiply-adds of one forward + backward of the map for a k×n' tall form (the flop model
    of :func:`choose_lowrank`; a small generator, degree-4 Taylor = p = 2 products, each
    costing 3 with its backward):

    * dense exp: ``(3p − 1)·n'³ + 4n'²k`` (P = aY₀ᵀ, exp(S)·Y₀ and their gradients; S²'s
      backward is one product, :func:`orthofx.linalg.skew_expm.skew_square`);
    * low-rank exp: ``3p·(2k)³ + 10n'k²`` (M's three blocks, L·F and their gradients);
    * dense Cayley: ``n'³/3 + 7n'²k`` (LU, two solves with k columns, S, S·Y₀, gradients);
    * low-rank Cayley: ``(2k)³/3 + 16k³ + 10n'k²``.
    """
    k, n = float(k), float(n_big)
    if method == "expm":
        p = 3 * taylor_matmuls(_MODEL_DEGREE)
        return p * (2 * k) ** 3 + 10 * n * k * k if lowrank else (p - 1) * n**3 + 4 * n * n * k
    return (2 * k) ** 3 / 3 + 16 * k**3 + 10 * n * k * k if lowrank else n**3 / 3 + 7 * n * n * k


def choose_lowrank(k: int, n_big: int, method: str) -> bool:
    """True when the low-rank route (2k×2k) is cheaper than the dense one (n'×n') by
    :func:`route_cost`: for exp when n' > ≈2.17k, for Cayley when n' > ≈2.3k."""
    return route_cost(k, n_big, method, True) < route_cost(k, n_big, method, False)


def _host_path(x: Tensor) -> bool:
    return host_read_is_free(x)


def _saturation(x: Tensor, host: bool) -> tuple[Tensor, Tensor]:
    """(c·x, flag c < 1) with c = min(1, OW_RANGE/‖x‖₁) (differentiable; 1 with zero gradient
    where ‖x‖₁ ≤ OW_RANGE, also at x = 0). On the host path an in-range x is returned as is."""
    if host:  # ‖x‖₁ ≤ √n·‖x‖_F: the cheap Frobenius norm settles the usual case
        xd = x.detach()
        fro = torch.linalg.matrix_norm(xd) * math.sqrt(x.shape[-1])
        over = fro > OW_RANGE
        if bool(over.any()):
            over = norm1(xd) > OW_RANGE
        if not bool(over.any()):
            return x, over
    nu = torch.linalg.matrix_norm(x, ord=1)
    over = nu > OW_RANGE
    c = torch.where(over, OW_RANGE / torch.where(over, nu, 1.0), 1.0)
    return x * c[..., None, None], over


def _polish_step(q: Tensor, g: Tensor) -> Tensor:
    a, b, c = POLISH_COEFFS
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return q @ (a * eye + g @ (b * eye + c * g))


def _polish(q: Tensor, steps: int = OW_POLISH) -> Tensor:
    """Re-orthonormalise the columns of a tall q (n'×k): ``steps`` times
    ``q ← q (1.875 I − 1.25 G + 0.375 G²)``, ``G = qᵀq``, the convergent polynomial of
    ``orthofx.linalg.polar`` (σ ↦ p(σ), p(1) = 1, p′(1) = p″(1) = 0: an error e in the singular
    values becomes ≈ 2.5e³). Identity on an exactly orthonormal q and on its tangent
    directions, so the map and its gradient are unchanged to rounding. Cost per step:
    2n'k² + k³ multiply-adds (forward)."""
    for _ in range(steps):
        q = _polish_step(q, q.mT @ q)
    return q


#: probe vectors of :func:`_orth_error_estimate`
_PROBES = 4


@functools.lru_cache(maxsize=32)
def _probe(k: int, dtype: torch.dtype, device: str) -> Tensor:
    """A fixed k×_PROBES standard normal matrix (seeded: the same probes every call)."""
    g = torch.Generator().manual_seed(0x0F1A7)
    return torch.randn(k, _PROBES, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _orth_error_estimate(q: Tensor) -> float:
    """≈ ‖qᵀq − I‖_F from ``_PROBES`` Gaussian probes v (E‖(qᵀq − I)v‖² = ‖qᵀq − I‖_F²): two
    thin products, O(n'k) instead of the Gram matrix's n'k² — a host-path decision whether a
    full check is worth making (read on the host; unbatched q)."""
    with torch.no_grad():
        qd = q.detach()
        V = _probe(qd.shape[-1], qd.dtype, str(qd.device))
        return float(torch.linalg.vector_norm(qd.mT @ (qd @ V) - V)) / math.sqrt(_PROBES)


def _polish_checked(q: Tensor, tol: float | None = None) -> Tensor:
    """Host path: polish steps while ``‖qᵀq − I‖_F > tol`` (default ``4·u·√k``; read on the host), at most
    OW_MAX_POLISH; the Gram matrix of the check is the step's G. A step maps an error e to
    ≈ 2.5e³, so after a step from ``e ≤ (eps/2.5)^{1/3}`` (3.6e-3 in float32, 4.4e-6 in
    float64) the result is at the dtype's floor and no second check is made: in float32 from
    n' ≈ 64 on the floor of ``‖qᵀq − I‖_F`` itself is above 4u√k (measured: 4e-6 at 256²), so
    the check alone would spend all OW_MAX_POLISH steps (three Gram + update products each,
    and their backward) for no gain."""
    k = q.shape[-1]
    eps = torch.finfo(q.dtype).eps
    tol = 4.0 * eps / 2 * math.sqrt(k) if tol is None else tol
    one_step = (eps / 2.5) ** (1.0 / 3.0)
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    for _ in range(OW_MAX_POLISH):
        g = q.mT @ q
        err = float(torch.linalg.matrix_norm(g.detach() - eye).max())
        if not err > tol:  # NaN: keep going
            break
        q = _polish_step(q, g)
        if err <= one_step:
            break
    return q


def _expm(x: Tensor, host: bool) -> tuple[Tensor, int]:
    """(exp(x), squarings); the squarings are not known on the sync-free path (−1)."""
    if host:
        y, s = expm_host(x, _MAX_SQUARINGS, normal_spectrum=True)
        if not bool(torch.isfinite(y.detach().sum())):  # one n'² reduction; count only when bad
            solver_stats().record_nonfinite(y, event_dims=2)
        return y, s
    return expm(x, max_squarings=_MAX_SQUARINGS, sync_free=True), -1


def _lowrank_expm_host(M: Tensor, k: int) -> tuple[Tensor, int]:
    """(``exp(M)[:, k:]``, squarings) for the low-rank route's 2k×2k M on the host path: the
    Taylor polynomial of :func:`orthofx.linalg.expm.expm_host` up to degree 4, beyond it the
    diagonal Padé approximant (:func:`orthofx.linalg.skew_pade.pade_columns`: one LU and a solve
    for the k needed columns), both planned from the same bound η ≥ ρ(M)."""
    Md = M.detach()
    n1 = float(norm1(Md))
    if not math.isfinite(n1) or n1 <= _NORMAL_THETAS[table_dtype(M.dtype)][0][1]:
        E, s = _expm(M, True)
        return E[..., k:], s
    M2 = M @ M
    M2d = M2.detach()
    eta = min(n1, float(torch.linalg.matrix_norm(Md)),
              math.sqrt(min(float(torch.linalg.matrix_norm(M2d)), float(norm1(M2d)))))
    m, s = expm_plan(eta, M.dtype, _MAX_SQUARINGS, imaginary=True, min_degree=2)
    if s == 0 and m <= 4:
        return _taylor(M, m, M2)[..., k:], 0
    mp, sp = pade_plan(eta, M.dtype, _MAX_SQUARINGS)
    if sp:  # ‖M^{2j}‖^{1/(2j)} ≥ ρ(M) for any matrix (Gelfand): tighter, and may save squarings
        mp, sp = pade_plan(refine_rho_bound(M2d, eta), M.dtype, _MAX_SQUARINGS)
    F = pade_columns(M, M2, k, mp, sp)
    if not bool(torch.isfinite(F.detach().sum())):
        solver_stats().record_nonfinite(F, event_dims=2)
    return F, sp


def _stiefel_map(a: Tensor, Y0: Tensor, method: str, lowrank: bool) -> Tensor:
    """f(c·S) Y₀, polished, with S = a Y₀ᵀ − Y₀ aᵀ, f = exp or the Cayley map, and
    c = min(1, OW_RANGE/‖X‖₁) for the argument X (S, or M = RᵀL) — see FlatOrthogonal."""
    return _stiefel_map_flagged(a, Y0, method, lowrank)[0]


def _stiefel_map_flagged(a: Tensor, Y0: Tensor, method: str, lowrank: bool) -> tuple[Tensor, Tensor]:
    """(:func:`_stiefel_map`, the 0-d flag "c < 1": the generator was scaled down).

    a, Y0: float32/float64 (n'×k) tall forms. Cost (forward, multiply-adds, small generator):
    dense ``n'²k`` (S) + ``p·n'³`` (p Taylor products, or an n'³/3 LU) + ``n'²k``; low-rank
    ``3n'k²`` (M) + ``8p·k³`` + ``2n'k²``; backward about twice that (host path)."""
    k = a.shape[-1]
    host = _host_path(a)
    if lowrank:
        eps = torch.finfo(a.dtype).eps
        t = torch.linalg.matrix_norm(a.detach()).clamp_min(eps)[..., None, None]
        P = Y0.mT @ a  # k × k
        with torch.no_grad():
            G0 = Y0.mT @ Y0  # = I for an orthonormal base; kept for exactness
        M = torch.cat([torch.cat([P, t * G0], dim=-1), torch.cat([-(a.mT @ a) / t, -P.mT], dim=-1)], dim=-2)
        M, over = _saturation(M, host)  # f(c L Rᵀ) L = L f(c M),  L = [a/t, Y₀]
        if method == "expm" and host and M.dim() == 2:
            F, s = _lowrank_expm_host(M, k)
            polish = s != 0
        elif method == "expm":
            E, s = _expm(M, host)
            F = E[..., k:]
            polish = s != 0
        else:
            I2 = torch.eye(2 * k, dtype=M.dtype, device=M.device)
            F = _solve(I2 - 0.5 * M, I2[:, k:] + 0.5 * M[..., k:])
            polish = _needs_polish_cayley(M, host)
        Q = (a / t) @ F[..., :k, :] + Y0 @ F[..., k:, :]
    else:
        P = a @ Y0.mT
        if method == "expm" and host:
            Q, s, over = _dense_expm_host(P, Y0)
            polish = s != 0
        elif method == "expm":
            S, over = _saturation(antisym(P), host)
            Q = expm(S, max_squarings=_MAX_SQUARINGS, sync_free=True) @ Y0
            polish = True
        else:
            S, over = _saturation(antisym(P), host)
            eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
            Q = _solve(eye - 0.5 * S, Y0 + 0.5 * (S @ Y0))
            polish = _needs_polish_cayley(S, host)
    return _finish(Q, host, polish), over


def _finish(Q: Tensor, host: bool, polish: bool) -> Tensor:
    """The polish of the map's result: always (``OW_POLISH`` steps) on the sync-free path,
    checked steps on the host path where ``polish`` (squarings, or a large Cayley argument)."""
    if not host:
        return _polish(Q)
    return _polish_checked(Q) if polish else Q


def _square_map_flagged(B: Tensor, Y0: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """(``W = Y₀·f(c·S)``, polished, with ``S = B − Bᵀ`` for the square generator ``B`` (n×n) used
    in place; the 0-d flag "c < 1") — the square layout of
    :class:`~orthofx.treatments.flat_ow.FlatOrthogonal`.

    ``Y₀ f(B − Bᵀ) = f(Y₀(B − Bᵀ)Y₀ᵀ)Y₀`` is the tall layout's map at ``a = Y₀B``, without the
    products that form ``aY₀ᵀ`` (forward) and pull its gradient back (backward). Cost, forward
    + backward: exp ``3p + 1`` products at Taylor degree 2 (p = 1) and 4 (p = 2) — 4 and 7 —
    against the tall layout's 6 and 9; Cayley ``Y₀(2(I − S/2)⁻¹ − I)``: one LU, two solves
    with n columns and one product (the gradient on ``I − S/2``), against torch's Cayley map
    (one LU, two solves, three products)."""
    host = _host_path(B)
    if method == "expm" and host:
        Q, s, over = _dense_expm_host(B, Y0, right=True)
        polish = s != 0
    elif method == "expm":
        S, over = _saturation(antisym(B), host)
        Q = Y0 @ expm(S, max_squarings=_MAX_SQUARINGS, sync_free=True)
        polish = True
    else:
        S, over = _saturation(antisym(B), host)
        Q = _cayley_apply(S, Y0, right=True)
        polish = _needs_polish_cayley(S, host)
        if host and polish:
            u = torch.finfo(Q.dtype).eps / 2
            tol = max(4.0 * u * math.sqrt(Q.shape[-1]), SQUARE_CAYLEY_FLOOR * u * Q.shape[-2])
            return (_polish_checked(Q, tol) if _orth_error_estimate(Q) > 0.75 * tol else Q), over
    return _finish(Q, host, polish), over


def _cayley_apply(S: Tensor, Y0: Tensor, right: bool) -> Tensor:
    """``C(S)·Y₀`` (left) or ``Y₀·C(S)`` (right) for the Cayley map ``C(S) = (I − S/2)⁻¹(I + S/2)
    = 2(I − S/2)⁻¹ − I``: one LU and one solve with ``Y₀``'s columns (rows), no product with
    ``I + S/2``. The factor 2 doubles the solve's rounding error against
    ``(I − S/2)⁻¹((I + S/2)Y₀)`` (measured in float32: ‖QᵀQ − I‖_F ≈ 1.2e-6 at n = 12, 1.1e-5
    at 256, against 0.6e-6 and 5.5e-6; both O(u·‖Y₀‖_F), backward stable); so it is used where
    it saves n³ products, the square layout, and not on the tall dense route."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return 2.0 * _solve(eye - 0.5 * S, Y0, left=not right) - Y0


def _dense_expm_host(P: Tensor, Y0: Tensor, right: bool = False) -> tuple[Tensor, int, Tensor]:
    """(exp(c·S)·Y₀, or Y₀·exp(c·S) when ``right``; squarings; flag c < 1) with S = P − Pᵀ on
    the host path: in range (c = 1, checked without gradient)
    :func:`orthofx.linalg.skew_expm_apply.expm_skew_apply_host` (closed-form backward at degree
    2/4), else the saturated S through :func:`orthofx.linalg.skew_expm.expm_skew_host`."""
    with torch.no_grad():
        Sd = P - P.mT
        S2 = Sd @ Sd if Sd.dim() == 2 else None
    # ‖S‖₁ ≤ √n‖S‖_F ≤ OW_RANGE: in range, c = 1; ‖S‖_F² = −tr(S²) (S skew: SᵀS = −S²), so
    # the check reads one sum of n numbers (NaN fails it: the saturated route below counts it)
    if S2 is not None and math.sqrt(max(-float(S2.diagonal().sum()), 0.0) * Sd.shape[-1]) <= OW_RANGE:
        Q, s = expm_skew_apply_host(P, Y0, _MAX_SQUARINGS, S=Sd, S2=S2, side="right" if right else "left")
        return Q, s, torch.zeros((), dtype=torch.bool, device=P.device)
    S, over = _saturation(antisym(P), True)
    N, s = expm_skew_host(S, _MAX_SQUARINGS)  # exp(S) − I, skew-aware derivative
    return identity_plus_apply(Y0, N, right), s, over


#: the square layout's Cayley result ``Y₀·C(S) = 2Y₀(I − S/2)⁻¹ − Y₀`` is polished (host path,
#: ‖S‖₁ > 2) only where ``‖QᵀQ − I‖_F > max(4u√k, SQUARE_CAYLEY_FLOOR·u·n)`` (a probe estimate,
#: :func:`_orth_error_estimate`, decides whether the full check is made): the scale n·u of an
#: n×n LU solve's rounding, which a polish step cannot lower. Measured in float32: 0.5–0.7·u·n
#: for ‖S‖₂ from 0.3 to 10 (n = 256, 512), at most 3.5·u·n at ‖S‖₂ = 30 and 1.4·u·n at 1000;
#: torch's own Cayley map has no polish (its three-term form reaches 29·u·n at 512², ‖S‖₂ = 1000)
SQUARE_CAYLEY_FLOOR = 8.0


def _needs_polish_cayley(x: Tensor, host: bool) -> bool:
    """Host path: polish the Cayley result only for ‖X‖₁ > 2 (cond(I − X/2) grows with ‖X‖)."""
    return not host or bool((norm1(x.detach()) > EXPM_THETA).any())


def _solve(A: Tensor, B: Tensor, left: bool = True) -> Tensor:
    """A⁻¹B (``left``) or BA⁻¹ without the host-synchronising info check: A = I − S/2 with S
    skew-symmetric (or similar to one, in the low-rank route) has eigenvalues 1 ∓ iλ/2, never
    singular."""
    return torch.linalg.solve_ex(A, B, left=left, check_errors=False)[0]


def square_map(B: Tensor, Y0: Tensor, method: str) -> Tensor:
    """``Y₀·f(c·(B − Bᵀ))``, polished: the square layout's map (:func:`_square_map_flagged`)."""
    return _square_map_flagged(B, Y0, method)[0]


stiefel_map, stiefel_map_flagged = _stiefel_map, _stiefel_map_flagged
square_map_flagged = _square_map_flagged
