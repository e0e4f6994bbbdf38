r"""Gradient treatments of the paper (Sec. 5) as pure, composable transforms (optax style).

A transform is a :class:`GradientTransformation` ``(init, update, sets_lr)``:

* ``state = t.init(params)`` — ``params`` is the list of producer parameters (the tensors the
  optimizer updates; for an OW-parametrized layer that is ``parametrizations.weight.original``);
* ``updates, new_state = t.update(updates, state, params, ctx)`` — ``updates`` is an
  :class:`Updates` ``(grads, lr)`` (a plain list of gradients is read as ``Updates(grads)``):
  ``grads[i]`` is the gradient of ``params[i]`` (or ``None``: that producer is skipped and
  ``None`` is returned for it) and ``lr`` the per-producer learning rate chosen so far (a (P,)
  device tensor, or ``None``: the optimizer's scheduled lr). ``ctx`` is a mapping of context,
  e.g. ``{"lrs": [...]}`` (the scheduled lr of each producer, which :func:`olr` needs).
  ``update`` never modifies ``grads`` in place and returns a new state object. Device
  counters (the zero / non-finite counts) and the OLR history buffer are shared between
  the old and the new state and updated in place: that keeps the step free of host
  synchronisation and lets it replay in a CUDA graph.
* ``sets_lr``: whether ``update`` may return ``Updates.lr`` (:func:`orthofx.treatments.attach`
  then gives each producer its own param group so that its lr can be set).

Transforms:

* :func:`nog` — Nearest Orthogonal Gradient: ``G ← U Vᵀ`` of the flattened gradient
  (``G = U S Vᵀ``), all producers of one shape in one batched ``orthofx.linalg.polar`` call
  (``scale``: unit singular values or ‖G‖_F; ``deficient``: partial isometry or lifted
  null space).
* :func:`guard` — zero (and count) non-finite gradients; count zero gradients.
* :func:`olr` — Optimal Learning Rate: computes
  ``η* = (wᵀw·lᵀw) / (wᵀw·lᵀl + 2(lᵀw)²)`` per producer (the first-order minimiser of
  ‖W − ηG‖_F⁴, which is what the paper's eqs. 18–20 reduce to) and returns the lr to use as
  ``Updates.lr``; the gradients pass through unchanged.
* :func:`named_chain` — compose named transforms; the state is a :class:`ChainState`, read
  by name (``state["olr"]``) or position. :func:`chain` is the same with names
  ``"0", "1", …``; :func:`default_chain` is the chain ``attach`` builds from a config.

``orthofx.treatments.attach`` installs any chain as an optimizer step pre-hook.

The earlier call form ``grads = t.update(grads, params, state, **ctx)`` of the built-in
transforms and chains still works: it is recognised by the state in the third position,
writes the new state back into ``state`` and returns only the gradient list.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from orthofx.errors import ConfigError, TreatmentError
from orthofx.linalg.polar import check_deficient
from orthofx.treatments._common import POLAR_METHODS, compute_dtype, flat_shape, polar
from orthofx.vocab import NOG_DEFICIENT, NOG_SCALES

__all__ = [
    "GradientTransformation",
    "Updates",
    "ChainState",
    "GuardState",
    "NOGState",
    "OLRState",
    "DeviceHistory",
    "as_updates",
    "nog",
    "guard",
    "olr",
    "chain",
    "named_chain",
    "default_chain",
    "olr_eta",
]

Grads = list["Tensor | None"]


class Updates(NamedTuple):
    """What a transform returns (and the chain passes along): the gradients and, optionally,
    the learning rate of each producer (a (P,) tensor on the producers' device; ``None``
    keeps the optimizer's scheduled lr)."""

    grads: Grads
    lr: Tensor | None = None


def as_updates(x: "Updates | Sequence[Tensor | None]") -> Updates:
    """``x`` as :class:`Updates` (a plain gradient list gets ``lr=None``)."""
    if isinstance(x, Updates):
        return x
    if isinstance(x, Tensor):
        raise TreatmentError("gradient transforms act on a list of gradients, got a single tensor")
    return Updates(list(x), None)


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params, ctx) -> (updates, state)``.

    ``sets_lr``: the transform may return a per-producer lr (``Updates.lr``)."""

    init: Callable[[Sequence[Tensor]], Any]
    update: Callable[..., Any]
    sets_lr: bool = False


def _counter_device(params: Sequence[Tensor]) -> torch.device:
    return params[0].device if len(params) else torch.device("cpu")


def _check_grad(g: Tensor, i: int, what: str) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise TreatmentError(f"{what}: gradient #{i} is sparse; only dense gradients are supported")
    if not g.is_floating_point():
        raise TreatmentError(f"{what}: gradient #{i} has dtype {g.dtype}; a floating-point gradient is needed")


def _ctx(ctx: Mapping[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
    if ctx is not None and not isinstance(ctx, Mapping):
        raise TreatmentError(f"update: ctx must be a mapping, got {type(ctx).__name__}")
    return {**(ctx or {}), **kw}


def _assign(old: Any, new: Any) -> None:
    """Write ``new`` into ``old`` in place (the earlier, mutating call form)."""
    if old is new:
        return
    if isinstance(old, ChainState) and isinstance(new, ChainState):
        for a, b in zip(old, new):
            _assign(a, b)
    elif dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            setattr(old, f.name, getattr(new, f.name))
    else:
        raise TreatmentError(
            f"update(grads, params, state): a state of type {type(old).__name__} cannot be updated in "
            "place; use the pure form `updates, state = t.update(updates, state, params, ctx)`"
        )


def _pure(state_types: type | tuple[type, ...]) -> Callable[[Callable[..., tuple[Updates, Any]]], Callable[..., Any]]:
    """Wrap a pure ``update(updates, state, params, ctx) -> (Updates, state)``: also accept
    context as keywords and the earlier form ``update(grads, params, state, **ctx) -> grads``
    (recognised by an instance of ``state_types`` in the third position)."""

    def wrap(fn: Callable[..., tuple[Updates, Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def update(updates: Any, state: Any, params: Any = None, ctx: Mapping[str, Any] | None = None, **kw: Any) -> Any:
            if isinstance(params, state_types) and not isinstance(state, state_types):
                old = params
                out, new = fn(as_updates(updates), old, state, _ctx(ctx, kw))
                _assign(old, new)
                return out.grads
            return fn(as_updates(updates), state, params, _ctx(ctx, kw))

        return update

    return wrap


# --------------------------------------------------------------------------- guard / NOG
@dataclass
class GuardState:
    """Counters (0-d int64 device tensors, updated without host sync) and the step count.

    ``zero``: gradients that were exactly zero; ``nonfinite``: gradients holding NaN/Inf
    (replaced by zero). Read with ``int(state.zero)`` (one sync) when needed."""

    zero: Tensor
    nonfinite: Tensor
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "zero": int(self.zero), "nonfinite": int(self.nonfinite)}


@dataclass
class NOGState(GuardState):
    """:class:`GuardState` plus NOG's options: the polar ``method``, ``scale`` and ``deficient``."""

    method: str = "auto"
    scale: str = "unit"
    deficient: str = "partial"


