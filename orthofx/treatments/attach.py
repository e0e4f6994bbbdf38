r"""``attach``: run a gradient chain (NOG, OLR, or your own) where the optimizer sees the gradient.

This module is the thin installer of a :class:`~orthofx.specs.GradientSpec` (every option is
checked and defaulted there, once); the pieces live next to it:
:mod:`~orthofx.treatments.options` (producer specs; the spec and keywords → ``AttachOptions``),
:mod:`~orthofx.treatments.handle_stats` (what the handle reports: ``stats()``, ``olr_history()``),
:mod:`~orthofx.treatments.groups` (one param group per producer when the chain sets lrs),
:mod:`~orthofx.treatments.lr` (how ``Updates.lr`` reaches the optimizer: float/tensor/fold),
:mod:`~orthofx.treatments.sharding` (FSDP2 DTensor gather / shard write-back) and
:mod:`~orthofx.treatments.gradient` (the transforms and chains).

The chain is installed as ``optimizer.register_step_pre_hook``: it acts on the
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
OLR or a custom chain, its weight) with ``DTensor.full_tensor()`` — producers are small, the gather is cheap —
computes on the full matrix exactly as a single process would (every rank computes the same
result) and writes back this rank's shard (``distribute_tensor(..., src_data_rank=None)``: a
local split, no communication). Tested with a 1-D mesh (tests/test_fsdp.py).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from orthofx._deprecation import warn_deprecated
from orthofx.errors import AttachError, ConfigError, TreatmentError
from orthofx.specs import GradientSpec
from orthofx.treatments.gradient import GradientTransformation, Updates, named_chain
from orthofx.treatments.guidance import AdaptiveOptimizerWarning, adaptive_message, is_adaptive, should_warn
from orthofx.treatments.groups import Slot, check_groups, locate, scheduled, split_groups, split_saved_state, unsplit_groups
from orthofx.treatments.lr import LRDelivery, LRMode, resolve_lr_mode, warn_if_syncing
from orthofx.treatments.handle_stats import HandleStats
from orthofx.treatments.options import AttachOptions, check_producers, ow_producers, parse_options, resolve_producers
from orthofx.treatments.ow_target import WeightGradCapture, is_free, rebase, weight_target
from orthofx.treatments.sharding import full, is_dtensor, write

__all__ = ["attach", "AttachHandle", "resolve_producers"]

_ATTACHED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- handle
class AttachHandle(HandleStats):
    """What :func:`attach` returns: ``remove()``, and the readings of
    :class:`~orthofx.treatments.handle_stats.HandleStats` (``stats()``, ``olr_history()``).

    Attributes:
        active: False for a handle that installed nothing (:meth:`inactive`).
        names: producer names, in the order used by all per-producer outputs.
        spec: the :class:`~orthofx.specs.GradientSpec` the handle runs (checked once, there).
        nog, olr, nog_method: the active options (with a custom chain: ``nog=False``,
            ``nog_method=None`` and ``olr`` = the chain's ``sets_lr``).
        lr_mode: how the chain's learning rates reach the optimizer (resolved, never ``"auto"``).
        ow_target: what the chain acts on for OW producers — ``"weight"`` (W = Φ(A), the
            chain wrapped in :func:`~orthofx.treatments.ow_target.weight_target`),
            ``"generator"`` (A), or None when no producer carries OW.
        transform: the gradient chain (a :class:`~orthofx.treatments.gradient.GradientTransformation`) and
        state: its current state (replaced at every step; a
            :class:`~orthofx.treatments.gradient.ChainState` for named chains, read by name:
            ``handle.state["olr"]``; counters and OLR values live on the producers' device).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        slots: list[Slot],
        opts: AttachOptions,
        lr_mode: str,
        transform: GradientTransformation | None = None,
        ow_target: str | None = None,
        capture: WeightGradCapture | None = None,
    ) -> None:
        self._opt = weakref.ref(optimizer)
        self._slots = slots
        self._opts = opts
        self.names: tuple[str, ...] = tuple(s.name for s in slots)
        self.spec = opts.spec
        self.nog = opts.nog
        self.olr = opts.sets_lr
        self.nog_method: str | None = None if opts.custom else opts.spec.nog_method
        self.lr_mode = lr_mode
        self.ow_target = ow_target
        #: False for :meth:`inactive` handles, which act on nothing
        self.active = True
        self._capture = capture
        #: (parametrization, generator) of the OW maps re-based after every step (ow_target="weight")
        self._rebase = [(m, s.param) for m, s in zip(capture.maps, slots) if m is not None] if capture else []
        self.transform = opts.transform() if transform is None else transform
        self._params = [s.param for s in slots]
        self.state: Any = self.transform.init(self._params)
        self._lr = LRDelivery(lr_mode)
        self._steps = 0
        self._hooks: list[Any] = []
        self._removed = False
        #: skip_nonfinite="model": (finite flag, saved params, saved optimizer state) of this step
        self.skip_nonfinite: str | None = None
        self._saved: tuple[Tensor, list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor | None]]] | None = None
        self._skipped: Tensor | None = None

    @classmethod
    def inactive(cls, optimizer: torch.optim.Optimizer, names: Iterable[str] = ()) -> "AttachHandle":
        """A handle that installs nothing (no hook, no param group change): what
        :func:`orthofx.attach` returns when the config has no gradient treatment. ``names``: the
        model's Pre-SVD layers, listed by ``stats()["producers"]``; ``stats()`` has no NOG/OLR
        entries and ``steps`` stays 0."""
        handle = cls(optimizer, [], AttachOptions(GradientSpec()), "float", named_chain())
        handle.names = tuple(names)
        handle.active = False
        return handle

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
        """The active options: ``nog``, ``olr``, ``nog_method``, ``lr_mode``, ``ow_target``, with
        NOG also ``nog_scale``/``nog_deficient``, with a custom chain its member names."""
        out: dict[str, Any] = {"nog": self.nog, "olr": self.olr, "nog_method": self.nog_method, "lr_mode": self.lr_mode,
                               "ow_target": self.ow_target}
        if self.nog:  # NOG's two choices (orthofx.treatments.gradient.nog)
            out.update(nog_scale=self.spec.nog_scale, nog_deficient=self.spec.nog_deficient)
        if self._opts.custom:
            out["chain"] = self.chain_names
        return out

    def remove(self) -> None:
        """Detach: remove the hooks and (OLR) put every producer back at its place in its
        original param group, keeping its optimizer state (momentum). Idempotent."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._capture is not None:
            self._capture.remove()
        self._lr.restore_groups()
        opt = self._opt()
        if opt is not None and self.olr:
            unsplit_groups(opt, self._slots)
        if opt is not None and _ATTACHED.get(opt) is self:
            del _ATTACHED[opt]
        self._removed = True

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "attached" if self.active else "inactive"
        return f"AttachHandle({state}, producers={list(self.names)}, {self.options})"

    # ---------------------------------------------------------------- hooks
    def _install(self, opt: torch.optim.Optimizer, step_hooks: bool = True) -> None:
        """Register the hooks; ``step_hooks=False`` leaves the step to the caller, who runs
        :meth:`before_step` / :meth:`after_step` around the optimizer's own update
        (``orthofx.optim.OrthoSGD``)."""
        if step_hooks:
            self._hooks.append(opt.register_step_pre_hook(self._pre_hook))
        if step_hooks and (self.olr or self._rebase or self.skip_nonfinite):
            self._hooks.append(opt.register_step_post_hook(self._post_hook))
        if self.olr:
            self._hooks.append(opt.register_load_state_dict_pre_hook(self._load_pre_hook))
        self._rebase_all()  # ow_target="weight": every step starts at A = 0

    def before_step(self, opt: torch.optim.Optimizer) -> None:
        """Run the chain on the producers' gradients (what the step pre-hook does)."""
        if not self._removed:
            self._pre_hook(opt, (opt,), {})

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        """Finish the lr delivery and re-base OW maps after the update (what the step post-hook does)."""
        if not self._removed and (self.olr or self._rebase or self.skip_nonfinite):
            self._post_hook(opt, (opt,), {})

    def _load_pre_hook(self, opt: torch.optim.Optimizer, state_dict: dict) -> dict | None:
        """``optimizer.load_state_dict`` after attach (:func:`groups.split_saved_state`)."""
        if self._removed:
            return None
        return split_saved_state(opt, self._slots, state_dict)

    @torch.no_grad()
    def _pre_hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # args = (optimizer, *step_args): step(closure) puts the closure at args[1]
        if any(callable(a) for a in args[1:]) or kwargs.get("closure") is not None:
            raise AttachError(
                "orthofx.attach does not support optimizer.step(closure): the gradient is "
                "computed inside step(), after the treatments would run"
            )
        if self.olr:
            check_groups(opt, self._slots)
        self._lr.restore_groups()  # a previous step that raised never reached the post-hook
        if self.skip_nonfinite:
            self._save_model(opt)
        params = self._params
        grads: list[Tensor | None] = [p.grad for p in params]
        scale = getattr(opt, "grad_scale", None)
        scale = scale if isinstance(scale, Tensor) else None
        # sharded (FSDP2 DTensor) gradients: the chain acts on the whole matrix, gathered here
        sharded = any(is_dtensor(g) for g in grads)
        work: list[Tensor | None] = [full(g) for g in grads] if sharded else grads
        # the weights are gathered for OLR's wᵀw, lᵀw (and for any custom chain)
        gather_w = self.olr or self._opts.custom or self.ow_target == "weight"
        tparams = [full(p) for p in params] if (sharded and gather_w) else params
        if scale is not None:  # fused optimizer under GradScaler: grads are still scaled
            work = [None if g is None else g.float() / scale.to(g.device) for g in work]
        hyper = scheduled(opt, self._slots)
        lrs = [hyper[s.orig].get("lr") for s in self._slots]
        ctx: dict[str, Any] = {"lrs": lrs} if all(v is not None for v in lrs) else {}
        if self._capture is not None:  # ∂L/∂W of OW weights (their normal part), ow_target="weight"
            ctx["weight_grads"] = self._capture.take()
        out = self.transform.update(Updates(list(work)), self.state, tparams, ctx)
        updates, self.state = self._check_output(out)
        self._steps += 1
        for g, n in zip(grads, updates.grads):
            if g is not None and n is not None:
                write(g, n if scale is None else n * scale.to(n.device))
        if self.olr:
            self._lr.apply(opt, self._slots, updates.lr, grads, scale, hyper)

    def _check_output(self, out: Any) -> tuple[Updates, Any]:
        if not (isinstance(out, tuple) and len(out) == 2 and not isinstance(out, Updates)):
            raise TreatmentError("the attached chain's update must return (updates, new_state)")
        updates, state = out
        if not isinstance(updates, Updates):
            updates = Updates(list(updates), None)
        P = len(self._params)
        if len(updates.grads) != P:
            raise TreatmentError(f"the attached chain returned {len(updates.grads)} gradients for {P} producers")
        if updates.lr is not None:
            if not self.olr:
                raise TreatmentError("the attached chain returned learning rates but its sets_lr is False")
            if not isinstance(updates.lr, Tensor) or tuple(updates.lr.shape) != (P,):
                raise TreatmentError(f"the attached chain's Updates.lr must be a ({P},) tensor")
        return updates, state

    @torch.no_grad()
    def _post_hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.olr:
            self._lr.after_step(opt)
        self._restore_model(opt)
        self._rebase_all()

    def _save_model(self, opt: torch.optim.Optimizer) -> None:
        """skip_nonfinite="model", before the step: whether every gradient of the optimizer's
        parameters is finite (a device flag) and copies of the parameters and their state."""
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            self._saved = None
            return
        dev = grads[0].device
        ok = torch.stack([torch.isfinite(g).all().to(dev) for g in grads]).all()
        saved_p = [(p, p.detach().clone()) for p in params]
        saved_s: list[tuple[Tensor, Tensor | None]] = []
        for p in params:
            for v in opt.state.get(p, {}).values():
                if isinstance(v, Tensor):
                    saved_s.append((v, v.clone()))
        self._saved = (ok, saved_p, saved_s)
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self._skipped.add_((~ok).to(torch.int64))

    def _restore_model(self, opt: torch.optim.Optimizer) -> None:
        """skip_nonfinite="model", after the step: where the flag is false, every parameter and
        optimizer state tensor gets its value from before the step back (``torch.where``, no
        host sync); state the step created is zeroed (as if freshly initialised)."""
        if self._saved is None:
            return
        ok, saved_p, saved_s = self._saved
        self._saved = None
        for p, old in saved_p:
            p.copy_(torch.where(ok.to(p.device), p, old))
        known = {id(v) for v, _ in saved_s}
        for v, old in saved_s:
            if v.device == ok.device:
                v.copy_(torch.where(ok, v, old))
        for p, _ in saved_p:
            for v in opt.state.get(p, {}).values():
                if isinstance(v, Tensor) and id(v) not in known and v.device == ok.device:
                    v.copy_(torch.where(ok, v, torch.zeros_like(v)))

    def _rebase_all(self) -> None:
        """``ow_target="weight"``: Y₀ ← Φ(A), A ← 0 for every OW map (W unchanged; see
        :mod:`orthofx.treatments.ow_target`)."""
        for po, A in self._rebase:
            rebase(po, A)


