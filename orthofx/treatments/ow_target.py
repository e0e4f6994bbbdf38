r"""What NOG and OLR act on under OW: the generator ``A`` (the default, as the authors' code) or the
orthogonal weight ``W`` (a Riemannian step on W, pulled back to ``A`` exactly).

With flat OW (:class:`~orthofx.treatments.weight.FlatOrthogonal`, free generator) the optimizer
updates ``A`` and the layer uses ``W = Φ(A)``; in tall form (n'×k, orthonormal columns)

    Q = W_tall = f(S) Y₀,    S = a Y₀ᵀ − Y₀ aᵀ,    f = exp  or  Cayley

(a square weight stores ``B = Y₀ᵀa`` instead of ``a``; the closed forms below are written for
``a`` and converted with ``FlatOrthogonal.tall_generator``/``generator_from_tall``).

``ow_target="generator"`` (default): the chain acts on ``A`` and its gradient as the optimizer
holds them — what the authors' ``run.sh --nog --olr --ow`` does (their NOG/OLR act on the SOC
generator).

``ow_target="weight"``: the chain acts on ``∂l/∂W`` and ``W`` (NOG eqs. 14–17 and OLR eqs.
18–21 are stated on the Pre-SVD weight; Proposition 1 needs ``W`` orthogonal). The map is kept
**at A = 0 before every step** by re-basing after it (a dynamic trivialisation):

    after each optimizer step:   Y₀ ← Φ(A) (already orthonormal),   A ← 0,

which leaves ``W`` unchanged (to rounding: Φ(0) = polish(Y₀) = Y₀ for orthonormal Y₀). At
``A = 0`` the derivative of the map is ``J Δ = Δ − Y₀ΔᵀY₀`` (``L_f(0, X) = X`` for exp and
Cayley; the polish is the identity on tangent directions), so everything is closed form,
O(n'k²) per producer, exact to rounding, with no solve and no host sync:

* ``range(J) = T_Q``, the tangent space of the Stiefel manifold at ``Q = Y₀``;
  ``P_T(G) = G − Y₀ sym(Y₀ᵀG)``.
* The generator's gradient is ``G_A = J*G_W = G_W − Y₀G_WᵀY₀``, hence
  ``P_T(G_W) = Y₀(Y₀ᵀG_A)/2 + (I − Y₀Y₀ᵀ)G_A``. The normal part ``Y₀ sym(Y₀ᵀG_W)`` never
  reaches ``A``; it comes from a :class:`WeightGradCapture` (``ctx["weight_grads"]``, as
  ``attach`` installs), rescaled to the optimizer's gradient by
  ``c = ⟨G_A, J*G_cap⟩/‖J*G_cap‖²`` (1 unless a GradScaler unscaled ``G_A``). The chain thus
  sees the Euclidean ``∂l/∂W``. Without a capture it sees ``P_T(∂l/∂W)``.
* The chain's direction ``D`` is pulled back to the least-norm ``Δ`` with ``JΔ = P_T(D)``:
  ``Δ = Y₀ skew(Y₀ᵀD)/2 + (I − Y₀Y₀ᵀ)D``, which the optimizer applies as ``A``'s gradient. So
  an SGD step moves ``W ← f(−η S(Δ)) W``: the retraction of ``−η P_T(D)`` (momentum
  buffers are carried across re-bases as they are: the identity transport of the generator
  coordinates). Weight decay acts on ``A = 0``, i.e. not at all (‖W‖ is fixed under OW).
* ``state.residual`` holds ``‖JΔ − P_T(D)‖/‖P_T(D)‖`` per producer, evaluated with the
  actual ``Y₀`` (float64: ~1e-16, float32: ~1e-7); NaN where a producer has no OW or no
  gradient.

Cost per OW producer and step: a few (n'×k)·(k×k) products for the pull-back and one forward
of the map (no autograd) for the re-base — against an OW forward+backward, a small fraction.

SOC (``ow_method="soc"``) and normalised generators (``ow_generator="normalized"``) have no
``A = 0`` point to re-base to: they always use ``"generator"`` (an explicit ``"weight"`` raises
ConfigError).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from orthofx._deprecation import warn_deprecated
from orthofx.errors import ConfigError, TreatmentError
from orthofx.specs import GradientSpec
from orthofx.treatments.gradient import GradientTransformation, Updates, as_updates
from orthofx import vocab

__all__ = [
    "OWLinearization", "WeightGradCapture", "WeightTargetState", "weight_target",
    "ow_parametrization", "rebase", "tangent_project", "pullback", "tangent_from_generator_grad",
]

#: earlier names of this module: their one definition lives elsewhere now (a DeprecationWarning names it)
_MOVED: dict[str, tuple[str, Any]] = {
    "OW_TARGETS": ("orthofx.vocab.OW_TARGETS", vocab.OW_TARGETS),
    "DEFAULT_TARGET": ("orthofx.specs.GradientSpec.ow_target (the field's default)", GradientSpec.ow_target),
}


def __getattr__(name: str) -> Any:
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'orthofx.treatments.ow_target' has no attribute {name!r}")
    warn_deprecated(f"orthofx.treatments.ow_target.{name}", moved[0], stacklevel=2)
    return moved[1]


def ow_parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The OW parametrization of ``module.<name>`` that has a weight matrix (``FlatOrthogonal``
    with method ``"expm"``/``"cayley"``), ``None`` otherwise (no OW, SN, SOC, ...)."""
    from torch.nn.utils import parametrize

    from orthofx.treatments.weight import FlatOrthogonal, SOCOrthogonal

    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    if len(plist) != 1:
        return None
    p = plist[0]
    if isinstance(p, FlatOrthogonal) and not isinstance(p, SOCOrthogonal):
        return p
    return None


