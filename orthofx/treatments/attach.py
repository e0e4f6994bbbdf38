r"""``attach``: run the gradient treatments (NOG, OLR) where the optimizer sees the gradient.

The treatments are installed as ``optimizer.register_step_pre_hook``: they act on the
gradient the optimizer is about to use, i.e.

* after the DDP all-reduce (a polar factor taken per rank before averaging would differ from
  the single-GPU result — per-parameter autograd hooks fire too early for that),
* after ``GradScaler.unscale_`` (``GradScaler.step`` unscales, then calls ``optimizer.step()``
  only when the gradients are finite, so the hook sees unscaled finite gradients; for
  optimizers that unscale inside their fused kernel — ``fused=True`` — ``GradScaler`` sets
  ``optimizer.grad_scale`` instead and the hook works on ``grad / grad_scale`` and writes back
  ``result · grad_scale``),
* after gradient accumulation over micro-batches (the hook fires once per ``step()``).

``optimizer.step(closure)`` is not supported (the closure computes the gradient *inside*
``step``, after the pre-hook).

Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``): the optimizer holds
``DTensor`` shards and the hook sees the reduce-scattered (averaged) gradient shards. NOG and
OLR need the whole (out, in·k·k) matrix, so the hook gathers each producer's gradient (and, for
OLR, its weight) with ``DTensor.full_tensor()`` — producers are small, the gather is cheap —
computes on the full matrix exactly as a single process would (every rank computes the same
result) and writes back this rank's shard (``distribute_tensor(..., src_data_rank=None)``: a
local split, no communication). Tested with a 1-D mesh (tests/test_fsdp.py).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

try:  # torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import distribute_tensor as _distribute_tensor
except Exception:  # pragma: no cover - builds without torch.distributed
    _DTensor = None  # type: ignore[assignment,misc]
    _distribute_tensor = None  # type: ignore[assignment]

from orthofx.errors import AttachError, ConfigError, TreatmentError
from orthofx.syncs import sync_free_preferred
from orthofx.treatments._common import POLAR_METHODS
from orthofx.treatments.gradient import (
    GradientTransformation,
    GuardState,
    OLRState,
    chain,
    guard,
    nog as _nog,
    olr as _olr,
)

__all__ = ["attach", "AttachHandle", "resolve_producers"]

LRMode = Literal["auto", "float", "tensor", "fold"]
_LR_MODES = ("auto", "float", "tensor", "fold")

_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle]" = weakref.WeakKeyDictionary()
_FOLD_MIN_RATIO = math.sqrt(torch.finfo(torch.float32).tiny)  # ≈ 1.1e-19
_GROUP_SKIP = ("params", "param_names", "lr")


@dataclass
class _Slot:
    name: str
    param: Tensor
    orig: int  # index of the param group that held the parameter
    pos: int  # its position in that group's "params" at attach time
    own: int | None = None  # index of its own group (OLR only); == orig when the producer was
    # the last parameter of its group, which it then keeps (no empty group is left behind)
    pname: str | None = None  # entry of the original group's "param_names", if any


def _is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _full(t: Tensor | None) -> Tensor | None:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it, in
    the same order); a plain tensor as is."""
    return t.full_tensor() if _is_dtensor(t) else t  # type: ignore[union-attr]


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (shares storage with it); a plain tensor as is."""
    return t._local_tensor if _is_dtensor(t) else t  # type: ignore[union-attr]


def _write(g: Tensor, value: Tensor) -> None:
    """``g ← value`` where ``value`` is the whole (unsharded) tensor; a ``DTensor`` ``g`` takes
    its own shard of it (split locally: every rank holds the same ``value``)."""
    if _is_dtensor(g):
        shard = _distribute_tensor(value, g.device_mesh, g.placements, src_data_rank=None)  # type: ignore[union-attr,misc]
        _local(g).copy_(shard._local_tensor)
    else:
        g.copy_(value)


# --------------------------------------------------------------------------- producers
def _resolve_one(spec: Any, i: int) -> tuple[str, Tensor]:
    if isinstance(spec, Tensor):
        return f"producer[{i}]", spec
    if isinstance(spec, tuple) and len(spec) == 2:
        a, b = spec
        if isinstance(a, nn.Module) and isinstance(b, str):
            return f"{type(a).__name__}.{b}", _module_param(a, b)
        if isinstance(a, str) and isinstance(b, Tensor):
            return a, b
        if isinstance(a, str) and isinstance(b, tuple):
            return a, _resolve_one(b, i)[1]
    raise AttachError(
        f"producer #{i}: expected a parameter tensor, a (module, 'weight') pair or a "
        f"(name, parameter) pair, got {type(spec).__name__}"
    )


def _module_param(module: nn.Module, name: str) -> Tensor:
    if parametrize.is_parametrized(module, name):
        # a parametrized weight is optimized through its unconstrained tensor
        return module.parametrizations[name].original
    t = getattr(module, name, None)
    if not isinstance(t, Tensor):
        raise AttachError(f"{type(module).__name__} has no tensor named {name!r}")
    return t


def resolve_producers(
    producers: "Mapping[str, Any] | Iterable[Any]",
) -> list[tuple[str, Tensor]]:
    """Normalise producer specs to ``[(name, parameter)]`` (duplicates removed, order kept).

    Accepted: a mapping ``{name: spec}`` or an iterable of specs, where a spec is a parameter
    tensor, a ``(module, "weight")`` pair (a parametrized weight resolves to
    ``module.parametrizations.weight.original``, the tensor the optimizer updates) or a
    ``(name, spec)`` pair (e.g. from ``named_parameters()``)."""
    if isinstance(producers, (Tensor, nn.Module)):
        raise AttachError("producers must be a list or mapping of parameters, not a single object")
    if isinstance(producers, Mapping):
        items = [(str(k), _resolve_one(v, i)[1]) for i, (k, v) in enumerate(producers.items())]
    else:
        items = [_resolve_one(s, i) for i, s in enumerate(producers)]
    seen: set[int] = set()
    out: list[tuple[str, Tensor]] = []
    for name, p in items:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _option(config: Any, key: str, explicit: Any, default: Any) -> Any:
    if explicit is not None:
        return explicit
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


# --------------------------------------------------------------------------- handle
class AttachHandle:
    """What :func:`attach` returns: ``remove()``, ``stats()``, ``olr_history()``.

    Attributes:
        names: producer names, in the order used by all per-producer outputs.
        nog, olr, nog_method: the active options.
        lr_mode: how OLR learning rates reach the optimizer (resolved, never ``"auto"``).
        transform: the gradient chain (:func:`orthofx.treatments.gradient.chain`) and
        state: its state (counters and OLR values live on the producers' device).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        slots: list[_Slot],
        *,
        nog: bool,
        olr: bool,
        nog_method: str,
        lr_mode: str,
        history: bool,
        max_history: int | None,
    ) -> None:
        self._opt = weakref.ref(optimizer)
        self._slots = slots
        self.names: tuple[str, ...] = tuple(s.name for s in slots)
        self.nog, self.olr, self.nog_method, self.lr_mode = nog, olr, nog_method, lr_mode
        parts: list[GradientTransformation] = [_nog(nog_method) if nog else guard()]
        if olr:
            parts.append(_olr(history=history, max_history=max_history))
        self.transform = chain(*parts)
        self._params = [s.param for s in slots]
        self.state: tuple[Any, ...] = self.transform.init(self._params)
        self._lr_tensors: list[Tensor] = []
        self._fold_pending: list[tuple[Tensor, Tensor]] = []
        # (group, {key: value}) to put back after the step: the hyperparameters of a kept group
        # (own == orig) that the step changes (lr; weight decay for "fold")
        self._restore: list[tuple[dict, dict[str, Any]]] = []
        self._hooks: list[Any] = []
        self._removed = False

    # ---------------------------------------------------------------- public
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        opt = self._opt()
        if opt is None:
            raise AttachError("the optimizer of this handle no longer exists")
        return opt

    @property
    def removed(self) -> bool:
        return self._removed

    @property
    def options(self) -> dict[str, Any]:
        return {"nog": self.nog, "olr": self.olr, "nog_method": self.nog_method, "lr_mode": self.lr_mode}

    def remove(self) -> None:
        """Detach: remove the hooks and (OLR) put every producer back at its place in its
        original param group, keeping its optimizer state (momentum). Idempotent."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._restore_groups()
        opt = self._opt()
        if opt is not None and self.olr:
            moved = [s for s in self._slots if s.own != s.orig]
            for s in sorted(moved, key=lambda s: -(s.own or 0)):
                if s.own is not None and s.own < len(opt.param_groups):
                    if any(q is s.param for q in opt.param_groups[s.own]["params"]):
                        del opt.param_groups[s.own]
            for s in sorted(moved, key=lambda s: (s.orig, s.pos)):
                g = opt.param_groups[s.orig]
                g["params"].insert(s.pos, s.param)
                if s.pname is not None and "param_names" in g:
                    g["param_names"].insert(s.pos, s.pname)
        if opt is not None and _ATTACHED.get(opt) is self:
            del _ATTACHED[opt]
        self._removed = True

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def guard_state(self) -> GuardState:
        return self.state[0]

    @property
    def olr_state(self) -> OLRState | None:
        return self.state[1] if self.olr else None

    def stats(self) -> dict[str, Any]:
        """Host values (one sync): ``steps``, ``zero_grads``, ``nonfinite_grads`` (counted over
        all producers and steps), options, names and, with OLR, the last ``eta``/``lr``/``base``
        per producer name."""
        gs = self.guard_state
        out: dict[str, Any] = {
            "producers": list(self.names),
            **self.options,
            "steps": gs.steps,
            "zero_grads": int(gs.zero),
            "nonfinite_grads": int(gs.nonfinite),
        }
        st = self.olr_state
        if st is not None and st.lr is not None:
            for key in ("eta", "lr", "base"):
                vals = getattr(st, key).tolist()
                out[f"last_{key}"] = dict(zip(self.names, vals))
        return out

    def olr_history(self) -> dict[str, Tensor]:
        """``{"eta", "lr", "base"}`` → (steps, producers) tensors: η*, the lr used and the
        scheduled lr at every step (on the producers' device; empty without OLR/history)."""
        st = self.olr_state
        if st is None:
            return {k: torch.empty(0, 0) for k in ("eta", "lr", "base")}
        return st.read_history()

    def reset_stats(self) -> None:
        """Zero the counters and clear the OLR history."""
        gs = self.guard_state
        gs.zero.zero_()
        gs.nonfinite.zero_()
        gs.steps = 0
        st = self.olr_state
        if st is not None and st.history is not None:
            st.history.clear()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached"
        return f"AttachHandle({state}, producers={list(self.names)}, {self.options})"

    # ---------------------------------------------------------------- hooks
    def _install(self, opt: torch.optim.Optimizer) -> None:
        self._hooks.append(opt.register_step_pre_hook(self._pre_hook))
        if self.olr:
            self._hooks.append(opt.register_step_post_hook(self._post_hook))
            self._hooks.append(opt.register_load_state_dict_pre_hook(self._load_pre_hook))

    def _restore_groups(self) -> None:
        for group, values in self._restore:
            group.update(values)
        self._restore.clear()

    def _load_pre_hook(self, opt: torch.optim.Optimizer, state_dict: dict) -> dict | None:
        """``optimizer.load_state_dict`` after attach: a state saved after attach (same group
        count) loads as is; a state saved *before* attach (or by an optimizer that never had
        OLR) is laid out as attach lays out the groups — each producer taken out of its saved
        group into its own group, with the saved group's hyperparameters; anything else raises
        an :class:`AttachError` that says how the group counts came about."""
        saved = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if self._removed or not isinstance(saved, list):
            return None
        moved = sorted((s for s in self._slots if s.own != s.orig), key=lambda s: s.own)  # type: ignore[arg-type,return-value]
        n_now = len(opt.param_groups)
        n_before = n_now - len(moved)
        if len(saved) == n_now:
            return None
        name = type(opt).__name__
        if len(saved) != n_before:
            raise AttachError(
                f"{name}.load_state_dict: the saved state has {len(saved)} param group(s); this {name} "
                f"has {n_now} since orthofx.attach with OLR moved {len(moved)} producer(s) into param "
                f"groups of their own ({n_before} before). A state saved after attach loads into an "
                "optimizer built the same way *after* orthofx.attach(opt, model) — call attach before "
                "opt.load_state_dict(...) — and a state saved before attach loads before or after it."
            )
        groups = [dict(g) for g in saved]
        for g in groups:
            g["params"] = list(g["params"])
            if "param_names" in g:
                g["param_names"] = list(g["param_names"])
        taken: dict[int, tuple[Any, Any]] = {}
        for s in sorted(moved, key=lambda s: (s.orig, -s.pos)):
            g = groups[s.orig]
            if s.pos >= len(g["params"]):
                raise AttachError(
                    f"{name}.load_state_dict: saved param group {s.orig} has {len(g['params'])} "
                    f"parameter(s); producer {s.name!r} was at position {s.pos} of it when orthofx.attach ran"
                )
            names = g.get("param_names")
            taken[id(s)] = (g["params"].pop(s.pos), names.pop(s.pos) if names and s.pos < len(names) else None)
        for s in moved:
            idx, pname = taken[id(s)]
            new = {k: v for k, v in saved[s.orig].items() if k not in ("params", "param_names")}
            new["params"] = [idx]
            if pname is not None:
                new["param_names"] = [pname]
            groups.insert(s.own, new)  # type: ignore[arg-type]
        return {**state_dict, "param_groups": groups}

    def _check_groups(self, opt: torch.optim.Optimizer) -> None:
        if not self.olr:
            return
        for s in self._slots:
            ok = s.own is not None and s.own < len(opt.param_groups)
            ok = ok and len(opt.param_groups[s.own]["params"]) == 1  # type: ignore[index]
            ok = ok and opt.param_groups[s.own]["params"][0] is s.param  # type: ignore[index]
            if not ok:
                raise AttachError(
                    f"the param groups of {type(opt).__name__} changed after orthofx.attach "
                    f"(producer {s.name!r} is no longer alone in group {s.own}); "
                    "call handle.remove() before editing param groups, then attach again"
                )

    @torch.no_grad()
    def _pre_hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # args = (optimizer, *step_args): step(closure) puts the closure at args[1]
        if any(callable(a) for a in args[1:]) or kwargs.get("closure") is not None:
            raise AttachError(
                "orthofx.attach does not support optimizer.step(closure): the gradient is "
                "computed inside step(), after the treatments would run"
            )
        self._check_groups(opt)
        self._restore_groups()  # a previous step that raised never reached the post-hook
        params = self._params
        grads: list[Tensor | None] = [p.grad for p in params]
        scale = getattr(opt, "grad_scale", None)
        scale = scale if isinstance(scale, Tensor) else None
        # sharded (FSDP2 DTensor) gradients: NOG/OLR act on the whole matrix, gathered here
        sharded = any(_is_dtensor(g) for g in grads)
        work: list[Tensor | None] = [_full(g) for g in grads] if sharded else grads
        tparams = [_full(p) for p in params] if (sharded and self.olr) else params  # OLR's wᵀw, lᵀw
        if scale is not None:  # fused optimizer under GradScaler: grads are still scaled
            work = [None if g is None else g.float() / scale.to(g.device) for g in work]
        # the scheduled hyperparameters of each producer's original group, read before the step
        # changes any (a kept group, own == orig, carries the OLR lr during the step only)
        hyper = {
            s.orig: {k: v for k, v in opt.param_groups[s.orig].items() if k not in ("params", "param_names")}
            for s in self._slots
        }
        lrs = [hyper[s.orig]["lr"] for s in self._slots] if self.olr else None
        new = self.transform.update(work, tparams, self.state, lrs=lrs)
        for g, n in zip(grads, new):
            if g is not None and n is not None:
                _write(g, n if scale is None else n * scale.to(n.device))
        if self.olr:
            self._apply_lrs(opt, grads, scale, hyper)

    def _apply_lrs(
        self, opt: torch.optim.Optimizer, grads: list[Tensor | None], scale: Tensor | None,
        hyper: dict[int, dict[str, Any]],
    ) -> None:
        st = self.olr_state
        assert st is not None and st.lr is not None
        for s in self._slots:
            own = opt.param_groups[s.own]  # type: ignore[index]
            if s.own == s.orig:  # the producer kept its group: put back what the step changes
                keys = ("lr", "weight_decay") if self.lr_mode == "fold" else ("lr",)
                self._restore.append((own, {k: own[k] for k in keys if k in own}))
                continue
            for k, v in hyper[s.orig].items():
                if k not in _GROUP_SKIP:
                    own[k] = v
        if self.lr_mode == "float":
            vals = st.lr.tolist()  # one host transfer for all producers
            for s, v in zip(self._slots, vals):
                opt.param_groups[s.own]["lr"] = v  # type: ignore[index]
        elif self.lr_mode == "tensor":
            if not self._lr_tensors:
                self._lr_tensors = [torch.zeros((), dtype=torch.float32, device=s.param.device) for s in self._slots]
            for i, s in enumerate(self._slots):
                t = self._lr_tensors[i]
                t.copy_(st.lr[i])
                opt.param_groups[s.own]["lr"] = t  # type: ignore[index]
        else:  # fold
            ratio = torch.where(st.base > 0, st.lr / st.base, torch.ones_like(st.lr)).clamp_min(_FOLD_MIN_RATIO)
            self._fold_pending.clear()
            for i, s in enumerate(self._slots):
                orig, own = hyper[s.orig], opt.param_groups[s.own]  # type: ignore[index]
                own["lr"] = orig["lr"]
                own["weight_decay"] = 0.0
                g = grads[i]
                if g is None:
                    continue
                # c is one number per producer: a DTensor's shards are scaled in place
                g, p = _local(g), _local(s.param)
                buf = opt.state.get(s.param, {}).get("momentum_buffer")
                c = ratio[i].to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
                wd = orig.get("weight_decay", 0.0)
                sign = -1.0 if orig.get("maximize", False) else 1.0
                if scale is None:  # in place: g ← c·(g + wd·w), two kernels
                    if wd:
                        g.add_(p, alpha=sign * wd)
                    g.mul_(c)
                else:
                    gu = g.float() / scale.to(g.device)
                    folded = c * (gu + (sign * wd) * p) if wd else c * gu
                    g.copy_(folded * scale.to(g.device))
                if buf is not None:
                    _local(buf).mul_(c)
                self._fold_pending.append((s.param, c))

    @torch.no_grad()
    def _post_hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for p, c in self._fold_pending:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                _local(buf).div_(c)
        self._fold_pending.clear()
        self._restore_groups()


# --------------------------------------------------------------------------- attach
def attach(
    optimizer: torch.optim.Optimizer,
    producers: "Mapping[str, Any] | Iterable[Any]",
    config: Any = None,
    *,
    nog: bool | None = None,
    olr: bool | None = None,
    nog_method: str | None = None,
    lr_mode: LRMode = "auto",
    history: bool = True,
    max_history: int | None = None,
) -> AttachHandle:
    r"""Apply NOG and/or OLR to the producer parameters at every ``optimizer.step()``.

    Args:
        optimizer: a ``torch.optim.Optimizer`` that holds every producer parameter.
        producers: the Pre-SVD parameters (see :func:`resolve_producers`: tensors,
            ``(module, "weight")`` pairs, ``(name, tensor)`` pairs or a ``{name: spec}`` map).
        config: anything with attributes (``OrthoConfig``) or keys ``nog``, ``olr``,
            ``nog_method``; the explicit keyword arguments override it.
        nog: replace each producer gradient by the polar factor U Vᵀ of its flattened
            gradient (:func:`orthofx.treatments.gradient.nog`; batched per shape).
        olr: per-step lr ``η*`` if ``0 < η* < lr_sched`` else ``lr_sched``
            (:func:`orthofx.treatments.gradient.olr`), computed on the NOG gradient when NOG
            is on. ``lr_sched`` is the **current** lr of the producer's original param group,
            read at every step, so LR schedulers keep working.
        nog_method: ``orthofx.linalg.polar`` method (default ``"auto"``: sync-free Polar
            Express on CUDA, float64 Gram eigh on the CPU; ``"svd"`` is the paper's literal one).
        lr_mode: how the OLR lr reaches the optimizer (the η* computation itself never syncs):

            * ``"float"``: one host transfer per step for all producers
              (``lrs.tolist()``), then plain float lrs — works with every optimizer;
            * ``"tensor"``: a persistent 0-d float32 tensor (no grad) per producer group,
              updated on the device. Sync-free when the optimizer consumes tensor lrs on the
              device (``fused=True`` SGD/Adam, ``capturable=True`` Adam); torch's foreach/
              for-loop SGD calls ``.item()`` on it (one sync per producer);
            * ``"fold"`` (``torch.optim.SGD`` only): sync-free. The group keeps the float
              scheduled lr and ``c = lr_olr / lr_sched`` is folded in on the device: before the
              step ``grad ← c·(grad + wd·w)`` (the group's weight decay is set to 0) and the
              momentum buffer ``← c·buf``; after the step ``buf ← buf / c``. Since SGD is
              linear in (grad, buf), the update is exactly ``−lr_olr·(…)`` and the buffer is
              the one plain SGD would hold (up to rounding; c is clamped at ≥ 1.1e-19);
            * ``"auto"``: ``"tensor"`` for fused/capturable groups, ``"fold"`` for SGD with
              CUDA parameters (or inside ``orthofx.syncs.cuda_policy()``), else ``"float"``
              (free on the CPU; on CUDA it warns, since it costs one sync per step).
        history: keep every step's η*, lr and scheduled lr (device tensors).
        max_history: keep only the last ``max_history`` steps.

    With OLR each producer moves into its **own param group**, a copy of its original group's
    hyperparameters (momentum, weight decay, nesterov, …, re-copied at every step so that
    schedulers of e.g. momentum also apply); its optimizer state (momentum buffer) is kept.
    LR schedulers may step the new groups: their lr is overwritten before every step. No
    group is left empty: when every parameter of a group is a producer, the first of them
    keeps that group (its lr holds the OLR value during ``step()`` only and is the scheduled
    one again afterwards), so group indices never shift. Call ``handle.remove()`` before
    editing the param groups.

    Optimizer state dicts: the group count can change at attach, so **call attach before**
    ``optimizer.load_state_dict(...)``. After attach, a state saved after attach loads as is,
    a state saved before attach is split the way attach splits the groups, and any other
    group count raises :class:`AttachError` explaining the counts. (A state saved after attach
    cannot be loaded into an optimizer that was not attached yet: torch itself refuses it —
    "different number of parameter groups" — before any orthofx code runs.)

    Sharded training (FSDP2 ``fully_shard``): pass the optimizer over the sharded (DTensor)
    parameters; NOG and OLR gather each producer's gradient (and weight, for OLR) and act on
    the whole matrix, as a single process would.

    Gradients holding NaN/Inf are replaced by zero and counted (``handle.stats()``); zero
    gradients stay zero and are counted. Weights therefore stay finite.

    Attaching the same producers with the same options twice returns the existing handle;
    anything else on an optimizer that already has a handle raises :class:`AttachError`.

    Raises:
        AttachError: not an optimizer, no producers, a producer not held by the optimizer,
            a producer that does not require grad, or a conflicting earlier attach.
        TreatmentError: a non-float producer, or a 1-D producer with NOG.
        ConfigError: unknown ``nog_method`` or ``lr_mode``, ``lr_mode="fold"`` with a
            non-SGD optimizer, or OLR on an optimizer without an ``lr`` hyperparameter.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AttachError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(config, str):
        from orthofx.config import resolve_config

        config = resolve_config(config)
    use_nog = bool(_option(config, "nog", nog, False))
    use_olr = bool(_option(config, "olr", olr, False))
    method = _option(config, "nog_method", nog_method, "auto")
    if use_nog and method not in POLAR_METHODS:
        raise ConfigError(f"nog_method={method!r}; use one of {POLAR_METHODS}")
    if lr_mode not in _LR_MODES:
        raise ConfigError(f"lr_mode={lr_mode!r}; use one of {_LR_MODES}")

    items = resolve_producers(producers)
    if not items:
        raise AttachError("attach: no producer parameters were given")
    for name, p in items:
        if not p.is_floating_point():
            raise TreatmentError(
                f"producer {name!r} has dtype {p.dtype}; NOG/OLR need a floating-point weight"
            )
        if use_nog and p.ndim < 2:
            raise TreatmentError(f"producer {name!r} has shape {tuple(p.shape)}; NOG needs a weight with >= 2 dims")
        if not p.requires_grad:
            raise AttachError(f"producer {name!r} does not require grad, so it is never updated")

    where: dict[int, tuple[int, int]] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, q in enumerate(group["params"]):
            where.setdefault(id(q), (gi, pi))
    missing = [(n, p) for n, p in items if id(p) not in where]
    if missing:
        desc = ", ".join(f"{n!r} {tuple(p.shape)}" for n, p in missing)
        raise AttachError(
            f"{type(optimizer).__name__} does not hold the producer parameter(s) {desc}. Build the "
            "optimizer from the transformed model's parameters (a parametrized weight is "
            "optimized through `<module>.parametrizations.weight.original`)."
        )

    prev = _ATTACHED.get(optimizer)
    if prev is not None and not prev.removed:
        same = [id(p) for p in prev._params] == [id(p) for _, p in items]
        same = same and (prev.nog, prev.olr) == (use_nog, use_olr)
        same = same and (not use_nog or prev.nog_method == method)
        same = same and (lr_mode == "auto" or prev.lr_mode == lr_mode)
        if same:
            return prev
        raise AttachError(
            f"{type(optimizer).__name__} already has orthofx treatments attached "
            f"({prev!r}); call handle.remove() first"
        )

    slots = [_Slot(name=n, param=p, orig=where[id(p)][0], pos=where[id(p)][1]) for n, p in items]
    mode = _resolve_lr_mode(optimizer, slots, lr_mode, use_olr)
    if use_olr and lr_mode == "auto" and mode == "float" and any(sync_free_preferred(s.param.device) for s in slots):
        warnings.warn(
            f"orthofx.attach: OLR with {type(optimizer).__name__} on CUDA hands the learning rate to the "
            "optimizer as a float, one host sync per step. For a sync-free step use torch.optim.SGD "
            "(lr_mode='fold') or an optimizer with fused=True / capturable=True (lr_mode='tensor'); "
            "pass lr_mode='float' to silence this.",
            stacklevel=2,
        )
    handle = AttachHandle(
        optimizer, slots, nog=use_nog, olr=use_olr, nog_method=method, lr_mode=mode,
        history=history, max_history=max_history,
    )
    if use_olr:
        _split_groups(optimizer, slots)
    handle._install(optimizer)
    _ATTACHED[optimizer] = handle
    return handle


def _resolve_lr_mode(opt: torch.optim.Optimizer, slots: list[_Slot], lr_mode: str, use_olr: bool) -> str:
    if not use_olr:
        return "float" if lr_mode == "auto" else lr_mode
    groups = [opt.param_groups[s.orig] for s in slots]
    for s, g in zip(slots, groups):
        if "lr" not in g:
            raise ConfigError(f"OLR: the param group of producer {s.name!r} has no 'lr' hyperparameter")
    is_sgd = isinstance(opt, torch.optim.SGD)
    if lr_mode == "fold":
        if not is_sgd:
            raise ConfigError(f"lr_mode='fold' needs torch.optim.SGD, got {type(opt).__name__}")
        if any(g.get("differentiable", False) for g in groups):
            raise ConfigError("lr_mode='fold' does not support differentiable=True")
        return "fold"
    if lr_mode != "auto":
        return lr_mode
    if any(g.get("fused") or g.get("capturable") for g in groups):
        return "tensor"
    if is_sgd and all(sync_free_preferred(s.param.device) for s in slots) and not any(
        g.get("differentiable", False) for g in groups
    ):
        return "fold"
    return "float"


def _split_groups(opt: torch.optim.Optimizer, slots: Sequence[_Slot]) -> None:
    """Move each producer into its own param group copying its original group's options.

    A group whose parameters are all producers is never left empty: its first producer keeps
    it as its own group (``own == orig``) and only the others move. Empty groups would confuse
    code that walks ``param_groups`` (torch's distributed checkpoint refuses more than one), and
    keeping the group, rather than deleting it, leaves every group index — and so the per-group
    lists of LR schedulers created before or after attach — where it was."""
    by_group: dict[int, list[_Slot]] = {}
    for s in slots:
        by_group.setdefault(s.orig, []).append(s)
    for gi, ss in by_group.items():
        if len(ss) == len(opt.param_groups[gi]["params"]):
            keep = min(ss, key=lambda s: s.pos)
            keep.own = gi
            names = opt.param_groups[gi].get("param_names")
            if names is not None and keep.pos < len(names):
                keep.pname = names[keep.pos]
    moving = [s for s in slots if s.own is None]
    # remove from the original groups, highest position first so positions stay valid
    for s in sorted(moving, key=lambda s: (s.orig, -s.pos)):
        g = opt.param_groups[s.orig]
        assert g["params"][s.pos] is s.param
        del g["params"][s.pos]
        if "param_names" in g:
            s.pname = g["param_names"].pop(s.pos)
    for s in moving:
        g = opt.param_groups[s.orig]
        new = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        new["params"] = [s.param]
        if s.pname is not None:
            new["param_names"] = [s.pname]
        opt.add_param_group(new)
        s.own = len(opt.param_groups) - 1