def _new_counters(params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    dev = _counter_device(params)
    return torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)


def _absmax(g: Tensor, dim: tuple[int, ...] | None) -> Tensor:
    """max|g| over ``dim`` (all dims for None) in g's own dtype: one reduction gives both masks
    the guards need, exactly and for every dtype — finite iff ``max|g| < inf`` (NaN propagates
    through the max, Inf is the max) and zero iff ``max|g| == 0``. Unlike a sum of squares a
    max never under- or overflows, so a 1e-30 or 1e30 float32/bfloat16 gradient (and a float64
    one of any finite size) is neither "zero" nor "non-finite"."""
    a = g.abs()
    return a.amax() if dim is None else a.amax(dim=dim)


def guard() -> GradientTransformation:
    """Replace a gradient holding NaN/Inf by zeros and count it; count all-zero gradients.

    ``g ← g`` if every entry is finite, else ``0`` (so NaN is never written into a weight;
    note that momentum and weight decay of the optimizer still act on a zero gradient).
    """

    def init(params: Sequence[Tensor]) -> GuardState:
        z, nf = _new_counters(params)
        return GuardState(zero=z, nonfinite=nf)

    @_pure(GuardState)
    def update(
        updates: Updates, state: GuardState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, GuardState]:
        grads = updates.grads
        out: Grads = list(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            _check_grad(g, i, "guard")
            amax = _absmax(g, dim=None)
            finite = amax < math.inf  # amax ≥ 0: False exactly for NaN/Inf entries
            out[i] = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            state.nonfinite.add_((~finite).to(state.nonfinite.device, torch.int64))
            state.zero.add_((amax == 0).to(state.zero.device, torch.int64))
        # the counters are device tensors shared with the new state (in place: no host sync)
        return updates._replace(grads=out), dataclasses.replace(state, steps=state.steps + 1)

    return GradientTransformation(init, update)


def nog(method: str = "auto", *, scale: str = "unit", deficient: str = "partial") -> GradientTransformation:
    r"""Nearest Orthogonal Gradient (paper Sec. 5.1, eqs. 14–17).

    For each producer gradient ``g`` of shape (out, in, *k), with ``G = g.reshape(out, -1)``
    (m × n) and thin SVD ``G = U S Vᵀ``:

        G ← U Vᵀ = G (GᵀG)^{-1/2}                          (scale="unit", the paper)
        G ← U Vᵀ · ‖G‖_F / ‖U Vᵀ‖_F                          (scale="frobenius")

    reshaped back to g's shape: the orthogonal matrix nearest to ``G`` in Frobenius norm. The
    optimizer then applies lr, momentum and weight decay to this gradient as usual.

    * ``scale="unit"`` (default, the paper and the authors' code): no rescaling, so every step
      has the fixed size ‖U Vᵀ‖_F = √rank(G) (√min(m, n) for full-rank G) whatever ‖G‖.
      ``"frobenius"``: NOG's direction at the gradient's own size, ‖out‖_F = ‖G‖_F (0 stays 0).
      The factor is ``max|G| · ‖G/max|G|‖_F / ‖U Vᵀ‖_F``, formed in float32 (float64 for
      float64 gradients): no under/overflow for any finite G whose result is representable.
    * ``deficient`` — what a rank-deficient ``G`` (r = rank < min(m, n)) gives:

      - ``"partial"`` (default): the partial isometry ``U_r V_rᵀ`` (null directions stay 0,
        singular values 1 on the range). The rank is numerical: "eigh" (and "auto" on the CPU)
        drops Gram eigenvalues ≤ max(m, n)·eps(float64)·λ_max, "svd" drops σ ≤ max(m, n)·
        eps(d)·σ_max with d the SVD's dtype (float32; float64 for float64 gradients), and
        the iterations ("ns", "polar_express", "auto" on CUDA) keep an exact zero singular
        value at 0 but move tiny ones only part of the way to 1 (``orthofx.linalg.polar``).
      - ``"full"``: the authors' ``s[:] = 1`` — ``U Vᵀ`` of the full thin SVD, all min(m, n)
        singular values 1, the null directions lifted along the SVD's own (non-unique)
        basis. Only an SVD returns that basis: ``method="auto"`` then runs ``"svd"`` (on
        CUDA a host synchronisation per step and a batched SVD's cost); ``"eigh"``, ``"ns"``
        and ``"polar_express"`` raise ConfigError.

      For a full-rank ``G`` both give ``U Vᵀ``.

    * Gradients of the same flattened shape, dtype and device are stacked and sent to
      ``orthofx.linalg.polar(G, method=method, deficient=deficient)`` in **one** batched call.
    * A zero gradient stays zero (no update from it) and is counted in ``state.zero``.
    * A gradient holding NaN/Inf becomes zero and is counted in ``state.nonfinite``; it never
      reaches the SVD. The counters are device tensors (no host sync).
    * dtype: as ``orthofx.linalg.polar`` (half precision is decomposed in float32); the result
      has the gradient's dtype. No ε beyond the rank tolerances above.
    * Scale-safe: the zero/non-finite masks use max|G| in G's dtype (never under/overflows)
      and polar divides G by max|G| before any norm, so every finite nonzero gradient —
      float32/bfloat16 from 1e-30 to 1e30 and beyond — gets its U Vᵀ, on the CPU and CUDA
      paths alike (tests/test_nog_scale.py).
    * Sensitivity: U Vᵀ moves by O(‖ΔG‖/σ_min(G)) for a change ΔG of G (for square G at most
      2‖ΔG‖_F/(σ_min(G) + σ_min(G + ΔG)), R.-C. Li's bound), so near-rank-deficient
      gradients turn rounding-level differences (another polar method, another device) into
      much larger differences of the step.
    * Rank-deficient gradients are not counted: ``polar`` returns only U Vᵀ, and detecting
      them would need the singular values (an extra decomposition).

    Args:
        method: an ``orthofx.linalg.polar`` method: ``"auto"`` (default: Polar Express with
            5 polish steps on CUDA — no host sync, ≤ 2e-5 from U Vᵀ when σ_min ≥ 1.5e-4‖G‖_F —
            and float64 Gram ``"eigh"`` on the CPU), ``"svd"`` (the paper's literal U Vᵀ;
            synchronises on CUDA), ``"eigh"``, ``"ns"`` or ``"polar_express"``.
        scale: ``"unit"`` or ``"frobenius"`` (``orthofx.vocab.NOGScale``).
        deficient: ``"partial"`` or ``"full"`` (``orthofx.vocab.NOGDeficient``).

    Raises:
        ConfigError: an unknown method, scale or deficient, or ``deficient="full"`` with a
            method other than "svd"/"auto".
    """
    if not isinstance(method, str) or method not in POLAR_METHODS:
        raise ConfigError(f"nog: method={method!r}; use one of {POLAR_METHODS}")
    scale, deficient = _nog_choice(scale, "scale", NOG_SCALES), _nog_choice(deficient, "deficient", NOG_DEFICIENT)
    try:
        check_deficient(method, deficient)
    except ConfigError as exc:
        raise ConfigError(f"nog: {exc}") from None

    def init(params: Sequence[Tensor]) -> NOGState:
        z, nf = _new_counters(params)
        return NOGState(zero=z, nonfinite=nf, method=method, scale=scale, deficient=deficient)

    @_pure(GuardState)
    def update(
        updates: Updates, state: NOGState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, NOGState]:
        grads = updates.grads
        out: Grads = list(grads)
        groups: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            _check_grad(g, i, "NOG")
            if g.ndim < 2:
                raise TreatmentError(
                    f"NOG: gradient #{i} has shape {tuple(g.shape)}; a weight gradient with >= 2 dims is needed"
                )
            m, n = flat_shape(g.shape)
            groups.setdefault((m, n, g.dtype, g.device), []).append(i)
        for (m, n, dtype, dev), idxs in groups.items():
            if len(idxs) == 1:
                G = grads[idxs[0]].reshape(1, m, n)  # type: ignore[union-attr]
            else:
                G = torch.stack([grads[i].reshape(m, n) for i in idxs])  # type: ignore[union-attr]
            amax = _absmax(G, dim=(-2, -1))
            finite = amax < math.inf
            is_zero = amax == 0
            G = torch.where(finite[:, None, None], G, torch.zeros((), dtype=dtype, device=dev))
            # polar maps zero (and sanitised non-finite) gradients to exactly zero
            R = polar(G, state.method, state.deficient)
            R = R.to(dtype) if state.scale == "unit" else _to_frobenius(G, R, amax, finite)
            state.nonfinite.add_((~finite).sum().to(state.nonfinite.device))
            state.zero.add_(is_zero.sum().to(state.zero.device))
            for j, i in enumerate(idxs):
                out[i] = R[j].reshape(grads[i].shape)  # type: ignore[union-attr]
        return updates._replace(grads=out), dataclasses.replace(state, steps=state.steps + 1)

    return GradientTransformation(init, update)


def choice(value: Any, name: str, allowed: tuple[str, ...], prefix: str = "") -> str:
    """``value`` (a string or an Enum member) if it is one of ``allowed``; else ConfigError
    ``"<prefix><name>=<value>; use one of ..."``."""
    if hasattr(value, "value") and not isinstance(value, str):  # an Enum member
        value = value.value
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{prefix}{name}={value!r}; use one of {allowed}")
    return str(value)


def _nog_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    return choice(value, name, allowed, prefix="nog: ")


def _to_frobenius(G: Tensor, R: Tensor, amax: Tensor, finite: Tensor) -> Tensor:
    """``R · ‖G‖_F / ‖R‖_F`` per batch element (B, m, n), in G's dtype; 0 where R or G is 0.

    ``‖G‖_F = max|G| · ‖G/max|G|‖_F`` and all norms are taken in float32 (float64 for float64
    G) on matrices with entries in [-1, 1] (R: ‖R‖_2 ≤ ~1.2), so nothing under- or overflows
    unless the result itself is out of range."""
    cd = compute_dtype(G.dtype)
    a = torch.where(finite & (amax > 0), amax, torch.ones((), dtype=amax.dtype, device=amax.device)).to(cd)
    Rc = R.to(cd)
    gn = torch.linalg.matrix_norm(G.to(cd) / a[:, None, None]) * a
    rn = torch.linalg.matrix_norm(Rc)
    c = torch.where(rn > 0, gn / torch.where(rn > 0, rn, 1.0), 0.0)
    return (Rc * c[:, None, None]).to(G.dtype)


# --------------------------------------------------------------------------- OLR
class DeviceHistory:
    """An append-only log of equally-shaped device tensors with no host sync on append.

    Rows are copied into a preallocated device buffer that doubles when full (or, with
    ``max_len``, a ring buffer keeping the last ``max_len`` rows). :meth:`read` returns a
    ``(T, *row_shape)`` tensor in append order."""

    def __init__(self, max_len: int | None = None) -> None:
        if max_len is not None and int(max_len) < 1:
            raise ConfigError(f"max_len must be >= 1 or None, got {max_len!r}")
        self.max_len = None if max_len is None else int(max_len)
        self._buf: Tensor | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n if self.max_len is None else min(self._n, self.max_len)

    def append(self, row: Tensor) -> None:
        row = row.detach()
        if self._buf is None:
            cap = 64 if self.max_len is None else min(64, self.max_len)
            self._buf = row.new_empty((cap, *row.shape))
        if self.max_len is not None and self._n >= self.max_len:
            self._buf[self._n % self.max_len].copy_(row)
        else:
            if self._n == self._buf.shape[0]:
                cap = 2 * self._n if self.max_len is None else min(2 * self._n, self.max_len)
                new = self._buf.new_empty((cap, *self._buf.shape[1:]))
                new[: self._n].copy_(self._buf)
                self._buf = new
            self._buf[self._n].copy_(row)
        self._n += 1

    def read(self) -> Tensor:
        if self._buf is None:
            return torch.empty(0)
        if self.max_len is None or self._n <= self.max_len:
            return self._buf[: self._n].clone()
        k = self._n % self.max_len
        return torch.cat([self._buf[k:], self._buf[:k]])

    def clear(self) -> None:
        self._buf, self._n = None, 0


@dataclass
class OLRState:
    """Latest OLR values (shape (P,), ``dtype``, on ``device``; NaN ``eta`` for producers
    without a gradient) and their history (rows ``[eta, lr, base]``, shape (3, P))."""

    device: torch.device
    dtype: torch.dtype
    eta: Tensor | None = None
    lr: Tensor | None = None
    base: Tensor | None = None
    steps: int = 0
    history: DeviceHistory | None = None
    _base_key: tuple[float, ...] | None = field(default=None, repr=False)
    _base_dev: Tensor | None = field(default=None, repr=False)
    _index: dict[tuple[int, ...], Tensor] = field(default_factory=dict, repr=False)

    def read_history(self) -> dict[str, Tensor]:
        """``{"eta", "lr", "base"}`` → (T, P) tensors (copies, on ``device``)."""
        if self.history is None or len(self.history) == 0:
            return {k: torch.empty(0, 0) for k in ("eta", "lr", "base")}
        h = self.history.read()
        return {"eta": h[:, 0], "lr": h[:, 1], "base": h[:, 2]}


def olr_eta(w: Tensor, l: Tensor) -> Tensor:
    r"""``η* = (wᵀw·lᵀw) / (wᵀw·lᵀl + 2(lᵀw)²)`` over the last dim (paper eq. 20).

    ``w``, ``l``: (..., N) flattened weights and gradients, computed in their promoted dtype.
    Scale-safe (:func:`_eta_scaled`): any finite w, l give a finite or NaN η*, never an
    overflowed one. 0/0 (w = 0 or l = 0) gives NaN, which the lr switch treats as "use the
    scheduled lr"."""
    dt = torch.promote_types(w.dtype, l.dtype)
    return _eta_scaled(torch.stack(torch.broadcast_tensors(w.to(dt), l.to(dt)), dim=-2), dt)


def _eta_scaled(X: Tensor, dtype: torch.dtype) -> Tensor:
    r"""η* of rows ``X[..., 0, :] = w``, ``X[..., 1, :] = l``, with the dot products in ``dtype``.

    η* is homogeneous: ``η*(a·w, b·l) = (a/b)·η*(w, l)`` (numerator ∝ a³b, denominator ∝ a²b²).
    So w and l are each divided by their max-abs entry ``s_w``, ``s_l`` (exact; a zero row is
    left as is) before the dot products — which then lie in [0, N] and can neither under- nor
    overflow, also in float32 — and η* = (s_w/s_l)·η*(w/s_w, l/s_l). The ratio is formed in
    ``dtype``; it leaves that dtype's range only where η* itself does (float32: η* > 3.4e38
    becomes inf, which the lr switch maps to the scheduled lr as it would the exact value;
    η* < 1e-45 becomes 0, also mapped to the scheduled lr)."""
    wide = torch.promote_types(X.dtype, dtype)  # divide before rounding to a narrower dtype
    Xw = X.to(wide)
    s = Xw.abs().amax(dim=-1, keepdim=True)
    Xn = (Xw / torch.where(s == 0, 1.0, s)).to(dtype)
    gram = Xn @ Xn.mT
    ww, lw, ll = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    s_w = s[..., 0, 0].to(dtype)
    s_l = torch.where(s[..., 1, 0] == 0, 1.0, s[..., 1, 0]).to(dtype)
    return _eta_from_dots(ww, lw, ll) * (s_w / s_l)


def _eta_from_dots(ww: Tensor, lw: Tensor, ll: Tensor) -> Tensor:
    """η* from the dot products wᵀw, lᵀw, lᵀl (eq. 20)."""
    return ww * lw / (ww * ll + 2.0 * lw * lw)


def _upload(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def olr(
    *, dtype: torch.dtype = torch.float64, history: bool = True, max_history: int | None = None
) -> GradientTransformation:
    r"""Optimal Learning Rate (paper Sec. 5.2, eqs. 18–21). Gradients pass through unchanged.

    Per producer, with ``w`` the flattened parameter and ``l`` its flattened (incoming, e.g.
    post-NOG) gradient:

        η* = (wᵀw · lᵀw) / (wᵀw · lᵀl + 2 (lᵀw)²)
        lr = η*   if 0 < η* < base   else   base,

    where ``base`` is the scheduled lr (``ctx["lrs"]``, one float or 0-d tensor per
    producer). η* ≤ 0, η* ≥ base, and NaN (0/0, from w = 0 or l = 0) all give ``base``: capped
    at the scheduled lr and used only when positive, as the authors' code. The chosen lr is
    returned as ``Updates.lr`` (a (P,) tensor); the gradients pass through unchanged.

    What η* is. Eq. 18 asks for η minimising ‖(W − ηG)(W − ηG)ᵀ − I‖_F, but eq. 19 writes
    (w − ηl)ᵀ(w − ηl) — a scalar, ‖W − ηG‖_F² — in place of WWᵀ and the dropped identity term
    leaves e(η) = ‖W − ηG‖_F⁴. η* is the root of de/dη linearised at η = 0 (one Newton step
    from 0: e′(0) = −4wᵀw·lᵀw, e″(0) = 4wᵀw·lᵀl + 8(lᵀw)²). So η* has no orthogonality left in
    it: for lᵀw > 0 it lies in (0, lᵀw/lᵀl), below the exact minimiser lᵀw/lᵀl of
    ‖W − ηG‖_F, and the step W − η*G always shrinks ‖W‖_F. With a zero-initialised OW
    generator as ``w`` (``ow_target="generator"``) the first η* is 0/0 → the scheduled lr.

    The dot products are computed in ``dtype`` (float64 by default: lᵀw is a cancelling sum
    and its sign decides the switch) on the producers' device, under no grad, without host
    sync, from w/max|w| and l/max|l| (η* is homogeneous of degree (1, −1) in (w, l), so the
    scales are multiplied back as max|w|/max|l|): no overflow or underflow for any finite
    w, l, also with ``dtype=torch.float32``. State: ``state.eta``, ``state.lr``,
    ``state.base`` are (P,) device tensors and each step is appended to ``state.history`` (unless ``history=False``; ``max_history`` keeps the last
    rows only). Float ``lrs`` are uploaded only when they change (pinned, non-blocking).
    """
    if not dtype.is_floating_point:
        raise ConfigError(f"olr: dtype must be floating point, got {dtype}")

    def init(params: Sequence[Tensor]) -> OLRState:
        dev = _counter_device(params)
        dt = torch.float32 if (dtype == torch.float64 and dev.type == "mps") else dtype
        return OLRState(device=dev, dtype=dt, history=DeviceHistory(max_history) if history else None)

    @_pure(OLRState)
    @torch.no_grad()
    def update(
        updates: Updates, state: OLRState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, OLRState]:
        grads = updates.grads
        if params is None:
            raise TreatmentError("olr.update needs the producer parameters (params=)")
        P = len(params)
        lrs = ctx.get("lrs")
        if lrs is None or len(lrs) != P:
            raise ConfigError(f"olr.update needs lrs= with one scheduled lr per producer ({P})")
        dev, cd = state.device, state.dtype
        eta = torch.full((P,), math.nan, dtype=cd, device=dev)
        groups: dict[tuple[int, torch.device], list[int]] = {}
        for i, g in enumerate(grads):
            if g is not None:
                _check_grad(g, i, "OLR")
                groups.setdefault((g.numel(), g.device), []).append(i)
        for (_, gdev), idxs in groups.items():
            # (P, 2, N) rows [w; l] -> one batched Gram [[wᵀw, wᵀl], [lᵀw, lᵀl]] in dtype cd
            X = torch.stack(
                [t for i in idxs for t in (params[i].detach().reshape(-1), grads[i].reshape(-1))]  # type: ignore[union-attr]
            ).reshape(len(idxs), 2, -1)
            e = _eta_scaled(X, cd).to(dev)
            if len(idxs) == P and idxs == list(range(P)):
                eta = e
            else:
                eta.index_copy_(0, _index(state, idxs), e)
        base_key, base_dev = state._base_key, state._base_dev
        if all(not isinstance(x, Tensor) for x in lrs):
            key = tuple(float(x) for x in lrs)  # type: ignore[arg-type]
            if base_key != key or base_dev is None:
                base_dev, base_key = _upload(key, cd, dev), key
            base = base_dev
        else:
            base = torch.stack([torch.as_tensor(x).detach().to(device=dev, dtype=cd).reshape(()) for x in lrs])
        chosen = torch.where((eta > 0) & (eta < base), eta, base)
        if state.history is not None:  # a device buffer, appended in place (no host sync)
            state.history.append(torch.stack([eta, chosen, base]))
        new = dataclasses.replace(
            state, eta=eta, lr=chosen, base=base, steps=state.steps + 1, _base_key=base_key, _base_dev=base_dev
        )
        return Updates(list(grads), chosen), new

    return GradientTransformation(init, update, sets_lr=True)


def _index(state: OLRState, idxs: list[int]) -> Tensor:
    key = tuple(idxs)
    t = state._index.get(key)
    if t is None:
        t = torch.tensor(idxs, dtype=torch.long).to(state.device)
        state._index[key] = t
    return t


# --------------------------------------------------------------------------- chains
class ChainState(tuple):
    """The state of a :func:`named_chain`: a tuple of the member states that is also read by
    name (``state["olr"]``, ``"olr" in state``, ``state.get("olr")``, ``state.names``)."""

    names: tuple[str, ...]

    def __new__(cls, names: Sequence[str], states: Sequence[Any]) -> "ChainState":
        self = super().__new__(cls, tuple(states))
        self.names = tuple(names)
        if len(self.names) != len(self):
            raise ConfigError("ChainState: one name per state is needed")
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy / pickle
        return (self.names, tuple(self))

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self.names.index(key))
            except ValueError:
                raise KeyError(f"no transform named {key!r} in this chain ({', '.join(self.names)})") from None
        return tuple.__getitem__(self, key)

    def __contains__(self, key: Any) -> bool:  # type: ignore[override]
        return key in self.names if isinstance(key, str) else tuple.__contains__(self, key)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.names else default

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(zip(self.names, tuple(self)))

    def replace(self, **states: Any) -> "ChainState":
        """A new ChainState with the named members replaced."""
        for k in states:
            if k not in self.names:
                raise KeyError(f"no transform named {k!r} in this chain ({', '.join(self.names)})")
        return ChainState(self.names, [states.get(n, s) for n, s in self.items()])

    def __repr__(self) -> str:
        return "ChainState(" + ", ".join(f"{n}={s!r}" for n, s in self.items()) + ")"


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Apply ``(name, transform)`` pairs in order (like ``optax.named_chain``).

    The state is a :class:`ChainState`: ``state["name"]`` is that transform's state. Each
    transform gets the :class:`Updates` of the one before (gradients and lr so far), the
    parameters and the context; a transform built with ``sets_lr=False`` keeps the lr so far
    (it may return ``Updates(grads)`` or a plain gradient list; returning another lr raises
    TreatmentError). ``sets_lr`` is true when any member sets an lr."""
    names: list[str] = []
    transforms: list[GradientTransformation] = []
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"named_chain: expected (name, GradientTransformation) pairs, got {item!r}")
        name, t = item
        if not isinstance(t, GradientTransformation):
            raise ConfigError(f"chain: expected GradientTransformation objects, got {type(t).__name__}")
        if name in names:
            raise ConfigError(f"named_chain: the name {name!r} is used twice")
        names.append(name)
        transforms.append(t)
    sets_lr = any(t.sets_lr for t in transforms)

    def init(params: Sequence[Tensor]) -> ChainState:
        return ChainState(names, [t.init(params) for t in transforms])

    @_pure(ChainState)
    def update(
        updates: Updates, state: ChainState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, ChainState]:
        if not isinstance(state, ChainState) or state.names != tuple(names):
            raise TreatmentError(f"chain.update: the state is not this chain's ({', '.join(names)})")
        new_states = []
        for name, t, s in zip(names, transforms, state):
            out = t.update(updates, s, params, ctx)
            if not (isinstance(out, tuple) and len(out) == 2 and not isinstance(out, Updates)):
                raise TreatmentError(f"chain: transform {name!r} must return (updates, new_state)")
            res, ns = out
            if not isinstance(res, Updates):
                res = Updates(list(res), updates.lr)
            if not t.sets_lr and res.lr is None:  # a transform that sets no lr keeps the lr so far
                res = res._replace(lr=updates.lr)
            if res.lr is not updates.lr and not t.sets_lr:
                raise TreatmentError(
                    f"chain: transform {name!r} returned a learning rate but was built with sets_lr=False"
                )
            if len(res.grads) != len(updates.grads):
                raise TreatmentError(
                    f"chain: transform {name!r} returned {len(res.grads)} gradients for {len(updates.grads)}"
                )
            updates = res
            new_states.append(ns)
        return updates, ChainState(names, new_states)

    return GradientTransformation(init, update, sets_lr)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order: :func:`named_chain` with the names ``"0", "1", …`` (the
    state is read by position, ``state[1]``, or by those names)."""
    return named_chain(*((str(i), t) for i, t in enumerate(transforms)))


def default_chain(
    *,
    nog: bool = False,
    olr: bool = False,
    nog_method: str = "auto",
    history: bool = True,
    max_history: int | None = None,
    nog_scale: str = "unit",
    nog_deficient: str = "partial",
) -> GradientTransformation:
    """The chain :func:`orthofx.treatments.attach` builds from a config:
    ``("nog", nog(nog_method, scale=nog_scale, deficient=nog_deficient))`` — or
    ``("guard", guard())`` without NOG, so that non-finite gradients never reach a weight —
    then ``("olr", olr(history=..., max_history=...))`` with OLR."""
    parts: list[tuple[str, GradientTransformation]] = [
        ("nog", _nog(nog_method, scale=nog_scale, deficient=nog_deficient)) if nog else ("guard", guard())
    ]
    if olr:
        parts.append(("olr", _olr(history=history, max_history=max_history)))
    return named_chain(*parts)


_nog, _olr = nog, olr
