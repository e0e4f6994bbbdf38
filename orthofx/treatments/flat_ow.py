r"""OW on the *flattened* weight: :class:`FlatOrthogonal`, a ``torch.nn.utils.parametrize``
parametrization ``W_tall = f(S) Y₀`` (``f`` = exp or Cayley, the map of
:mod:`orthofx.treatments.stiefel`), with a free or a normalised generator.

Registered by :func:`orthofx.treatments.weight.register_orthogonal` (``ow_method`` ``"expm"``
/ ``"cayley"``); :class:`orthofx.treatments.soc.SOCOrthogonal` subclasses it.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import Tensor, nn

from orthofx.errors import ConfigError, TreatmentError
from orthofx.linalg._checks import host_read_is_free, no_autocast
from orthofx.treatments._common import check_weight, compute_dtype, flat_shape
from orthofx.treatments.stiefel import OW_RANGE, _stiefel_map_flagged, choose_lowrank, square_map_flagged
from orthofx.vocab import DEFAULT_OW_METHOD, OW_GENERATORS, OWGenerator, OWMethod

__all__ = ["FlatOrthogonal", "OW_GENERATOR_KINDS", "POWER_INIT_ITERS", "POWER_EVAL_ITERS", "MAP_IDS"]

#: the methods of :class:`FlatOrthogonal` (matrix maps of the flattened weight) and the code
#: of each in its ``map_id`` buffer (0: not recorded, state saved before 2026-12-07)
MAP_IDS: dict[str, int] = {"expm": 1, "cayley": 2}
_FLAT_METHODS = tuple(MAP_IDS)
#: the generator kinds of :class:`FlatOrthogonal` (``OrthoConfig.ow_generator``): vocab's one list
OW_GENERATOR_KINDS = OW_GENERATORS
#: power iterations at registration (from a random start) and in every eval forward (from the
#: carried vector, not written back); one per training forward
POWER_INIT_ITERS = 200
POWER_EVAL_ITERS = 100


def _no_autocast_if_on(device_type: str) -> contextlib.AbstractContextManager[None]:
    """``no_autocast(device_type)`` where autocast is on for that device, else a null context
    (entering and leaving ``torch.autocast`` costs ≈ 40 µs a call on the CPU, measured: 4% of a
    256² OW map's forward)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        on = True
    return no_autocast(device_type) if on else contextlib.nullcontext()


def _unit(v: Tensor, dim: int = -1) -> Tensor:
    """``v / ‖v‖`` along ``dim`` (a zero vector stays zero: the norm is clamped to the dtype's tiny)."""
    return v / torch.linalg.vector_norm(v, dim=dim, keepdim=True).clamp_min(torch.finfo(v.real.dtype).tiny)


def _power_step(v: Tensor, w: Tensor, dim: int = -1) -> Tensor:
    """One power-iteration update: ``w/‖w‖`` along ``dim``, and the old unit ``v`` where
    ``w = 0`` (so an iterate never collapses to zero; decided on the device, no host sync)."""
    n = torch.linalg.vector_norm(w, dim=dim, keepdim=True)
    return torch.where(n > 0, w / n.clamp_min(torch.finfo(n.dtype).tiny), v)


# --------------------------------------------------------------------------- OW
class FlatOrthogonal(nn.Module):
    r"""Orthogonal weight (OW) on the flattened weight, a ``torch.nn.utils.parametrize``
    parametrization.

    Let ``W ∈ R^{out×n}`` be the flattened weight, ``k = min(out, n)``, ``n' = max(out, n)``,
    and write matrices in their *tall* form (``n' × k``: ``W`` itself when ``out ≥ n``, else
    ``Wᵀ``). With the trainable parameter ``A`` (tall form ``a ∈ R^{n'×k}``; stored with the
    weight's own shape, zero at registration) and the buffer ``base = Y₀ ∈ R^{n'×k}`` with
    orthonormal columns,

        S = a Y₀ᵀ − Y₀ aᵀ          (n'×n', skew-symmetric)
        W_tall = f(S) Y₀,           f = exp ("expm")  or  f(S) = (I − S/2)⁻¹(I + S/2) ("cayley").

    ``f(S)`` is orthogonal, so ``W_tall`` has orthonormal columns: **for a wide weight
    (out ≤ n) the rows of W are orthonormal (W Wᵀ = I_out); for a tall weight (out > n) the
    columns are (Wᵀ W = I_n)**. The generators ``a Y₀ᵀ − Y₀ aᵀ`` span the whole tangent space
    of the Stiefel manifold at ``Y₀``, so every nearby orthonormal ``W`` is reachable.

    **Square weights** (out = n) use their generator in place: ``A``'s square form ``B`` gives

        W = Y₀ f(B − Bᵀ)            (the paper's ``exp(A − Aᵀ)``, rotated by the base),

    which is the map above at ``a = Y₀B`` (``Y₀ f(B − Bᵀ) = f(Y₀(B − Bᵀ)Y₀ᵀ)Y₀``) without the
    products that form ``aY₀ᵀ`` and pull its gradient back (:func:`~orthofx.treatments.stiefel.
    square_map`). SGD, momentum, weight decay, NOG and OLR follow the same ``W`` trajectory in
    either coordinate (they commute with ``a = Y₀B``, an orthogonal change of coordinates);
    elementwise optimizers (Adam) do not. :meth:`tall_generator` / :meth:`generator_from_tall`
    convert. State saved before this layout is converted on load (``B = Y₀ᵀa``, with a warning:
    optimizer state kept for ``A`` is not converted), and state saved with the other map is
    refused: :mod:`orthofx.treatments.ow_state`.

    ``base`` is set by :meth:`right_inverse`, which ``parametrize`` calls at registration (and
    on ``module.weight = value``): ``Y₀`` = the exact polar factor ``U Vᵀ`` of the given weight
    (float64 thin SVD), i.e. the **nearest orthogonal matrix** to it, and ``A = 0``. The
    parametrized weight right after registration is therefore the nearest orthogonal matrix
    to the original weight (its Frobenius norm becomes √k).

    Routes and accuracy (details: docs/internals.md, "Flat OW"): ``S`` has rank ≤ 2k, so a
    wide or tall weight far from square takes the **low-rank route**, ``W_tall = L·f(M)[:, k:]``
    with the 2k×2k ``M = RᵀL`` (``S = LRᵀ``, ``L = [a/t, Y₀]``), chosen by
    :func:`orthofx.treatments.stiefel.choose_lowrank`. exp is computed to the unit roundoff (a
    Taylor polynomial up to degree 4, a diagonal Padé approximant beyond); the argument is
    scaled into exp's range ``‖X‖₁ ≤ OW_RANGE`` (beyond it W stays orthogonal but no longer
    follows A; a RuntimeWarning once on the CPU), and the result is re-orthonormalised by
    polish steps after squarings (always ``OW_POLISH`` on CUDA). Measured: ``‖W Wᵀ − I‖_F ≤
    1e-6`` (float32, shapes 8×8 … 64×27) for every ‖A‖_F from 1e-3 to 1e8. The Cayley map
    costs one LU whatever the norm: at or below torch's fastest orthogonal map on every shape
    and norm measured; exp is that only early in training on square weights
    (benchmarks/results/ow_shapes_cpu.md). The map runs once per forward, no host sync on CUDA.

    dtype: float16/bfloat16 weights are computed in float32; float32/float64 in their own
    dtype. The output has the weight's dtype. No ε is involved.

    **Normalised generator** (``generator="normalized"``, the authors' SOC normalisation on the
    flat map): ``W_tall = f(ρ·S/σ̂) Y₀`` with ``σ̂ ≈ ‖S‖₂`` from a power iteration carried in
    the buffer ``_v`` (one step per training forward, ``POWER_EVAL_ITERS`` from the carried
    vector in eval, not written back; ``POWER_INIT_ITERS`` at registration) and ``ρ = radius``
    (0.7): W does not change when A is scaled, and an optimizer step never turns W further
    than ρ radians from ``Y₀``. ``A`` starts random, ``a ~ N(0, 1/n')``; ``a = 0`` gives
    ``W = Y₀``. σ̂ in the compute dtype, ``_v`` in the weight's.

    Args:
        shape: shape of the weight (out, in, *kernel).
        method: ``"cayley"`` (default; ``torch.linalg.solve_ex`` without the info check:
            one LU and solve at any ‖S‖) or ``"expm"`` (the paper;
            :func:`orthofx.linalg.expm.expm`, scaling and squaring decided on the device, so
            no host sync on CUDA; its cost grows with ‖S‖).
        lowrank: force (``True``) or forbid (``False``) the low-rank route; ``None`` = auto.
        generator: ``"free"`` (default: ``a`` unconstrained, zero at registration; exactly the
            map above without scaling) or ``"normalized"``.
        radius: ρ of the normalised generator (> 0; unused for ``"free"``).
    """

    base: Tensor
    #: the square layout (set per instance; False for an instance pickled before it existed)
    square_direct = False

    def __init__(
        self,
        shape: torch.Size | tuple[int, ...],
        method: OWMethod | str = DEFAULT_OW_METHOD,
        lowrank: bool | None = None,
        generator: OWGenerator | str = "free",
        radius: float = 0.7,
    ) -> None:
        super().__init__()
        if method not in _FLAT_METHODS:
            raise ConfigError(
                f"FlatOrthogonal: method={method!r}; use one of {_FLAT_METHODS} "
                "('soc' is SOCOrthogonal, registered by register_orthogonal)"
            )
        if generator not in OW_GENERATOR_KINDS:
            raise ConfigError(f"FlatOrthogonal: generator={generator!r}; use one of {OW_GENERATOR_KINDS}")
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ConfigError(f"FlatOrthogonal: radius={radius!r}; a finite number > 0 is needed")
        self.generator = generator
        self.radius = float(radius)
        self.shape = torch.Size(shape)
        self.out, self.n = flat_shape(self.shape)
        self.k, self.n_big = min(self.out, self.n), max(self.out, self.n)
        self.wide = self.out < self.n
        self.method = method
        self.lowrank = choose_lowrank(self.k, self.n_big, method) if lowrank is None else bool(lowrank)
        self.square_direct = self.out == self.n
        self.register_buffer("base", torch.zeros(self.n_big, self.k))
        # which map made W from A, saved with the state (orthofx.treatments.ow_state): the same
        # generator gives another weight under the other map
        self.register_buffer("map_id", torch.tensor(MAP_IDS[str(method)], dtype=torch.uint8))
        if generator == "normalized":
            self.register_buffer("_v", torch.zeros(self.n_big))
        self._warned = False

    def extra_repr(self) -> str:
        gen = f"generator={self.generator!r}"
        if self.generator == "normalized":
            gen += f", radius={self.radius:g}"
        return (
            f"flat=({self.out}, {self.n}), method={self.method!r}, lowrank={self.lowrank}, {gen}, "
            f"orthonormal={'rows' if self.out <= self.n else 'columns'}"
        )

    # tall form <-> weight shape
    def _to_tall(self, X: Tensor) -> Tensor:
        X = X.reshape(self.out, self.n)
        return X.mT if self.wide else X

    def _from_tall(self, T: Tensor) -> Tensor:
        return (T.mT if self.wide else T).reshape(self.shape)

    # generator coordinates: the layout's own (B for a square weight) <-> the tall a = Y₀B
    def tall_generator(self, A: Tensor) -> Tensor:
        """The tall generator ``a`` (n'×k, ``S = aY₀ᵀ − Y₀aᵀ``) of ``A`` (or of a gradient on
        ``A``: the change of coordinates is linear and orthogonal): ``Y₀B`` for a square weight,
        ``A``'s tall form otherwise."""
        T = self._to_tall(A)
        return self.base.to(T.dtype) @ T if self.square_direct else T

    def generator_from_tall(self, a: Tensor) -> Tensor:
        """Inverse of :meth:`tall_generator`: ``A`` (weight-shaped) from a tall generator ``a``."""
        return self._from_tall(self.base.to(a.dtype).mT @ a if self.square_direct else a)

    def skew(self, A: Tensor) -> Tensor:
        """The skew-symmetric argument of the map in the layout's coordinates: ``B − Bᵀ``
        (square) or ``aY₀ᵀ − Y₀aᵀ`` — orthogonally similar to each other, so their norms agree."""
        a = self._to_tall(A)
        if self.square_direct:
            return a - a.mT
        Y0 = self.base.to(a.dtype)
        return a @ Y0.mT - Y0 @ a.mT

    def forward(self, A: Tensor) -> Tensor:
        cd = compute_dtype(A.dtype)
        with _no_autocast_if_on(A.device.type):  # matrix_exp/solve in ≥ float32, also under AMP
            a = self._to_tall(A).to(cd)
            Y0 = self.base.to(cd)
            if self.generator == "normalized":
                sig = self._sigma(a, Y0)
                a = a * torch.where(sig > 0, self.radius / sig.clamp_min(torch.finfo(cd).tiny), 0.0)
            if self.square_direct and not self.lowrank:
                Q, over = square_map_flagged(a, Y0, self.method)
            else:
                Q, over = _stiefel_map_flagged(Y0 @ a if self.square_direct else a, Y0, self.method, self.lowrank)
        if not getattr(self, "_warned", False) and host_read_is_free(over) and bool(over):
            self._warned = True  # once per parametrization; only where the read is free
            warnings.warn(
                f"OW {self.extra_repr()}: the generator is beyond the exponential's range "
                f"(‖X‖₁ > {OW_RANGE:g}); it is scaled down to that range, so W stays orthogonal "
                "but no longer follows A there. A lower lr, or bake() and re-register OW, "
                "keeps A small",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._from_tall(Q).to(A.dtype)

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """Set ``base`` to the polar factor of ``W`` (nearest orthogonal matrix) and return A = 0."""
        check_weight(W, f"a weight of shape {tuple(W.shape)}", "OW")
        if W.shape != self.shape:
            raise TreatmentError(
                f"OW: assigned a weight of shape {tuple(W.shape)} to a parametrization of shape "
                f"{tuple(self.shape)}"
            )
        if not torch.isfinite(W).all():
            raise TreatmentError("OW: the weight holds NaN/Inf; cannot take its polar factor")
        # The exact polar factor through a float64 thin SVD. orthofx.linalg.polar maps a zero
        # matrix to zero by contract, but the base must always have orthonormal columns; the
        # thin SVD gives orthonormal U, V even for a rank-deficient (or zero) weight.
        T = self._to_tall(W).to(torch.float64)
        U, _, Vh = torch.linalg.svd(T, full_matrices=False)
        self.base = (U @ Vh).to(device=W.device, dtype=W.dtype)
        if self.generator == "free":
            return torch.zeros_like(W)
        cd = compute_dtype(W.dtype)
        a = torch.randn(self.n_big, self.k, dtype=cd, device=W.device) / math.sqrt(self.n_big)
        v = _unit(torch.randn(self.n_big, dtype=cd, device=W.device))
        Y0 = self.base.to(cd)
        for _ in range(POWER_INIT_ITERS):
            v = _power_step(v, -self._skew_mv(a, Y0, self._skew_mv(a, Y0, v)), dim=-1)
        self._v = v.to(W.dtype)
        return self._from_tall(a).to(W.dtype)

    def _sigma(self, a: Tensor, Y0: Tensor) -> Tensor:
        """σ̂ = ‖S v‖₂ (differentiable in ``a``; ``v`` detached) after the power iteration(s)
        on ``SᵀS = −S²`` — one (buffer updated) in training, ``POWER_EVAL_ITERS`` (buffer kept)
        in eval. σ̂ = 0 (S = 0: a = 0, or a 1×1 weight) scales a by 0, so W = Y₀."""
        with torch.no_grad():
            ad, v = a.detach(), self._v.to(a.dtype)
            for _ in range(1 if self.training else POWER_EVAL_ITERS):
                v = _power_step(v, -self._skew_mv(ad, Y0, self._skew_mv(ad, Y0, v)), dim=-1)
            if self.training:
                self._v.copy_(v)
        return torch.linalg.vector_norm(self._skew_mv(a, Y0, v))

    def _skew_mv(self, a: Tensor, Y0: Tensor, v: Tensor) -> Tensor:
        """``S v`` for the layout's skew argument (:meth:`skew`), never formed: O(n'k)."""
        return a @ v - a.mT @ v if self.square_direct else _skew_mv(a, Y0, v)


def _skew_mv(a: Tensor, Y0: Tensor, v: Tensor) -> Tensor:
    """``S v`` with ``S = a Y₀ᵀ − Y₀ aᵀ`` (n'×n', never formed): ``a(Y₀ᵀv) − Y₀(aᵀv)``, O(n'k)."""
    return a @ (Y0.mT @ v) - Y0 @ (a.mT @ v)


def _migrate_square_state(*args: object, **kwargs: object) -> None:
    """The version-1 migration hook under its first home: modules pickled whole (``torch.save(model)``)
    between the square layout and :mod:`orthofx.treatments.ow_state` hold their hook by this name."""
    from orthofx.treatments.ow_state import _migrate_square_state as hook

    hook(*args, **kwargs)  # type: ignore[arg-type]