def is_free(po: nn.Module) -> bool:
    """A flat OW map with a free generator (one that has the point A = 0 to re-base to)."""
    return getattr(po, "generator", "free") == "free"


def is_soc(module: nn.Module, name: str) -> bool:
    """``module.<name>`` carries SOC (an OW without a weight matrix)."""
    from torch.nn.utils import parametrize

    from orthofx.treatments.weight import SOCOrthogonal

    return parametrize.is_parametrized(module, name) and any(
        isinstance(p, SOCOrthogonal) for p in module.parametrizations[name]
    )


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum()


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """a / b, and 0 where b == 0 (a converged solve: no NaN, no host sync)."""
    return torch.where(b != 0, a / torch.where(b != 0, b, torch.ones_like(b)), torch.zeros_like(a))


class OWLinearization:
    r"""``W = Φ(A)`` and its derivative at the current ``A`` for one OW parametrization, by
    autograd through the very map the layer uses: ``J(x)`` (A-shaped → W-shaped, double
    backward) and ``Jt(g) = J*g`` (W-shaped → A-shaped, a vector-Jacobian product). A reference
    for the closed forms at ``A = 0`` used by :func:`weight_target` (tests), and a tool to
    inspect the map anywhere. Computed in ``A``'s dtype (float16/bfloat16 in float32)."""

    def __init__(self, param: nn.Module, A: Tensor) -> None:
        self.po = param
        self.dtype = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
        a = A.detach().to(self.dtype).requires_grad_(True)
        with torch.enable_grad():
            W = param.forward(a)  # not param(a): no module hooks (WeightGradCapture)
            u = torch.zeros_like(W, requires_grad=True)
            (jt,) = torch.autograd.grad(W, a, u, create_graph=True)
        self._a, self._W, self._u, self._jt = a, W, u, jt
        self.W = W.detach()

    def J(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self._jt, self._u, x.to(self.dtype), retain_graph=True)[0]

    def Jt(self, g: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self._W, self._a, g.to(self.dtype), retain_graph=True)[0]


# ----------------------------------------------------------------- closed forms at A = 0 (tall form)
def _sym(X: Tensor) -> Tensor:
    return (X + X.mT) / 2


def tangent_project(Y0: Tensor, G: Tensor) -> Tensor:
    """``P_T(G) = G − Y₀ sym(Y₀ᵀG)``: the tangent part at ``Y₀`` (n'×k, orthonormal columns)."""
    return G - Y0 @ _sym(Y0.mT @ G)


def tangent_from_generator_grad(Y0: Tensor, G_A: Tensor) -> Tensor:
    """``P_T(G_W)`` from ``G_A = J*G_W = G_W − Y₀G_WᵀY₀`` (J at A = 0):
    ``Y₀(Y₀ᵀG_A)/2 + (I − Y₀Y₀ᵀ)G_A``."""
    P = Y0.mT @ G_A
    return G_A - Y0 @ (P / 2)


def jacobian_at_zero(Y0: Tensor, X: Tensor) -> Tensor:
    """``J X = X − Y₀XᵀY₀`` (the map's derivative at A = 0; also ``J*``, it is self-adjoint)."""
    return X - Y0 @ (X.mT @ Y0)


