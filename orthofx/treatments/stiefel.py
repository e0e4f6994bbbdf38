r"""The flat OW map on the Stiefel manifold: ``W_tall = f(c·S) Y₀`` with ``S = a Y₀ᵀ − Y₀ aᵀ``,
``f = exp`` or the Cayley map, dense (n'×n') or low-rank (2k×2k), polished; see
:class:`orthofx.treatments.weight.FlatOrthogonal` for the math and the accuracy contract.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orthofx.linalg.expm import EXPM_THETA, expm
from orthofx.linalg.polar import POLISH_COEFFS

__all__ = ["OW_RANGE", "OW_POLISH", "stiefel_map", "stiefel_map_flagged"]


#: largest ‖X‖₁ of the map's argument X (S, or M on the low-rank route): the exact range of
#: :func:`orthofx.linalg.expm.expm` with its default 14 squarings, θ·2^14 = 32768
OW_RANGE = EXPM_THETA * 2.0**14
#: polish steps X ← X(a I + b XᵀX + c (XᵀX)²) on the tall result (orthofx.linalg.polar's)
OW_POLISH = 2


def _saturation(x: Tensor) -> tuple[Tensor, Tensor]:
    """(c, saturated): c = min(1, OW_RANGE/‖x‖₁) (differentiable; 1 with zero gradient where
    ‖x‖₁ ≤ OW_RANGE, also at x = 0) and the 0-d flag c < 1."""
    nu = torch.linalg.matrix_norm(x, ord=1)
    over = nu > OW_RANGE
    c = torch.where(over, OW_RANGE / torch.where(over, nu, 1.0), 1.0)
    return c, over


def _polish(q: Tensor, steps: int = OW_POLISH) -> Tensor:
    """Re-orthonormalise the columns of a tall q (n'×k): ``steps`` times
    ``q ← q (1.875 I − 1.25 G + 0.375 G²)``, ``G = qᵀq``, the convergent polynomial of
    ``orthofx.linalg.polar`` (σ ↦ p(σ), p(1) = 1, p′(1) = p″(1) = 0: an error e in the singular
    values becomes ≈ 2.5e³). Identity on an exactly orthonormal q and on its tangent
    directions, so the map and its gradient are unchanged to rounding."""
    a, b, c = POLISH_COEFFS
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    for _ in range(steps):
        g = q.mT @ q
        q = q @ (a * eye + g @ (b * eye + c * g))
    return q


def _stiefel_map(a: Tensor, Y0: Tensor, method: str, lowrank: bool) -> Tensor:
    """f(c·S) Y₀, polished, with S = a Y₀ᵀ − Y₀ aᵀ, f = exp or the Cayley map, and
    c = min(1, OW_RANGE/‖X‖₁) for the argument X (S, or M = RᵀL) — see FlatOrthogonal."""
    return _stiefel_map_flagged(a, Y0, method, lowrank)[0]


def _stiefel_map_flagged(a: Tensor, Y0: Tensor, method: str, lowrank: bool) -> tuple[Tensor, Tensor]:
    """(:func:`_stiefel_map`, the 0-d flag "c < 1": the generator was scaled down)."""
    k = a.shape[-1]
    if lowrank:
        t = torch.linalg.matrix_norm(a.detach()).clamp_min(1.0)
        L = torch.cat([a / t, Y0], dim=-1)  # n' × 2k
        R = torch.cat([t * Y0, -a], dim=-1)  # n' × 2k,  S = L Rᵀ
        M = R.mT @ L  # 2k × 2k;  f(c L Rᵀ) L = L f(c M)
        c, over = _saturation(M)
        M = M * c
        if method == "expm":
            F = expm(M)[..., k:]
        else:
            I2 = torch.eye(2 * k, dtype=M.dtype, device=M.device)
            F = _solve(I2 - 0.5 * M, I2[:, k:] + 0.5 * M[..., k:])
        return _polish(L @ F), over
    S = a @ Y0.mT - Y0 @ a.mT
    c, over = _saturation(S)
    S = S * c
    if method == "expm":
        return _polish(expm(S) @ Y0), over
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return _polish(_solve(eye - 0.5 * S, Y0 + 0.5 * (S @ Y0))), over


def _solve(A: Tensor, B: Tensor) -> Tensor:
    """A⁻¹B without the host-synchronising info check: A = I − S/2 with S skew-symmetric (or
    similar to one, in the low-rank route) has eigenvalues 1 ∓ iλ/2, never singular."""
    return torch.linalg.solve_ex(A, B, check_errors=False)[0]


stiefel_map, stiefel_map_flagged = _stiefel_map, _stiefel_map_flagged
