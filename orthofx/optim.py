r"""Optimizer form of NOG/OLR: :class:`OrthoSGD`, SGD with momentum whose Pre-SVD producers get
the paper's gradient treatments — for training loops that want an optimizer, not hooks.

``OrthoSGD(model, lr, ...)`` takes a model returned by :func:`orthofx.transform` (its plan
names the producers and, per layer, their treatments) or any parameters with ``producers=``
given explicitly. Per step:

* producer ``i`` (gradient ``G_i``, weight flattened to ``(out, in·k·k)``): ``G_i ← U Vᵀ`` of
  ``G_i`` (NOG, :func:`orthofx.treatments.nog`) and/or its lr ``← η*`` if
  ``0 < η* < lr`` (OLR, :func:`orthofx.treatments.olr`,
  ``η* = wᵀw·lᵀw / (wᵀw·lᵀl + 2(lᵀw)²)``); with OW the chain acts on the generator, or on the
  weight W with ``ow_target="weight"`` (:mod:`orthofx.treatments.ow_target`);
* then every parameter takes ``torch.optim.SGD``'s step (momentum μ, dampening, weight decay,
  Nesterov): ``b ← μb + (1 − dampening)(g + wd·p)``, ``p ← p − lr·b`` (or ``g + μb`` with
  Nesterov).

It *is* a ``torch.optim.SGD`` whose treatments are the same chain
:func:`orthofx.treatments.attach` installs (:func:`orthofx.treatments.default_chain`, or your
``chain=``), run where the optimizer reads the gradient; the numerics are not re-implemented,
so ``OrthoSGD`` and ``attach`` on ``torch.optim.SGD`` take identical steps
(tests/test_optim.py). Differences from attaching by hand: nothing to install or remove,
and ``step(closure)`` is supported (the closure runs first, the treatments then see its
gradient).

With OLR each producer has a param group of its own (``param_groups`` lists them after the
others; the scheduled lr of a producer is that of the group it was created in, so LR
schedulers work as usual); ``state_dict()`` / ``load_state_dict()`` round-trip between
optimizers built the same way. ``.handle`` is the
:class:`~orthofx.treatments.attach.AttachHandle` (``stats()``, ``olr_history()``).

A Muon-style optimizer (orthogonalised *momentum*) is the same class with a chain that keeps
its own momentum and no SGD momentum, e.g. ``OrthoSGD(model, lr, momentum=0,
chain=named_chain(("guard", guard()), ("muon", muon(beta=0.95))))`` with the transform of
``examples/muon_chain.py``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from orthofx.errors import AttachError, ConfigError
from orthofx.specs import CHAIN_KEYS, GRADIENT_KEYS, GradientSpec
from orthofx.treatments.attach import AttachHandle, attach
from orthofx.treatments.gradient import GradientTransformation

__all__ = ["OrthoSGD"]


def _plan_choice(model: nn.Module, given: Mapping[str, Any], forced: bool
                 ) -> tuple[dict[str, tuple[nn.Module, str]], GradientSpec, int] | None:
    """``({name: (module, attr)}, spec, number of live producers)`` of a transformed model, chosen
    per producer by its plan (:func:`orthofx.plan.gradient_plan`, as ``orthofx.attach`` does);
    None without a plan."""
    from orthofx.pipeline import plan_of, producer_specs, unwrap
    from orthofx.plan import gradient_plan

    plan = plan_of(model)
    if plan is None:
        return None
    choice = gradient_plan(plan, given, forced=forced)
    specs = producer_specs(unwrap(model), dataclasses.replace(plan, producers=choice.producers))
    return specs, choice.spec, len(choice.live)


def _sgd_step(opt: torch.optim.SGD) -> None:
    """``torch.optim.SGD.step`` without the hook wrapper torch puts on it once an SGD exists
    (this class's own ``step`` carries the user's hooks already)."""
    f = torch.optim.SGD.step
    if getattr(f, "hooked", False):
        f = f.__wrapped__  # type: ignore[attr-defined]
    f(opt)


class OrthoSGD(torch.optim.SGD):
    """SGD (with momentum) whose Pre-SVD producers get NOG and/or OLR.

    Args:
        params: a model returned by :func:`orthofx.transform`, or parameters / param-group
            dicts as for ``torch.optim.SGD`` (then ``producers=`` is required).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach,
            differentiable, fused: as ``torch.optim.SGD`` (``momentum`` defaults to 0.9).
        producers: the producer parameters (any spec :func:`orthofx.treatments.attach`
            takes: tensors, ``(module, "weight")`` pairs, a ``{name: spec}`` map); overrides
            the plan's.
        chain: your own gradient chain instead of NOG/OLR (then no ``nog``/``olr``/``nog_*``).
        lr_mode, history, max_history: as :func:`orthofx.treatments.attach`.
        **fields: :class:`~orthofx.specs.GradientSpec` fields (``nog``, ``olr``, ``nog_method``,
            ``nog_scale``, ``nog_deficient``, ``ow_target``; checked there), replacing the
            spec's values.

    Which producers get which treatments: given a transformed model, its plan decides per
    Pre-SVD layer, as :func:`orthofx.attach` does (:func:`orthofx.plan.gradient_plan`): the
    layers whose plan entry (``layer_configs`` entry or config) has NOG/OLR get that entry's
    spec, the others plain SGD; an explicit ``nog=True``/``olr=True`` on a plan without
    NOG/OLR treats every non-ignored layer. Given parameters and ``producers=``, the spec is
    ``GradientSpec(nog=True)`` with ``fields`` applied (NOG unless ``nog=False``).

    Raises:
        AttachError: a model without an orthofx plan and no ``producers=``.
        ConfigError: parameters (not a model) without ``producers=``; bad options.
    """

    handle: AttachHandle | None

    def __init__(
        self,
        params: "nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]]",
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        producers: "Mapping[str, Any] | Iterable[Any] | None" = None,
        chain: GradientTransformation | None = None,
        lr_mode: str = "auto",
        history: bool = True,
        max_history: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **fields: Any,
    ) -> None:
        unknown = [k for k in fields if k not in GRADIENT_KEYS]
        if unknown:
            raise TypeError(f"OrthoSGD got an unexpected keyword argument {unknown[0]!r} (its gradient options are "
                            f"the GradientSpec fields: {', '.join(GRADIENT_KEYS)})")
        given = {k: v for k, v in fields.items() if v is not None}
        if chain is not None and any(k in CHAIN_KEYS for k in given):
            raise ConfigError(f"OrthoSGD: pass either chain= or {'/'.join(CHAIN_KEYS)}, not both")
        quiet = "the model has no Pre-SVD layer"
        if isinstance(params, nn.Module):
            model = params
            params = list(model.parameters())
            choice = _plan_choice(model, given, forced=chain is not None)
            if choice is None and producers is None:
                raise AttachError(
                    f"OrthoSGD: {type(model).__name__} has no orthofx plan — pass a model returned by "
                    "orthofx.transform, or its parameters with producers=[...] (the Pre-SVD weights)"
                )
            spec = choice[1] if choice is not None else GradientSpec(nog=True).replace(**given)
            if producers is None and choice is not None:
                producers, live = choice[0], choice[2]
                if live and not producers:
                    quiet = (f"the plan gives none of the model's {live} Pre-SVD layer(s) NOG or OLR (pass "
                             "nog=True / olr=True to treat them all)")
        elif producers is None:
            raise ConfigError(
                "OrthoSGD: given parameters rather than a transformed model, it needs producers= "
                "(the Pre-SVD weights: tensors or (module, 'weight') pairs)"
            )
        else:
            spec = GradientSpec(nog=True).replace(**given)
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        )
        self.handle = None
        specs = list(producers.items()) if isinstance(producers, Mapping) else list(producers)
        if not specs:
            warnings.warn(f"OrthoSGD: {quiet}; this is plain SGD", stacklevel=2)
            return
        producers = dict(specs) if isinstance(producers, Mapping) else specs
        # the chain runs inside step() (no step hooks: torch runs a subclass's hooks around its
        # step, i.e. before the closure, and again around SGD.step when that is patched)
        self.handle = attach(self, producers, spec, _step_hooks=False, lr_mode=lr_mode, history=history,
                             max_history=max_history, chain=chain)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: the treatments on the producers' gradients, then SGD on every parameter.
        ``closure`` (re-evaluates the loss and its gradients) runs first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.handle is not None:
            self.handle.before_step(self)
        _sgd_step(self)
        if self.handle is not None:
            self.handle.after_step(self)
        return loss

    def __repr__(self) -> str:
        inner = super().__repr__()
        head = f"{type(self).__name__} ("
        return inner.replace(head, f"{head}{self.handle!r}\n", 1) if self.handle is not None else inner
