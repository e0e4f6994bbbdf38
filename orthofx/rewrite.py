"""Apply a plan (:mod:`orthofx.plan`, made purely by ``make_plan``) to the model or its
GraphModule: weight treatments on the Pre-SVD layers, stable meta-layers.

The analysis (:mod:`orthofx.graph`) and the planning are pure; this module (with
:mod:`orthofx.fuse`) is the only place that mutates the model. It does two things, both
idempotent, and reports them as typed :class:`~orthofx.plan.Action` records:

* **weight treatments** (OW, SN) on each producer's weight, registered with
  ``torch.nn.utils.parametrize`` on the flattened (out, in·k·k) matrix
  (:mod:`orthofx.treatments.weight`); OL, NOG and OLR need no structural change (the loss
  and :func:`orthofx.attach` read the plan);
* **stabilisation**: each raw ``torch.linalg.eigh/eigvalsh/svd/svdvals`` / ``torch.svd`` /
  ``Tensor.svd`` node that decomposes a covariance is replaced by a call of a
  :class:`~orthofx.nn.StableDecomposition` leaf module (same forward, exact backward except
  at near-ties), registered as ``orthofx_stable_<node>``.

The plan is stored in ``gm.meta["orthofx"]`` (GraphModule deep copies keep ``meta``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError, TreatmentError
from orthofx.plan import PLAN_VERSION, Action, ActionKind, Plan, ProducerPlan, SwapRecord, make_plan  # noqa: F401
from orthofx.nn.stable import StableDecomposition, kind_of_target
from orthofx.treatments.weight import (
    FlatOrthogonal,
    FlatSpectralNorm,
    register_orthogonal,
    register_spectral_norm,
    treatment_of,
)

__all__ = ["apply_plan"]

META_KEY = "orthofx"
STABLE_PREFIX = "orthofx_stable_"


def _check_weight_dtype(module: nn.Module, plan: ProducerPlan) -> None:
    w = getattr(module, plan.attr, None)
    if not isinstance(w, torch.Tensor):
        raise TreatmentError(f"producer {plan.param!r} is not a tensor attribute of {type(module).__name__}")
    if not w.is_floating_point():
        raise TreatmentError(
            f"producer {plan.param!r} has dtype {w.dtype}; the treatments {plan.treatments} need a "
            "floating-point weight (cast the model to float first)"
        )
    if w.dim() < 2:
        raise TreatmentError(f"producer {plan.param!r} has shape {tuple(w.shape)}; treatments need a matrix or conv weight")


def _check_untied(root: nn.Module, module: nn.Module, plan: ProducerPlan, weight: str) -> None:
    """OW/SN re-parametrize one module's attribute; a Parameter shared with another module
    would keep seeing the raw generator there. Refuse, naming the sharers."""
    w = module._parameters.get(plan.attr)
    if w is None:
        return
    sharers = [f"{name}.{attr}" if name else attr
               for name, m in root.named_modules(remove_duplicate=False)
               for attr, p in m._parameters.items() if p is w]
    sharers = list(dict.fromkeys(sharers))
    if len(sharers) > 1:
        raise ConfigError(
            f"producer {plan.param!r} is shared by {', '.join(sharers)}; {weight.upper()} re-parametrizes one "
            f"module's weight and would break the tie. Untie the weights, or use a gradient treatment "
            f"(nog/olr) or ol, which act on the shared Parameter itself")


def _check_user_parametrization(module: nn.Module, plan: ProducerPlan) -> None:
    """A producer that already carries the user's own parametrization (torch.nn.utils
    parametrize, or the hook-based weight_norm / spectral_norm) is refused with its name."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, plan.attr):
        mine = (FlatOrthogonal, FlatSpectralNorm)
        names = [type(p).__name__ for p in module.parametrizations[plan.attr]  # type: ignore[index]
                 if not isinstance(p, mine)]
        if not names:
            return
        raise TreatmentError(
            f"producer {plan.param!r} already carries the parametrization {', '.join(names)}; orthofx's "
            f"{'/'.join(plan.treatments)} would act on its raw 'original' tensor. Remove it "
            f"(torch.nn.utils.parametrize.remove_parametrizations) or leave this layer untreated")
    for suffix, what in (("_g", "weight_norm"), ("_orig", "spectral_norm")):
        if f"{plan.attr}{suffix}" in module._parameters:
            raise TreatmentError(
                f"producer {plan.param!r} carries torch's hook-based {what} ({plan.attr}{suffix}); orthofx's "
                f"{'/'.join(plan.treatments)} cannot act on its computed weight. Remove it "
                f"(torch.nn.utils.remove_{what}) or leave this layer untreated")


