"""Apply a plan to a GraphModule: weight treatments on the Pre-SVD layers, stable meta-layers.

The analysis (:mod:`orthofx.graph`) is pure; this module is the only place that mutates the
traced GraphModule. It does two things, both idempotent:

* **weight treatments** (OW, SN) on each producer's weight, registered with
  ``torch.nn.utils.parametrize`` on the flattened (out, in·k·k) matrix
  (:mod:`orthofx.treatments.weight`); OL, NOG and OLR need no structural change (the loss
  and :func:`orthofx.attach` read the plan);
* **stabilisation**: each raw ``torch.linalg.eigh/eigvalsh/svd/svdvals`` / ``torch.svd`` /
  ``Tensor.svd`` node that decomposes a covariance is replaced by a call of a
  :class:`~orthofx.nn.StableDecomposition` leaf module (same forward, bounded Taylor-K
  backward), registered as ``orthofx_stable_<node>``.

The plan is stored in ``gm.meta["orthofx"]`` (GraphModule deep copies keep ``meta``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError, TreatmentError
from orthofx.nn.stable import StableDecomposition, kind_of_target
from orthofx.treatments.weight import (
    FlatOrthogonal,
    FlatSpectralNorm,
    register_orthogonal,
    register_spectral_norm,
    treatment_of,
)

__all__ = ["ProducerPlan", "SwapRecord", "Plan", "apply_plan", "META_KEY", "STABLE_PREFIX", "PLAN_VERSION"]

META_KEY = "orthofx"
STABLE_PREFIX = "orthofx_stable_"
PLAN_VERSION = 1


@dataclass
class ProducerPlan:
    """One Pre-SVD weight and what was done to it.

    Attributes:
        name: qualified name of the module owning the weight (``"head.reduce"``).
        attr: attribute name of the weight on that module (``"weight"``).
        param: qualified parameter name in the *original* model (``"head.reduce.weight"``).
        weight_shape / flat_shape: the weight's shape and its flattened (out, in·k·k) shape.
        treatments: the paper tokens that act on it (``["nog", "ow", "olr"]``).
        meta_layers: node names of the meta-layers it feeds.
    """

    name: str
    attr: str
    param: str
    weight_shape: tuple[int, ...]
    flat_shape: tuple[int, int]
    treatments: list[str] = field(default_factory=list)
    meta_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["flat_shape"] = list(self.flat_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProducerPlan":
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        d["flat_shape"] = tuple(d["flat_shape"])
        return cls(**d)


@dataclass
class SwapRecord:
    """A raw decomposition node replaced by a stable leaf module."""

    node: str
    original: str
    kind: str
    module: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """What the pass did: config, producers and swaps (JSON-serialisable via :meth:`to_dict`)."""

    config: OrthoConfig
    producers: list[ProducerPlan] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "config": self.config.to_dict(),
            "producers": [p.to_dict() for p in self.producers],
            "swaps": [s.to_dict() for s in self.swaps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(
            config=OrthoConfig.from_dict(d["config"]),
            producers=[ProducerPlan.from_dict(p) for p in d.get("producers", [])],
            swaps=[SwapRecord(**s) for s in d.get("swaps", [])],
        )


def _split_param(param: str) -> tuple[str, str]:
    mod, _, attr = param.rpartition(".")
    return mod, attr


def _producer_plans(analysis: Any, cfg: OrthoConfig) -> list[ProducerPlan]:
    """One plan per distinct producer parameter, in graph order."""
    plans: dict[str, ProducerPlan] = {}
    tokens = list(cfg.treatments)
    for e in analysis.entries:
        p = e.producer
        if p.param in plans:
            plans[p.param].meta_layers.append(e.node)
            continue
        mod, attr = _split_param(p.param)
        plans[p.param] = ProducerPlan(
            name=mod,
            attr=attr,
            param=p.param,
            weight_shape=tuple(p.weight_shape),
            flat_shape=tuple(p.flat_shape),
            treatments=list(tokens),
            meta_layers=[e.node],
        )
    return list(plans.values())


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


def apply_weight_treatments(root: nn.Module, plans: list[ProducerPlan], cfg: OrthoConfig) -> list[str]:
    """Register OW/SN on each producer weight of ``root``; returns what was registered.

    Raises :class:`TreatmentError` for a non-float weight when any treatment is configured.
    """
    done: list[str] = []
    for plan in plans:
        module = root.get_submodule(plan.name) if plan.name else root
        if plan.treatments:
            _check_weight_dtype(module, plan)
            _check_user_parametrization(module, plan)
        if cfg.weight in ("ow", "sn"):
            _check_untied(root, module, plan, cfg.weight)
        if cfg.weight == "ow":
            if register_orthogonal(module, plan.attr, method=cfg.ow_method, qualname=plan.param):
                done.append(f"ow({cfg.ow_method}) {plan.param}")
        elif cfg.weight == "sn":
            if register_spectral_norm(
                module, plan.attr, method=cfg.sn_method, n_power_iterations=cfg.sn_power_iterations,
                qualname=plan.param,
            ):
                done.append(f"sn({cfg.sn_method}) {plan.param}")
        else:
            existing = treatment_of(module, plan.attr)
            if existing in ("ow", "sn"):
                raise TreatmentError(
                    f"producer {plan.param!r} already carries {existing.upper()}, but the config asks for "
                    f"{cfg.name!r}; strip() the model first"
                )
    return done


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


def apply_plan(root: nn.Module, analysis: Any, cfg: OrthoConfig, *,
               swaps: list[SwapRecord] | None = None) -> tuple[Plan, list[str]]:
    """Apply ``cfg`` to ``root`` (a GraphModule, or the deep-copied model).

    Returns the plan and a list of human-readable actions. ``swaps``: stable swaps already
    made (and verified) by the caller; when None, a GraphModule root is stabilised here.
    """
    plans = _producer_plans(analysis, cfg)
    actions = apply_weight_treatments(root, plans, cfg)
    if swaps is None:
        swaps = []
        if cfg.stabilize and isinstance(root, fx.GraphModule):
            swaps = swap_meta_layers(root, analysis)
        actions += [f"stable {s.kind} replaces {s.original} at {s.node}" for s in swaps]
    return Plan(cfg, plans, swaps), actions
