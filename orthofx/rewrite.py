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
from types import SimpleNamespace
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

__all__ = ["apply_plan", "apply_swaps", "StableCalls"]

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
    used = tuple(plan.weight_shape)
    if used and tuple(w.shape) != used:
        raise TreatmentError(
            f"producer {plan.param!r} is used as a {used} slice of a {tuple(w.shape)} Parameter (e.g. "
            f"self.W[0, 0]); the treatments {plan.treatments} act on the flattened (out, in·k·k) Parameter, "
            f"which is not that matrix. Store the Parameter with shape {used}, or leave this layer untreated "
            "(OrthoConfig(ignored_scope=[...]), or the preset 'svd')"
        )


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


def apply_weight_treatments(root: nn.Module, plans: list[ProducerPlan], default: OrthoConfig | None = None
                            ) -> list[Action]:
    """Register OW/SN on each producer weight of ``root`` as its layer config says
    (``ProducerPlan.config``; ``default`` for a producer without one); returns what was registered.

    Raises :class:`TreatmentError` for a non-float weight when any treatment is configured.
    """
    done: list[Action] = []
    for plan in plans:
        cfg = plan.config or default
        if cfg is None:
            raise ConfigError(f"producer {plan.param!r} has no config")
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
    """The user's module path of a replaced decomposition call (``"head.cov_pool"``), or
    ``"<root>.forward:<kind>"`` for a call in the root module's own forward (the analysis
    report's entry ``name``): the ``orthofx_label`` of the
    module swapped in (the conditioning monitor labels its records with it)."""
    name = getattr(entry, "name", "")  # the report's one name (orthofx.report.meta_layer_name)
    return str(name or node.meta.get("orthofx_scope", "") or getattr(entry, "scope", "") or node.name)


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


