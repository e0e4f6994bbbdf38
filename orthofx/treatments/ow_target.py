r"""What NOG and OLR act on under OW: the weight ``W`` (the paper's reading) or the generator ``A``.

With OW (:class:`~orthofx.treatments.weight.FlatOrthogonal`) the optimizer updates the
generator ``A`` and the layer uses ``W = Φ(A)``; in tall form (``FlatOrthogonal``)

    Q = W_tall = f(S) Y₀,    S = a Y₀ᵀ − Y₀ aᵀ,    f = exp  or  Cayley,

(the paper's square case is ``W = exp(A − Aᵀ)``, ``Y₀ = I``). Let ``J = DΦ(A)`` be the
Fréchet derivative of the map at the current ``A`` (A-shaped → W-shaped) and ``J*`` its
adjoint (``J*G = ∂⟨Φ(A), G⟩/∂A``, what autograd computes). In tall form, with
``ΔS = ΔY₀ᵀ − Y₀Δᵀ`` and ``E`` as below, ``J*G = (E − Eᵀ) Y₀`` (from
``⟨ΔS, E⟩ = ⟨Δ, (E − Eᵀ)Y₀⟩``):

* ``f = exp``: ``JΔ = L_exp(S, ΔS) Y₀``, ``L_exp(S, X) = ∫₀¹ e^{(1−t)S} X e^{tS} dt`` (the
  Fréchet derivative), and ``E = L_exp(Sᵀ, G Y₀ᵀ)`` (its adjoint is ``L_exp(Sᵀ, ·)``);
* Cayley ``C(S) = (I − S/2)⁻¹(I + S/2) = 2M⁻¹ − I``, ``M = I − S/2``: ``JΔ = M⁻¹ ΔS M⁻¹ Y₀``
  and ``E = M⁻ᵀ G Y₀ᵀ M⁻ᵀ``.

Both are evaluated by autograd through the very map the layer uses (``J*`` as a
vector-Jacobian product, ``J`` as the derivative of that linear map in its cotangent — double
backward), so every method and route (dense, low-rank, polished, scaled) is covered by the
same code.

Facts used (for A generic, i.e. the exponential's derivative invertible, ``‖S‖₂ < 2π``):

* ``range(J) = T_Q``, the tangent space of the Stiefel manifold at ``Q`` (orthonormal
  columns); its orthogonal projection is ``P_T(G) = G − Q sym(QᵀG)``.
* ``ker(J) = {Y₀Σ : Σ symmetric}`` (then ``ΔS = 0``) whatever ``A``; so ``J*J`` is positive
  definite on the fixed space ``H = {Y₀Ω + Y₀⊥K : Ω skew}``, and at ``A = 0`` it is
  ``Y₀Ω + Y₀⊥K ↦ 4Y₀Ω + Y₀⊥K`` — its inverse is the preconditioner of the solves below, which
  therefore converge in one step at ``A = 0`` and in a few near it.

``ow_target="weight"`` (:func:`weight_target`), per OW producer and step:

1. the gradient of W: its tangent part ``P_T(∂L/∂W) = J (J*J)⁺ G_A`` is recovered from the
   generator's gradient ``G_A = J*(∂L/∂W)`` (exact, and already reduced by DDP, unscaled by
   GradScaler, accumulated over micro-batches); its normal part ``Q sym(Qᵀ ∂L/∂W)`` never
   reaches ``A`` and comes from a :class:`WeightGradCapture` (``ctx["weight_grads"]``, as
   ``attach`` installs), rescaled to the optimizer's gradient
   (``c = ⟨G_A, J*G_cap⟩ / ‖J*G_cap‖²``, 1 unless a GradScaler unscaled ``G_A``). The chain
   thus sees the paper's Euclidean ``∂l/∂W``. Without a capture it sees the Riemannian
   gradient ``P_T(∂L/∂W)`` only — then every NOG direction is orthogonal to W
   (``⟨Q, polar(QΩ + Q⊥K)⟩ = tr(Ω M^{-1/2}) = 0``), so OLR's ``lᵀw`` is 0 and η* = 0: OLR
   falls back to the scheduled lr;
2. the chain (NOG, OLR, …) runs on the gradient ``G_T`` of the parameter ``W`` (OLR's
   ``w`` is the orthogonal weight: Proposition 1's setting) and returns a direction ``D``
   (and OLR's lr η);
3. ``D`` is mapped back to the generator: ``Δ = (J*J)⁺ J* D`` (the least-norm Δ with
   ``J Δ = P_T(D)``), which the optimizer applies as A's gradient. So a plain SGD step
   ``A ← A − ηΔ`` moves the weight by ``W ← W − η P_T(D) + O(η²)``: along NOG's direction,
   projected on the manifold.

Both solves are preconditioned conjugate gradients on ``J*J`` with a fixed number of
iterations (``iters``; no host synchronisation, every product is a backward pass through the
map). Far from ``A = 0`` (``‖S‖₂`` approaching 2π) ``J`` becomes ill-conditioned and the
fixed-iteration solve is an approximation; ``weight_target`` state keeps the relative
residual ``‖J*J Δ − J*D‖ / ‖J*D‖`` of the last step per producer (``state.residual``).

Why ``"weight"`` is the faithful reading: NOG (eqs. 14–17) and OLR (eqs. 18–21) are stated on
the Pre-SVD weight ``W`` and ``∂l/∂W``; under OW "``exp(W − Wᵀ)`` is used as the weight"
(Sec. 4.2); and the NOG+OW+OLR analysis ("when both W and ∂l/∂W are orthogonal, η* is
bounded", Proposition 1) needs ``w`` to be the orthogonal weight. Under the generator
reading ``w = A``, which is 0 at registration (η* = 0/0: the scheduled lr).

Cost: per OW producer and step, two solves of ``iters`` iterations, each iteration one
``J`` (a double-backward pass) and one ``J*`` (a backward pass) through the OW map, plus one
residual check per solve: about ``4·(iters + 1)`` passes (36 at the default 8) — tens of
times the map's own forward+backward. The fixed count keeps the step free of host syncs.

``ow_target="generator"`` is the other reading (and what the authors' released SOC code does:
NOG on the conv parameter, which under SOC is the generator): the chain acts on ``A`` and its
gradient directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments.gradient import GradientTransformation, Updates, as_updates

__all__ = [
    "OW_TARGETS", "OWLinearization", "WeightGradCapture", "WeightTargetState", "weight_target",
    "ow_parametrization", "DEFAULT_ITERS",
]

#: the readings of "the gradient of the Pre-SVD weight" under OW
OW_TARGETS: tuple[str, ...] = ("weight", "generator")
#: conjugate-gradient iterations of each solve (exact in 1 at A = 0)
DEFAULT_ITERS = 8


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
    r"""``W = Φ(A)`` and its derivative at the current ``A`` for one OW parametrization.

    ``J(x)`` (A-shaped → W-shaped), ``Jt(g)`` (= ``J*g``, W-shaped → A-shaped),
    :meth:`solve` (``(J*J)⁺ b`` on ``H`` by preconditioned CG), :meth:`riemannian`
    (``P_T(G_W)`` from ``G_A``) and :meth:`pullback` (``Δ`` with ``JΔ = P_T(D)``).
    Computed in ``A``'s dtype (float16/bfloat16 in float32)."""

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
        self.Y0 = param.base.detach().to(self.dtype)

    def J(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self._jt, self._u, x.to(self.dtype), retain_graph=True)[0]

    def Jt(self, g: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self._W, self._a, g.to(self.dtype), retain_graph=True)[0]

    def precondition(self, r: Tensor) -> Tensor:
        """``(J*J)⁺`` at ``A = 0``: ``Y₀Ω + Y₀⊥K ↦ Y₀Ω/4 + Y₀⊥K`` (and ``Y₀·sym ↦ 0``)."""
        rt = self.po._to_tall(r)
        P = self.Y0.mT @ rt
        out = self.Y0 @ ((P - P.mT) / 8) + (rt - self.Y0 @ P)
        return self.po._from_tall(out)

    def solve(self, b: Tensor, iters: int = DEFAULT_ITERS) -> tuple[Tensor, Tensor]:
        """``(x, relative residual)`` with ``x ≈ (J*J)⁺ b`` after at most ``iters`` PCG steps.

        A step is frozen (α = β = 0, decided on the device) once ``rᵀM r`` has dropped below
        ``(100·eps)²`` of its start: converged iterates stay put instead of dividing
        rounding noise by rounding noise."""
        b = b.to(self.dtype)
        x = torch.zeros_like(b)
        r = b
        z = self.precondition(r)
        p = z
        rz = _dot(r, z)
        tol = rz * (100 * torch.finfo(self.dtype).eps) ** 2
        for _ in range(iters):
            active = rz > tol
            q = self.Jt(self.J(p))
            alpha = torch.where(active, _safe_div(rz, _dot(p, q)), torch.zeros_like(rz))
            x = x + alpha * p
            r = r - alpha * q
            z = self.precondition(r)
            rz_new = _dot(r, z)
            beta = torch.where(active, _safe_div(rz_new, rz), torch.zeros_like(rz))
            p = z + beta * p
            rz = torch.where(active, rz_new, rz)
        res = _safe_div(torch.linalg.vector_norm(self.Jt(self.J(x)) - b), torch.linalg.vector_norm(b))
        return x, res

    def riemannian(self, grad_A: Tensor, iters: int = DEFAULT_ITERS) -> tuple[Tensor, Tensor]:
        """``P_T(∂L/∂W)`` from ``∂L/∂A = J*(∂L/∂W)``: ``J (J*J)⁺ G_A``."""
        y, res = self.solve(grad_A, iters)
        return self.J(y), res

    def pullback(self, D: Tensor, iters: int = DEFAULT_ITERS) -> tuple[Tensor, Tensor]:
        """The least-norm generator step ``Δ = (J*J)⁺ J* D``: ``J Δ = P_T(D)``."""
        return self.solve(self.Jt(D), iters)


    def normal(self, G: Tensor) -> Tensor:
        """The normal part ``Q sym(QᵀG)`` of a W-shaped ``G`` (``G = P_T(G) + normal(G)``)."""
        Q, Gt = self.po._to_tall(self.W), self.po._to_tall(G.to(self.dtype))
        S = Q.mT @ Gt
        return self.po._from_tall(Q @ ((S + S.mT) / 2))


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
    residuals of the last step's pull-back solves, a (P,) device tensor (NaN where a producer
    has no OW or no gradient)."""

    inner: Any
    residual: Tensor | None = None

    def __getitem__(self, key: Any) -> Any:  # read like the inner chain's state: state["olr"]
        return self.inner[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.inner

    def get(self, name: str, default: Any = None) -> Any:
        return self.inner.get(name, default) if hasattr(self.inner, "get") else default


def weight_target(
    inner: GradientTransformation, maps: Sequence[nn.Module | None], *, iters: int = DEFAULT_ITERS
) -> GradientTransformation:
    r"""Run ``inner`` on the weights ``W = Φ(A)`` of OW producers instead of their generators.

    ``maps[i]`` is producer ``i``'s OW parametrization (:func:`ow_parametrization`) or
    ``None`` (that producer passes through ``inner`` as it is). Per OW producer: the gradient
    handed to ``inner`` is ``∂L/∂W = J (J*J)⁺ G_A + c·Q sym(QᵀG_cap)`` (tangent part from
    A's gradient, normal part from ``ctx["weight_grads"][i]`` when given, see
    :class:`WeightGradCapture`), the parameter handed to it is the
    current weight ``W``, and the direction ``D`` it returns is applied as the generator
    gradient ``Δ = (J*J)⁺ J* D`` (so that ``W`` moves along ``P_T(D)`` to first order); see
    the module docstring for the derivation. ``Updates.lr`` passes through unchanged. A
    non-finite generator gradient reaches ``inner`` as NaN (guards count and zero it) and
    never enters the solves.
    """
    if not isinstance(inner, GradientTransformation):
        raise ConfigError(f"weight_target: expected a GradientTransformation, got {type(inner).__name__}")
    if int(iters) < 1:
        raise ConfigError(f"weight_target: iters must be >= 1, got {iters!r}")
    maps = list(maps)
    iters = int(iters)

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
        lins: dict[int, OWLinearization] = {}
        captured = (ctx or {}).get("weight_grads") or [None] * len(maps)
        for i, po in enumerate(maps):
            g = grads[i]
            if po is None or g is None:
                continue
            lin = OWLinearization(po, params[i])
            finite = g.abs().amax() < math.inf
            clean = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            gt, _ = lin.riemannian(clean, iters)
            cap = captured[i] if i < len(captured) else None
            if cap is not None:  # the normal part, from the capture scaled to the optimizer's gradient
                cap = cap.to(lin.dtype)
                cap = torch.where(torch.isfinite(cap), cap, torch.zeros((), dtype=cap.dtype, device=cap.device))
                jc = lin.Jt(cap)
                c = _safe_div(_dot(clean.to(lin.dtype), jc), _dot(jc, jc))
                gt = gt + c * lin.normal(cap)
            nan = torch.full((), math.nan, dtype=gt.dtype, device=gt.device)
            g_in[i] = torch.where(finite, gt, nan).to(g.dtype)
            p_in[i] = lin.W.to(params[i].dtype)
            lins[i] = lin
        out = inner.update(Updates(g_in, ups.lr), state.inner, p_in, {**(ctx or {}), **kw})
        res, new_inner = out
        res = as_updates(res) if not isinstance(res, Updates) else res
        grads_out = list(res.grads)
        residual = None
        if lins:
            dev = next(iter(lins.values())).W.device
            residual = torch.full((len(maps),), math.nan, dtype=torch.float32, device=dev)
        for i, lin in lins.items():
            d = grads_out[i]
            if d is None:
                continue
            delta, rr = lin.pullback(d, iters)
            delta = torch.where(torch.isfinite(delta), delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
            grads_out[i] = delta.to(grads[i].dtype)  # type: ignore[union-attr]
            residual[i] = rr.to(residual.dtype)  # type: ignore[index]
        return Updates(grads_out, res.lr), WeightTargetState(new_inner, residual)

    return GradientTransformation(init, update, inner.sets_lr)