def pullback(Y0: Tensor, D: Tensor) -> Tensor:
    """The least-norm ``Δ`` with ``JΔ = P_T(D)`` at A = 0: ``Y₀ skew(Y₀ᵀD)/2 + (I − Y₀Y₀ᵀ)D``."""
    P = Y0.mT @ D
    return D - Y0 @ P + Y0 @ ((P - P.mT) / 4)


@torch.no_grad()
def rebase(po: nn.Module, A: Tensor) -> None:
    """Re-base one flat OW map at its current weight: ``Y₀ ← Φ(A)`` (tall), ``A ← 0``.
    ``W`` is unchanged to rounding; afterwards the map's derivative is the closed form above.
    ``A`` may be a sharded DTensor (FSDP2): the whole generator is gathered for the map and
    every rank zeroes its own shard."""
    from orthofx.treatments.sharding import full
    from orthofx.treatments.stiefel import _polish

    W = po._to_tall(po.forward(full(A)))
    # two polish steps: orthonormal to the working precision even when the base was built in a
    # lower one (a model cast to float64 after OW was registered in float32)
    po.base.copy_(_polish(W, 2).to(po.base.dtype))
    A.zero_()


class WeightGradCapture:
    """Keeps ``∂L/∂W`` of OW weights as backward computes it (the Euclidean gradient, whose
    normal part A's gradient does not carry).

    A forward hook on each OW parametrization registers a tensor hook on the weight it
    returns; the hook adds the weight's gradient into a buffer, which is restarted when the
    generator has no ``.grad`` yet (the first backward after ``zero_grad()``), so gradient
    accumulation over micro-batches sums as ``.grad`` does. :meth:`take` hands the buffers
    over (averaged over the ranks when ``torch.distributed`` runs with more than one process,
    as DDP/FSDP average the generator's gradient) and clears them. A ``zero_grad(set_to_none=
    False)`` without a step in between is not seen (the buffer then also holds the earlier
    gradient; :func:`weight_target` rescales the capture to the optimizer's gradient, not
    more)."""

    def __init__(self, maps: Sequence[nn.Module | None]) -> None:
        self.maps = list(maps)
        self.grads: list[Tensor | None] = [None] * len(self.maps)
        self._hooks = [
            po.register_forward_hook(_CaptureHook(self, i)) for i, po in enumerate(self.maps) if po is not None
        ]

    def _capture(self, i: int, gen: Tensor | None, g: Tensor) -> None:
        buf = self.grads[i]
        if buf is None or (gen is not None and gen.grad is None):
            self.grads[i] = g.detach().clone()
        else:
            buf.add_(g.detach())

    def take(self) -> list[Tensor | None]:
        out, self.grads = self.grads, [None] * len(self.maps)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in out:  # every rank captured (it ran backward): average as DDP does
                if g is not None:
                    dist.all_reduce(g, op=dist.ReduceOp.AVG)
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.grads = [None] * len(self.maps)


class _CaptureHook:
    """The forward hook of :class:`WeightGradCapture` on one OW map. A copy of the model
    (``copy.deepcopy``) carries an inert hook instead: an EMA copy must not add its gradients
    to the original's capture."""

    def __init__(self, capture: WeightGradCapture, i: int) -> None:
        self.capture, self.i = capture, i

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        gen = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        capture, i = self.capture, self.i
        output.register_hook(lambda g: capture._capture(i, gen, g))

    def __reduce__(self) -> tuple[Any, tuple]:
        return (_InertHook, ())


class _InertHook:
    def __call__(self, *args: Any) -> None:
        return None