# ----------------------------------------------------------------- swaps at a submodule
def decomposition_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The raw torch decomposition calls of ``gm``'s graph (eigh, eigvalsh, svd, svdvals,
    ``torch.svd``, ``Tensor.svd``), in graph order."""
    return [n for n in gm.graph.nodes
            if (n.op == "call_function" and kind_of_target(n.target) is not None)
            or (n.op == "call_method" and n.target == "svd")]


def graph_of(module: nn.Module, analysis_config: Any = None) -> fx.GraphModule:
    """The symbolic trace of ``module`` (one submodule, not the whole model) as a GraphModule
    that keeps what the trace would drop: its registered but unused parameters and buffers
    (same ``state_dict`` keys, non-persistent ones stay so), its training flag and its plain
    public instance attributes (``self.num_classes = 10``: the same objects)."""
    from orthofx.graph import trace

    gm = trace(module, analysis_config)
    gm.train(module.training)
    for k, v in module.__dict__.items():
        if not k.startswith("_") and k != "training" and k not in gm.__dict__:
            gm.__dict__[k] = v
    have_p = dict(gm.named_parameters())
    have_b = dict(gm.named_buffers())
    for owner_name, owner in module.named_modules():
        try:
            target = gm.get_submodule(owner_name) if owner_name else gm
        except AttributeError:
            continue  # a submodule forward does not call: refused by the caller
        for k, v in owner._parameters.items():
            q = f"{owner_name}.{k}" if owner_name else k
            if v is not None and q not in have_p and k not in target._parameters:
                target.register_parameter(k, v)
        for k, v in owner._buffers.items():
            q = f"{owner_name}.{k}" if owner_name else k
            if v is not None and q not in have_b and k not in target._buffers:
                target.register_buffer(k, v, persistent=k not in owner._non_persistent_buffers_set)
    return gm


def swap_graph(gm: fx.GraphModule, records: list[SwapRecord], scope: str) -> list[SwapRecord]:
    """Carry out graph ``records`` on ``gm`` (the trace of the submodule ``scope``): a record
    with ``output`` fuses that eigh + ``U f(Λ) Uᵀ`` into an ``ExactSpectral``
    (:func:`orthofx.fuse.fuse_at`), the others become ``StableDecomposition`` modules.
    Raises :class:`ConfigError` naming the nodes this trace does not have."""
    from orthofx.fuse import FUSED_ORIGINAL, fuse_at

    done: dict[str, SwapRecord] = {}
    for r in records:
        if r.output is not None:
            try:
                f = fuse_at(gm, r.node, r.output, r.kind, scope=scope)
            except ConfigError as exc:
                raise ConfigError(f"the plan fused an eigh + U f(Λ) Uᵀ at {r.node!r} -> {r.output!r} in "
                                  f"{scope or '<root>'}; this model's trace does not fit ({exc}; a different "
                                  f"architecture?)") from None
            done[r.node] = SwapRecord(f.node, FUSED_ORIGINAL, f.usage, f.module, output=f.output, scope=scope)
    wanted = [r.node for r in records if r.output is None]
    entries = [SimpleNamespace(node=n, source="torch", scope=scope) for n in wanted]
    stable = swap_meta_layers(gm, SimpleNamespace(entries=entries)) if wanted else []
    if sorted(s.node for s in stable) != sorted(wanted):
        raise ConfigError(f"the plan swapped meta-layers at {sorted(wanted)} in {scope or '<root>'}, this model's "
                          f"trace has {sorted(s.node for s in stable)} (a different architecture?)")
    done.update((s.node, dataclasses.replace(s, scope=scope)) for s in stable)
    return [done[r.node] for r in records]


_DECOMPOSITIONS: dict[Any, Any] = {torch.Tensor.svd: "svd"}


def _call_target(func: Any) -> Any:
    """The ``StableDecomposition.for_target`` target of a torch-function call, or None."""
    if func in _DECOMPOSITIONS:
        return _DECOMPOSITIONS[func]
    return func if kind_of_target(func) is not None else None


class _CallSwapMode(torch.overrides.TorchFunctionMode):
    """Answers the i-th raw decomposition call with ``modules[i]`` (None: the raw call)."""

    def __init__(self, modules: list[nn.Module | None]) -> None:
        super().__init__()
        self.modules = modules
        self.calls: list[Any] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        target = _call_target(func)
        if target is not None:
            i = len(self.calls)
            self.calls.append(target)
            m = self.modules[i] if i < len(self.modules) else None
            if m is not None:
                with torch._C.DisableTorchFunction():  # outer swaps must not see orthofx's own eigh
                    return m(*args, **kwargs)
        return func(*args, **kwargs)


class StableCalls:
    """The ``forward`` of a kept user submodule whose raw decompositions are swapped at run
    time: the class's own ``forward`` runs unchanged (buffers updated in place under
    ``no_grad``, ``self.training`` branches, helper methods, optional arguments), with its
    i-th ``torch.linalg.eigh/eigvalsh/svd/svdvals`` / ``torch.svd`` / ``Tensor.svd`` call
    answered by the submodule ``names[i]`` (a :class:`StableDecomposition`). Stored as the
    instance attribute ``forward``; it pickles and deep-copies with the module.
    ``orthofx.strip`` removes it."""

    def __init__(self, owner: nn.Module, names: list[str | None]) -> None:
        self.owner = owner
        self.names = list(names)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        mods = [owner.get_submodule(n) if n else None for n in self.names]
        with _CallSwapMode(mods):
            return type(owner).forward(owner, *args, **kwargs)


def probe_calls(model: nn.Module, scope: str, inputs: tuple[Any, ...]) -> list[list[Any]]:
    """The raw decomposition calls of each run of submodule ``scope``'s forward during one
    training-mode forward of a deep copy of ``model`` (no gradients, the user's hooks silent),
    as ``for_target`` targets."""
    import copy

    from orthofx.graph.state import quiet_user_hooks

    twin = copy.deepcopy(model).train()
    sub = twin.get_submodule(scope) if scope else twin
    runs: list[list[Any]] = []
    inner = type(sub).forward

    def fwd(*a: Any, **k: Any) -> Any:
        mode = _CallSwapMode([])
        with mode:
            out = inner(sub, *a, **k)
        runs.append(mode.calls)
        return out

    sub.__dict__["forward"] = fwd
    rng = torch.get_rng_state()
    try:
        # the twin shares the user's hook closures: they stay silent, as in recording and verification
        with torch.no_grad(), quiet_user_hooks(twin):
            twin(*inputs)
    finally:
        torch.set_rng_state(rng)
    return runs


def install_calls(root: nn.Module, records: list[SwapRecord], scope: str) -> list[SwapRecord]:
    """Carry out call ``records`` (``via="call"``) on the submodule ``scope`` of ``root``:
    register each record's ``StableDecomposition`` under ``record.module`` and make the
    module's ``forward`` a :class:`StableCalls`."""
    from orthofx.nn.stable import STABLE_KINDS  # noqa: F401  (the kinds StableDecomposition knows)

    owner = root.get_submodule(scope) if scope else root
    if isinstance(owner.__dict__.get("forward"), StableCalls):
        raise ConfigError(f"{scope or '<root>'} already has swapped decomposition calls")
    by_index: dict[int, str] = {}
    for r in records:
        try:
            index = int(r.node.removeprefix("call"))
        except ValueError:
            raise ConfigError(f"swap record {r.node!r} of {scope or '<root>'} is not a call index") from None
        target = "svd" if r.original == "Tensor.svd" else _target_by_name(r.original)
        stable = StableDecomposition.for_target(target, name=f"{r.original} call {index} in {scope or '<root>'}")
        stable.orthofx_label = scope or r.node
        owner.add_module(r.module, stable)
        by_index[index] = r.module
    names = [by_index.get(i) for i in range(max(by_index) + 1)] if by_index else []
    owner.__dict__["forward"] = StableCalls(owner, names)
    return list(records)


def _target_by_name(name: str) -> Any:
    from orthofx.vocab import TORCH_DECOMPOSITIONS

    for f, d in TORCH_DECOMPOSITIONS.items():
        if d.name == name:
            return f
    raise ConfigError(f"no stable replacement for {name!r}")


def original_name(target: Any) -> str:
    """``"torch.linalg.eigh"`` / ``"Tensor.svd"`` of a ``for_target`` target."""
    from orthofx.vocab import TORCH_DECOMPOSITIONS

    if isinstance(target, str):
        return f"Tensor.{target}"
    return TORCH_DECOMPOSITIONS[target].name


def unswap_calls(root: nn.Module) -> int:
    """Undo :func:`install_calls` everywhere in ``root``: the class's own forward again, the
    stable modules removed. Returns how many modules were kept user modules with swaps."""
    count = 0
    for m in list(root.modules()):
        calls = m.__dict__.get("forward")
        if isinstance(calls, StableCalls):
            del m.__dict__["forward"]
            for n in calls.names:
                if n and n in m._modules:
                    del m._modules[n]
            count += 1
    return count


def _replace_submodule(root: nn.Module, scope: str, new: nn.Module) -> None:
    parent_name, _, leaf = scope.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def apply_swaps(root: nn.Module, swaps: list[SwapRecord], analysis_config: Any = None
                ) -> tuple[nn.Module, list[SwapRecord]]:
    """Carry out ``swaps`` at the smallest enclosing submodules: per ``scope``, a graph swap
    replaces that submodule by its rewritten trace (:func:`graph_of`, :func:`swap_graph`;
    the root itself when ``scope`` is ""), a call swap keeps it (:func:`install_calls`).
    Everything else stays the caller's objects. Returns the (possibly new) root and the
    records as made."""
    made: dict[int, SwapRecord] = {}
    scopes = list(dict.fromkeys(s.scope for s in swaps))
    for scope in sorted(scopes, key=lambda sc: -sc.count(".") - bool(sc)):  # innermost first
        recs = [(i, s) for i, s in enumerate(swaps) if s.scope == scope]
        vias = {s.via for _, s in recs}
        if len(vias) != 1 or vias - {"graph", "call"}:
            raise ConfigError(f"the plan's swaps in {scope or '<root>'} mix {sorted(vias)}")
        if vias == {"call"}:
            out = install_calls(root, [s for _, s in recs], scope)
        else:
            module = root.get_submodule(scope) if scope else root
            gm = graph_of(module, analysis_config)
            out = swap_graph(gm, [s for _, s in recs], scope)
            if scope:
                _replace_submodule(root, scope, gm)
            else:
                root = gm
        made.update((i, r) for (i, _), r in zip(recs, out))
    return root, [made[i] for i in range(len(swaps))]


def apply_plan(root: nn.Module, plan: Plan, *, analysis: Any = None) -> tuple[nn.Module, Plan, list[Action]]:
    """Carry out ``plan`` on ``root`` (the deep-copied model, or a fresh one when replaying):
    the one place a model is changed. First the plan's swaps (:func:`apply_swaps`, each at its
    submodule: fused ones are ``FUSE`` actions, the others ``STABLE_SWAP``), then OW/SN on each
    producer as its layer config says. Legacy: with no ``plan.swaps``, a GraphModule ``root``,
    a stabilising config and its symbolic ``analysis``, its raw decompositions are swapped.

    Returns the root (a GraphModule only when the root's own forward was rewritten), the plan
    as applied, and the typed :class:`Action` records.
    """
    actions: list[Action] = []
    if plan.swaps:
        root, swaps = apply_swaps(root, plan.swaps, plan.config.analysis)
        plan = dataclasses.replace(plan, swaps=swaps)
        actions += [Action.of_swap(s, ActionKind.FUSE if s.output is not None else ActionKind.STABLE_SWAP)
                    for s in swaps]
    elif analysis is not None and plan.config.stabilize and isinstance(root, fx.GraphModule):
        swaps = swap_meta_layers(root, analysis)
        actions += [Action.of_swap(s) for s in swaps]
        plan = dataclasses.replace(plan, swaps=swaps)
    actions = apply_weight_treatments(root, plan.producers, plan.config) + actions
    return root, plan, actions