# --------------------------------------------------------------------------- attach
def attach(
    optimizer: torch.optim.Optimizer,
    producers: "Mapping[str, Any] | Iterable[Any]",
    spec: GradientSpec | None = None,
    *,
    lr_mode: LRMode = "auto",
    history: bool = True,
    max_history: int | None = None,
    chain: GradientTransformation | None = None,
    skip_nonfinite: str | None = None,
    _step_hooks: bool = True,
    **fields: Any,
) -> AttachHandle:
    r"""Apply NOG and/or OLR (or any gradient chain) to the producer parameters at every
    ``optimizer.step()``, in a step pre-hook (the gradient the optimizer is about to use).

    Per producer, flattened to ``W`` (out × n) with gradient ``G = U S Vᵀ``: NOG replaces ``G``
    by ``U Vᵀ``; OLR sets the lr to ``η* = wᵀw·lᵀw / (wᵀw·lᵀl + 2(lᵀw)²)`` (``w = vec W``,
    ``l`` the vectorised, NOG'd gradient) when ``0 < η* < lr_sched``, else ``lr_sched`` (the
    group's current scheduled lr). Non-finite producer gradients are zeroed and counted.
    With OLR (or a chain that sets lrs) each producer gets its own param group (a copy of its
    group's hyperparameters; indices never shift). Guide: docs/attach.md.

    Example::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        handle = attach(opt, [(model.conv, "weight")], nog=True, olr=True)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()  # NOG, OLR, then SGD
        handle.stats(); handle.remove()

    Args:
        optimizer: holds every producer parameter (attach before ``load_state_dict``).
        producers: the Pre-SVD parameters (:func:`resolve_producers`: tensors,
            ``(module, "weight")`` pairs, ``(name, tensor)`` pairs or a ``{name: spec}`` map).
        spec: the :class:`~orthofx.specs.GradientSpec` (None: the defaults, only the guard;
            an ``OrthoConfig`` gives its ``.gradients``; a preset name is refused).
        **fields: GradientSpec fields replacing ``spec``'s (``None`` = not given): ``nog``,
            ``olr``, ``nog_method``, ``nog_scale``, ``nog_deficient``, ``ow_target``
            (``"generator"``: act on OW's generator A; ``"weight"``: on W = Φ(A),
            docs/gradient_treatments.md).
        lr_mode: how OLR's lr reaches the optimizer: ``"float"`` (one host sync per step),
            ``"tensor"`` (0-d device tensors), ``"fold"`` (SGD only, folded into the gradient
            and momentum, sync-free) or ``"auto"``.
        history: keep every step's η*, lr and scheduled lr (device tensors).
        max_history: keep only the last ``max_history`` steps.
        chain: a :class:`~orthofx.treatments.gradient.GradientTransformation` run instead of
            the spec's :func:`~orthofx.treatments.gradient.default_chain`; it gets
            ``ctx={"lrs": [...]}`` and no implicit guard.
        skip_nonfinite: None, or ``"model"``: undo the whole step (parameters and optimizer
            state) when any gradient the optimizer holds is non-finite (no host sync).

    Returns:
        The :class:`AttachHandle` (``stats()``, ``olr_history()``, ``remove()``); the existing
        one when the same producers are attached again with the same options.

    Warns:
        AdaptiveOptimizerWarning: once per optimizer, when NOG/OLR meet an adaptive optimizer
            (Adam, AdamW, Adagrad, RMSprop, ..., or any optimizer whose state holds a
            second-moment estimate).

    Raises:
        AttachError: not an optimizer, no producers, a producer not held by the optimizer,
            a producer that does not require grad, or a conflicting earlier attach.
        TreatmentError: a non-float producer, or a 1-D producer with NOG.
        ConfigError: a field value the spec refuses (naming the field), an unknown field or
            ``lr_mode``, ``lr_mode="fold"`` with a non-SGD optimizer, OLR on an optimizer
            without an ``lr`` hyperparameter, a preset name as ``spec``, ``ow_target="weight"``
            on SOC or a normalised generator, or ``chain=`` together with
            ``nog``/``olr``/``nog_*``.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AttachError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if skip_nonfinite not in (None, "model"):
        raise ConfigError(f"attach: skip_nonfinite={skip_nonfinite!r}; use None (guard the producers' gradients "
                          f"only) or 'model' (skip the whole step when any gradient is non-finite)")
    if "config" in fields:  # the name of ``spec`` before 0.3
        warn_deprecated("orthofx.treatments.attach(config=...)", "attach(spec=...) (a GradientSpec)", stacklevel=2)
        if spec is None:
            spec = fields.pop("config")
        else:
            raise ConfigError("attach: pass spec= only (config= is its deprecated name)")
    opts = parse_options(spec, lr_mode=lr_mode, history=history, max_history=max_history, chain=chain, **fields)
    items = resolve_producers(producers)
    check_producers(items, opts)
    slots = locate(optimizer, items)
    transform, target, maps = _target_transform(opts, items, producers)

    prev = _ATTACHED.get(optimizer)
    if prev is not None and not prev.removed:
        if ([id(p) for p in prev._params] == [id(p) for _, p in items] and _same(prev, opts)
                and prev.skip_nonfinite == skip_nonfinite):
            return prev
        raise AttachError(
            f"{type(optimizer).__name__} already has orthofx treatments attached "
            f"({prev!r}); call handle.remove() first"
        )

    mode = resolve_lr_mode(optimizer, slots, lr_mode, opts.sets_lr)
    warn_if_syncing(optimizer, slots, lr_mode, mode, opts.sets_lr)
    adaptive = (
        not opts.custom and (opts.nog or opts.olr) and is_adaptive(optimizer, [p for _, p in items])
        and should_warn(optimizer)
    )
    if adaptive:  # at attach, where the user chooses the optimizer (not at the first step)
        warnings.warn(adaptive_message(optimizer, opts.nog, opts.olr), AdaptiveOptimizerWarning, stacklevel=2)
    capture = WeightGradCapture(maps) if maps is not None else None
    handle = AttachHandle(optimizer, slots, opts, mode, transform, target, capture)
    handle.skip_nonfinite = skip_nonfinite
    if opts.sets_lr:
        split_groups(optimizer, slots)
    handle._install(optimizer, _step_hooks)
    _ATTACHED[optimizer] = handle
    return handle


def _target_transform(
    opts: AttachOptions, items: list[tuple[str, Tensor]], producers: Any
) -> tuple[GradientTransformation, str | None, list[Any] | None]:
    """The chain to install, the resolved ``ow_target`` (None: no producer carries OW) and,
    for ``"weight"``, each producer's OW parametrization (None for the others)."""
    base = opts.transform()
    ow = ow_producers(producers)
    found = [ow.get(id(p)) for _, p in items]
    if not any(f is not None for f in found):
        return base, None, None
    target = opts.spec.ow_target
    if target == "weight":
        soc = [n for (n, _), f in zip(items, found) if f is not None and f[0] == "soc"]
        if soc:
            raise ConfigError(
                f"ow_target='weight': producer(s) {', '.join(map(repr, soc))} carry OW method 'soc', an "
                "orthogonal convolution operator with no weight matrix to orthogonalise the gradient of; "
                "use ow_target='generator' (NOG/OLR on the SOC generator, as the authors' code does)"
            )
        normed = [n for (n, _), f in zip(items, found) if f is not None and f[0] == "flat" and not is_free(f[1])]
        if normed:
            raise ConfigError(
                f"ow_target='weight': producer(s) {', '.join(map(repr, normed))} use a normalised OW generator "
                "(ow_generator='normalized'), whose map has no A = 0 point to re-base the weight step to; "
                "use ow_target='generator' or ow_generator='free'"
            )
    acts = opts.custom or opts.nog or opts.olr  # a guard alone is the same on W and A
    maps = [f[1] if (f is not None and f[0] == "flat") else None for f in found]
    if target == "weight" and acts and any(m is not None for m in maps):
        return weight_target(base, maps), target, maps
    return base, target, None


def _same(prev: AttachHandle, opts: AttachOptions) -> bool:
    """An attach with ``opts`` repeats ``prev`` (so it returns ``prev``): the same chain (the
    same object, or the same spec's NOG/OLR options), ``ow_target`` and ``lr_mode`` ("auto" matches any)."""
    p = prev._opts
    if p.custom or opts.custom:
        same = p.chain is opts.chain
    else:
        same = _chain_key(p.spec) == _chain_key(opts.spec)
    return same and p.spec.ow_target == opts.spec.ow_target and opts.lr_mode in ("auto", prev.lr_mode)


def _chain_key(spec: GradientSpec) -> tuple[Any, ...]:
    """What of ``spec`` the default chain depends on (NOG's options only with NOG on)."""
    return (spec.nog, spec.olr) + ((spec.nog_method, spec.nog_scale, spec.nog_deficient) if spec.nog else ())