@dataclass
class WeightTargetState:
    """The inner chain's state (``inner``, what the chain's own readers see) and the relative
    residuals ``‖JΔ − P_T(D)‖/‖P_T(D)‖`` of the last step's pull-backs, a (P,) device tensor
    (NaN where a producer has no OW or no gradient)."""

    inner: Any
    residual: Tensor | None = None

    def __getitem__(self, key: Any) -> Any:  # read like the inner chain's state: state["olr"]
        return self.inner[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.inner

    def get(self, name: str, default: Any = None) -> Any:
        return self.inner.get(name, default) if hasattr(self.inner, "get") else default


def weight_target(
    inner: GradientTransformation, maps: Sequence[nn.Module | None]
) -> GradientTransformation:
    r"""Run ``inner`` on the weights ``W = Φ(A)`` of OW producers instead of their generators.

    ``maps[i]`` is producer ``i``'s flat OW parametrization (:func:`ow_parametrization`) or
    ``None`` (that producer passes through ``inner`` as it is). Each map must be at ``A = 0``
    when the step runs — :func:`rebase` after every step keeps it there (``attach`` installs
    that as an optimizer step post-hook and re-bases once at attach). Per OW producer the
    gradient handed to ``inner`` is ``∂L/∂W = P_T(G_W) + c·Y₀ sym(Y₀ᵀG_cap)`` (tangent part
    from ``A``'s gradient, normal part from ``ctx["weight_grads"][i]`` when given, see
    :class:`WeightGradCapture`), the parameter handed to it is ``W = Y₀``, and the direction
    ``D`` it returns is applied as the generator gradient ``Δ`` with ``JΔ = P_T(D)`` (module
    docstring: closed forms, exact). ``Updates.lr`` passes through unchanged. A non-finite
    generator gradient reaches ``inner`` as NaN (guards count and zero it).
    """
    if not isinstance(inner, GradientTransformation):
        raise ConfigError(f"weight_target: expected a GradientTransformation, got {type(inner).__name__}")
    maps = list(maps)

    def init(params: Sequence[Tensor]) -> WeightTargetState:
        if len(params) != len(maps):
            raise TreatmentError(f"weight_target: {len(params)} parameters for {len(maps)} maps")
        return WeightTargetState(inner.init(params))

    @torch.no_grad()
    def update(
        updates: Any, state: WeightTargetState, params: Sequence[Tensor] | None = None,
        ctx: Mapping[str, Any] | None = None, **kw: Any,
    ) -> tuple[Updates, WeightTargetState]:
        if not isinstance(state, WeightTargetState):
            raise TreatmentError("weight_target.update: the state is not a WeightTargetState")
        if params is None:
            raise TreatmentError("weight_target.update needs the producer parameters (params=)")
        ups = as_updates(updates)
        grads = ups.grads
        g_in: list[Tensor | None] = list(grads)
        p_in: list[Tensor] = list(params)
        bases: dict[int, Tensor] = {}
        captured = (ctx or {}).get("weight_grads") or [None] * len(maps)
        for i, po in enumerate(maps):
            g = grads[i]
            if po is None or g is None:
                continue
            cd = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
            Y0 = po.base.to(device=g.device, dtype=cd)
            finite = g.abs().amax() < math.inf
            G_A = po.tall_generator(torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device)).to(cd))
            gt = tangent_from_generator_grad(Y0, G_A)
            cap = captured[i] if i < len(captured) else None
            if cap is not None:  # the normal part, from the capture scaled to the optimizer's gradient
                cap = po._to_tall(cap.to(device=g.device, dtype=cd))
                cap = torch.where(torch.isfinite(cap), cap, torch.zeros((), dtype=cd, device=cap.device))
                jc = jacobian_at_zero(Y0, cap)
                c = _safe_div(_dot(G_A, jc), _dot(jc, jc))
                gt = gt + c * (Y0 @ _sym(Y0.mT @ cap))
            nan = torch.full((), math.nan, dtype=gt.dtype, device=gt.device)
            g_in[i] = po._from_tall(torch.where(finite, gt, nan)).to(g.dtype)
            p_in[i] = po._from_tall(Y0).to(params[i].dtype)
            bases[i] = Y0
        out = inner.update(Updates(g_in, ups.lr), state.inner, p_in, {**(ctx or {}), **kw})
        res, new_inner = out
        res = as_updates(res) if not isinstance(res, Updates) else res
        grads_out = list(res.grads)
        residual = None
        if bases:
            dev = next(iter(bases.values())).device
            residual = torch.full((len(maps),), math.nan, dtype=torch.float32, device=dev)
        for i, Y0 in bases.items():
            d = grads_out[i]
            if d is None:
                continue
            po = maps[i]
            Dt = po._to_tall(d.to(Y0.dtype))  # type: ignore[union-attr]
            delta = pullback(Y0, Dt)
            want = tangent_project(Y0, Dt)
            rr = _safe_div(torch.linalg.vector_norm(jacobian_at_zero(Y0, delta) - want), torch.linalg.vector_norm(want))
            delta = torch.where(torch.isfinite(delta), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
            grads_out[i] = po.generator_from_tall(delta).to(grads[i].dtype)  # type: ignore[union-attr]
            residual[i] = rr.to(residual.dtype)  # type: ignore[index]
        return Updates(grads_out, res.lr), WeightTargetState(new_inner, residual)

    return GradientTransformation(init, update, inner.sets_lr)