def apply_weight_treatments(root: nn.Module, plans: list[ProducerPlan], cfg: OrthoConfig) -> list[Action]:
    """Register OW/SN on each producer weight of ``root``; returns what was registered.

    Raises :class:`TreatmentError` for a non-float weight when any treatment is configured.
    """
    done: list[Action] = []
    for plan in plans:
        module = root.get_submodule(plan.name) if plan.name else root
        if plan.treatments:
            _check_weight_dtype(module, plan)
            _check_user_parametrization(module, plan)
        if cfg.weight in ("ow", "sn"):
            _check_untied(root, module, plan, cfg.weight)
        if cfg.weight == "ow":
            if register_orthogonal(module, plan.attr, method=cfg.ow_method, generator=cfg.ow_generator,
                                   radius=cfg.ow_radius, terms=cfg.soc_terms, eval_terms=cfg.soc_eval_terms,
                                   qualname=plan.param):
                normalized = cfg.ow_method != "soc" and cfg.ow_generator == "normalized"
                done.append(Action(ActionKind.OW, plan.param,
                                   method=f"{cfg.ow_method}, normalized" if normalized else cfg.ow_method))
        elif cfg.weight == "sn":
            if register_spectral_norm(
                module, plan.attr, method=cfg.sn_method, n_power_iterations=cfg.sn_power_iterations,
                qualname=plan.param,
            ):
                done.append(Action(ActionKind.SN, plan.param, method=cfg.sn_method))
        else:
            existing = treatment_of(module, plan.attr)
            if existing in ("ow", "sn"):
                raise TreatmentError(
                    f"producer {plan.param!r} already carries {existing.upper()}, but the config asks for "
                    f"{cfg.name!r}; strip() the model first"
                )
    return done


def user_label(node: fx.Node, entry: Any) -> str:
    """The user's module path of a replaced decomposition call (``"head.cov_pool"``), or the
    node's name for a call in the root module's own forward: the ``orthofx_label`` of the
    module swapped in (the conditioning monitor labels its records with it)."""
    return str(node.meta.get("orthofx_scope", "") or getattr(entry, "scope", "") or node.name)


def swap_meta_layers(gm: fx.GraphModule, analysis: Any) -> list[SwapRecord]:
    """Replace raw torch decomposition nodes of the analysed meta-layers by
    :class:`StableDecomposition` leaf modules. Pure graph surgery; ``gm.recompile()`` is called."""
    nodes = {n.name: n for n in gm.graph.nodes}
    swaps: list[SwapRecord] = []
    for e in analysis.entries:
        if e.source != "torch":
            continue
        node = nodes.get(e.node)
        if node is None:
            continue
        if node.op == "call_function" and kind_of_target(node.target) is not None:
            target: Any = node.target
            original = f"{getattr(target, '__module__', 'torch')}.{getattr(target, '__name__', str(target))}"
        elif node.op == "call_method" and node.target == "svd":
            target, original = "svd", "Tensor.svd"
        else:
            continue
        scope = str(node.meta.get("orthofx_scope", "") or e.scope or "")
        stable = StableDecomposition.for_target(target, name=f"{e.node} in {scope or '<root>'}")
        stable.orthofx_label = user_label(node, e)
        name = STABLE_PREFIX + node.name
        gm.add_submodule(name, stable)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args=node.args, kwargs=node.kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        swaps.append(SwapRecord(node=e.node, original=original, kind=stable.kind, module=name))
    if swaps:
        gm.graph.lint()
        gm.recompile()
    return swaps


def apply_plan(root: nn.Module, plan: Plan, *, analysis: Any = None) -> tuple[Plan, list[Action]]:
    """Carry out ``plan`` on ``root`` (a GraphModule, or the deep-copied model): OW/SN on its
    producers; when ``plan.swaps`` is empty, ``root`` is a GraphModule, the config stabilises
    and the symbolic ``analysis`` of ``root`` is given, its raw decompositions are swapped here.

    Returns the plan as applied (with the swaps made) and the typed :class:`Action` records.
    """
    actions = apply_weight_treatments(root, plan.producers, plan.config)
    if not plan.swaps and analysis is not None and plan.config.stabilize and isinstance(root, fx.GraphModule):
        swaps = swap_meta_layers(root, analysis)
        actions += [Action.of_swap(s) for s in swaps]
        plan = dataclasses.replace(plan, swaps=swaps)
    return plan, actions
