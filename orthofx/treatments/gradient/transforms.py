r"""The paper's gradient treatments (Sec. 5) as transforms of the
:class:`~orthofx.treatments.gradient.base.GradientTransformation` protocol (as ``optax``'s
``transform``): :func:`guard`, :func:`nog` (Nearest Orthogonal Gradient) and :func:`olr`
(Optimal Learning Rate), with their states.

* :func:`nog` — ``G ← U Vᵀ`` of the flattened gradient (``G = U S Vᵀ``), all producers of one
  shape in one batched ``orthofx.linalg.polar`` call (``scale``: unit singular values or
  ‖G‖_F; ``deficient``: partial isometry or lifted null space). Its options are a
  :class:`~orthofx.specs.GradientSpec`'s, checked there.
* :func:`guard` — zero (and count) non-finite gradients; count zero gradients.
* :func:`olr` — ``η* = (wᵀw·lᵀw) / (wᵀw·lᵀl + 2(lᵀw)²)`` per producer, returned as
  ``Updates.lr`` when ``0 < η* <`` the scheduled lr; the gradients pass through.

Device counters (zero / non-finite counts) and the OLR history are shared between the old and
the new state and updated in place: no host synchronisation, replayable in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from orthofx.errors import ConfigError, OptionError, TreatmentError
from orthofx.specs import GradientSpec
from orthofx.treatments._common import compute_dtype, flat_shape, polar
from orthofx.treatments.gradient.base import (
    Grads, GradientTransformation, Updates, check_grad, counter_device, pure_update,
)

__all__ = ["GuardState", "NOGState", "OLRState", "DeviceHistory", "guard", "nog", "nog_transform", "olr",
           "olr_eta"]


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

    method: str = GradientSpec.nog_method
    scale: str = GradientSpec.nog_scale
    deficient: str = GradientSpec.nog_deficient


def _new_counters(params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    dev = counter_device(params)
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

    @pure_update(GuardState)
    def update(
        updates: Updates, state: GuardState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, GuardState]:
        grads = updates.grads
        out: Grads = list(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            check_grad(g, i, "guard")
            amax = _absmax(g, dim=None)
            finite = amax < math.inf  # amax ≥ 0: False exactly for NaN/Inf entries
            out[i] = torch.where(finite, g, torch.zeros((), dtype=g.dtype, device=g.device))
            state.nonfinite.add_((~finite).to(state.nonfinite.device, torch.int64))
            state.zero.add_((amax == 0).to(state.zero.device, torch.int64))
        # the counters are device tensors shared with the new state (in place: no host sync)
        return updates._replace(grads=out), dataclasses.replace(state, steps=state.steps + 1)

    return GradientTransformation(init, update)


def nog(
    method: str = GradientSpec.nog_method, *, scale: str = GradientSpec.nog_scale,
    deficient: str = GradientSpec.nog_deficient,
) -> GradientTransformation:
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
      paths alike (tests/test_gradient_scale.py).
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
    try:  # checked by GradientSpec, the one check of NOG's options; errors name nog()'s arguments
        spec = GradientSpec(nog=True, nog_method=method, nog_scale=scale, nog_deficient=deficient)
    except OptionError as exc:
        raise ConfigError(f"nog: {exc.option.removeprefix('nog_')}={exc.value!r}: {exc.problem}") from None
    except ConfigError as exc:
        raise ConfigError(f"nog: {exc}") from None
    return nog_transform(spec)


def nog_transform(spec: GradientSpec) -> GradientTransformation:
    """:func:`nog` with the polar method, scale and deficient of ``spec`` (a checked
    :class:`~orthofx.specs.GradientSpec`: nothing is validated again)."""
    method, scale, deficient = spec.nog_method, spec.nog_scale, spec.nog_deficient

    def init(params: Sequence[Tensor]) -> NOGState:
        z, nf = _new_counters(params)
        return NOGState(zero=z, nonfinite=nf, method=method, scale=scale, deficient=deficient)

    @pure_update(GuardState)
    def update(
        updates: Updates, state: NOGState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, NOGState]:
        grads = updates.grads
        out: Grads = list(grads)
        groups: dict[tuple[int, int, torch.dtype, torch.device], list[int]] = {}
        for i, g in enumerate(grads):
            if g is None:
                continue
            check_grad(g, i, "NOG")
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


#: source dtypes whose dot products float64 holds without scaling: every product of two entries
#: lies in [2e-90, 1.2e77] (float32's extremes squared) and a sum of up to 2⁵³ of them, and the
#: products of such sums in η*'s formula, in [4e-180, 1e170], inside float64's normal range
_FLOAT64_HOLDS = (torch.float32, torch.float16, torch.bfloat16)


def _eta_rows(pairs: Sequence[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """η* of each (w, l) pair (same numel and device), dot products in ``dtype``: (len(pairs),).

    Where ``dtype`` is float64 and the entries are float32/float16/bfloat16 the pairs are stacked
    straight into one float64 (P, 2, N) block (one kernel, cast on write) and need no scaling
    (:data:`_FLOAT64_HOLDS`); otherwise :func:`_eta_scaled` divides by max|·| first."""
    src = pairs[0][0].dtype
    for w, l in pairs:
        src = torch.promote_types(torch.promote_types(src, w.dtype), l.dtype)
    if dtype == torch.float64 and src in _FLOAT64_HOLDS:
        w0 = pairs[0][0]
        X = torch.empty(2 * len(pairs), w0.numel(), dtype=dtype, device=w0.device)
        torch.stack([t.reshape(-1) for pair in pairs for t in pair], out=X)  # one kernel, cast on write
        X = X.reshape(len(pairs), 2, -1)
        gram = X @ X.mT
        return _eta_from_dots(gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1])
    X = torch.stack([t.reshape(-1) for pair in pairs for t in pair]).reshape(len(pairs), 2, -1)
    return _eta_scaled(X, dtype)


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
        dev = counter_device(params)
        dt = torch.float32 if (dtype == torch.float64 and dev.type == "mps") else dtype
        return OLRState(device=dev, dtype=dt, history=DeviceHistory(max_history) if history else None)

    @pure_update(OLRState)
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
                check_grad(g, i, "OLR")
                groups.setdefault((g.numel(), g.device), []).append(i)
        for (_, gdev), idxs in groups.items():
            # (P, 2, N) rows [w; l] -> one batched Gram [[wᵀw, wᵀl], [lᵀw, lᵀl]] in dtype cd
            e = _eta_rows([(params[i].detach(), grads[i]) for i in idxs], cd).to(dev)  # type: ignore[misc]
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
