"""``orthofx.transform``: trace → find → plan → rewrite → report, and the training-time API.

    gm, report = orthofx.transform(model, example_inputs, config="nog+ow+olr")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    orthofx.attach(opt, gm)                                # NOG / OLR at every opt.step()
    loss = task_loss + orthofx.orthogonality_loss(gm)      # OL (zero unless configured)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from orthofx._log import logger
from orthofx.config import OrthoConfig, check_loss_weight, resolve_config
from orthofx.errors import AttachError, ConfigError, InputError, TraceFailure
from orthofx.graph import AnalysisReport, analyze, analyze_graph, trace
from orthofx.graph.state import traces_one_at_a_time
from orthofx.plan import Action, ActionKind, Plan, SwapRecord, gradient_plan, make_plan
from orthofx.report import TransformReport
from orthofx.rewrite import META_KEY, STABLE_PREFIX, apply_plan, swap_meta_layers
from orthofx.fuse import FUSED_ORIGINAL, ExactSpectral, fuse_reconstructions
from orthofx.nn.stable import StableDecomposition
from types import SimpleNamespace
from orthofx.specs import GRADIENT_KEYS
from orthofx.verify import verify_rewrite
from orthofx.treatments import attach as _attach_params
from orthofx.treatments.attach import AttachHandle
from orthofx.treatments.weight import orthogonality_loss as _ol

__all__ = ["transform", "attach", "orthogonality_loss", "replay", "plan_of", "producer_specs"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def plan_of(model: nn.Module) -> Plan | None:
    """The plan stored by :func:`transform` in ``gm.meta``, or None for an untransformed model.

    Parsed once per stored payload and cached on the module, because ``orthogonality_loss``
    and ``attach`` call it from the training loop.
    """
    m = unwrap(model)
    meta = _stored_meta(m)
    if meta is None:
        return None
    payload = meta[META_KEY]
    cached = m.__dict__.get("_orthofx_plan_cache")
    if cached is not None and cached[0] is payload:
        return cached[1]
    plan = Plan.from_dict(payload["plan"])
    m.__dict__["_orthofx_plan_cache"] = (payload, plan)
    return plan


def _stored_meta(m: nn.Module) -> dict[str, Any] | None:
    """``{"orthofx": payload}`` wherever :func:`_store` left it (see there), or None."""
    candidates = [getattr(m, "meta", None), m.__dict__.get("_orthofx_meta")]
    if isinstance(m, fx.GraphModule):
        candidates += [c.__dict__.get("_orthofx_meta") for n, c in m.named_children()
                       if n.startswith(STABLE_PREFIX)]
    for c in candidates:
        if isinstance(c, dict) and META_KEY in c:
            return c
    return None


def _store(root: nn.Module, plan: Plan, report: TransformReport) -> None:
    """Keep the plan with the model so that it survives pickle, torch.save, deepcopy and spawn:
    a plain attribute of the root module; for a GraphModule also ``gm.meta`` (kept by its
    deepcopy, with the attribute listed as user-preserved) and an attribute of each stable swap
    module (submodules the graph calls survive unpickling followed by deepcopy)."""
    payload = {"plan": plan.to_dict(), "report": report.to_dict()}
    stored = {META_KEY: payload}
    root.__dict__["_orthofx_meta"] = stored
    root.__dict__["_orthofx_plan_cache"] = (payload, plan)  # plan_of reads this plan, not its JSON form
    if isinstance(root, fx.GraphModule):
        root.meta[META_KEY] = payload
        root.meta.setdefault("_user_preserved_attributes", {})["_orthofx_meta"] = stored
        for s in plan.swaps:
            try:
                root.get_submodule(s.module).__dict__["_orthofx_meta"] = stored
            except AttributeError:
                continue


def _refuse_wrappers(model: nn.Module) -> None:
    """transform() acts on the model itself: a DDP/DataParallel/compile wrapper is refused."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise InputError(
            f"transform() got a {type(model).__name__} wrapper: transform the inner model "
            f"(model.module), then wrap the result")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise InputError(
            "transform() got a torch.compile wrapper: transform the original model (model._orig_mod), "
            "then torch.compile the result")


@traces_one_at_a_time
def transform(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any = None,
    config: OrthoConfig | str | Mapping[str, Any] | None = None,
    *,
    verify: bool = True,
) -> tuple[nn.Module, TransformReport]:
    """Find the model's meta-layers and Pre-SVD layers, apply the configured treatments, and
    return ``(gm, report)``.

    Args:
        model: an unmodified ``nn.Module`` (it is deep-copied unless ``config.inplace``).
            DDP / DataParallel / ``torch.compile`` wrappers are refused: transform the inner
            model, then wrap.
        example_inputs: a tensor or a tuple of positional inputs. With them (the normal use)
            the analysis records one concrete forward (:func:`orthofx.graph.recorded.discover.discover`), so it
            sees inside autograd.Functions, loops, branches and any number of layers; the
            user's model is left exactly as it was. Without them, only symbolic fx tracing is
            used, and a note says so.
        config: an :class:`~orthofx.config.OrthoConfig`, a preset name (``"nog+ow+olr"``,
            see :data:`~orthofx.config.PRESETS`) or a dict; None = ``"svd"`` (stabilise only).
        verify: check a rewritten graph against the original on the example inputs (train and
            eval outputs, buffer updates, gradients) before emitting it; where it diverges,
            the original module is kept and the report says why.

    Returns:
        ``gm``: the treated model. It is a deep copy of the original module (same class, same
        parameters, buffers, submodules, attributes, hooks and state_dict keys) with OW/SN
        registered on the producers; it is a ``torch.fx.GraphModule`` only when raw
        ``eigh``/``svd`` meta-layers were swapped for stable ones and that rewrite was verified.
        ``report``: a :class:`TransformReport` (print it).

    Raises :class:`InputError` when an example input holds NaN or Inf (it is named).
    Thread-safe: concurrent transforms (and analyses) of any models trace one at a time
    (``orthofx.graph.state.TRACE_LOCK``; torch.fx patches module calls process-wide while it traces).

    Transforming an already transformed module with the same config returns it unchanged
    (``report.modified is False``); a different config raises :class:`ConfigError`.
    OW re-initialises each producer weight to its nearest orthogonal matrix (U Vᵀ of its
    flattened weight), so outputs change; SN rescales it; the other treatments leave the
    forward untouched.
    """
    cfg = resolve_config(config)
    _refuse_wrappers(model)
    previous = plan_of(model)
    if previous is not None:
        if previous.config != cfg:
            raise ConfigError(
                f"this model was already transformed with {previous.config.name!r}; transforming it again "
                f"with {cfg.name!r} would stack treatments. Transform the original model, or orthofx.strip() first."
            )
        root = unwrap(model)
        if isinstance(root, fx.GraphModule):
            analysis = analyze_graph(root, cfg.analysis)
        else:
            analysis = _previous_analysis(root, previous)
        note = "already transformed with this config: nothing to do"
        return model, TransformReport(analysis, previous, modified=False, notes=[note])

    work = model if cfg.inplace else _deepcopy(model)
    notes: list[str] = []
    swaps: list[SwapRecord] | None = None
    root = work
    if example_inputs is None:
        analysis = analyze(work, None, cfg.analysis)
        root = analysis.graph_module if analysis.graph_module is not None else work
        notes.append("no example inputs: the analysis used symbolic fx tracing only, which cannot see inside "
                     "autograd.Functions, loops or branches; pass example inputs to analyse what really runs")
        if analysis.graph_module is None:
            notes.append("the root module could not be traced; treatments were applied to the analysed "
                         "submodules and raw meta-layers were not swapped")
    else:
        analysis = analyze(work, example_inputs, cfg.analysis)  # recorded (symbolic if it cannot be)
        swaps, rewrite_notes = _stable_rewrite(work, analysis, cfg, example_inputs, verify)
        notes += rewrite_notes
    if not analysis.entries:
        notes.append("no meta-layer with a Pre-SVD layer was found; the model is unchanged"
                     + (f" ({len(analysis.skipped)} meta-layer(s) skipped, see report)" if analysis.skipped else ""))
    plan = make_plan(analysis, cfg, swaps=swaps)
    root, plan, actions = apply_plan(root, plan, analysis=analysis if swaps is None else None)
    modified = bool(actions) or any(p.treatments for p in plan.producers)
    report = TransformReport(analysis, plan, modified=modified, actions=actions, notes=notes)
    _store(root, plan, report)
    logger.info("orthofx.transform %s: config %r, %d meta-layer(s), Pre-SVD layers [%s], %d skipped, %d change(s) "
                "(%s)%s", type(model).__name__, cfg.name, len(analysis.entries), ", ".join(analysis.producers),
                len(analysis.skipped), len(actions), ", ".join(str(a) for a in actions) or "none",
                "" if modified else "; the model is unchanged")
    return root, report


@traces_one_at_a_time
def replay(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply a saved :class:`~orthofx.rewrite.Plan` to a fresh, unmodified ``model`` without
    analysing it again (checkpoints): :func:`orthofx.rewrite.apply_plan` on a deep copy, so
    the same producers get the same per-layer treatments and the raw decompositions the plan
    swapped are swapped again at the same submodules (a graph swap on a fresh symbolic trace
    of that submodule, same node names: a fused eigh + ``U f(Λ) Uᵀ`` becomes the same
    ``ExactSpectral``, the others ``StableDecomposition``; a call swap on the kept submodule).
    A fused swap from a plan written before orthofx recorded ``output`` is replayed as a
    ``StableDecomposition`` with a warning (same forward, not the same backward).

    Raises :class:`ConfigError` naming the first producer that is missing from ``model`` or has
    another shape, or the swapped nodes this model's trace does not have (a different architecture).
    """
    _refuse_wrappers(model)
    work = _deepcopy(model)
    for p in plan.producers:
        try:
            module = work.get_submodule(p.name) if p.name else work
        except AttributeError:
            raise ConfigError(f"the checkpoint's producer {p.param!r} is not a module of "
                              f"{type(model).__name__} (a different architecture?)") from None
        w = getattr(module, p.attr, None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(p.weight_shape):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ConfigError(f"the checkpoint's producer {p.param!r} has shape {tuple(p.weight_shape)}, "
                              f"this model's is {got} (a different architecture?)")
    if plan.swaps and any(s.output is None and s.original == FUSED_ORIGINAL for s in plan.swaps):
        warnings.warn("the checkpoint's plan fused an eigh + U f(Λ) Uᵀ without recording its output node (an "
                      "older orthofx): it is replayed as a stable eigh, with the same forward but not the exact "
                      "backward", UserWarning, stacklevel=2)
        plan = dataclasses.replace(plan, swaps=[dataclasses.replace(s, original="torch.linalg.eigh")
                                                if s.output is None and s.original == FUSED_ORIGINAL else s
                                                for s in plan.swaps])
    try:
        root, applied, actions = apply_plan(work, plan)
    except (AttributeError, TraceFailure) as exc:
        raise ConfigError(f"the checkpoint's swaps do not fit {type(model).__name__} ({exc}; a different "
                          f"architecture?)") from None
    report = TransformReport(_previous_analysis(root, plan), applied, modified=True, actions=actions,
                             notes=["replayed from a saved plan"])
    _store(root, report.plan, report)
    return root


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding non-leaf tensors as attributes (a
    loss kept from the last forward, the computed weight of the hook-based ``weight_norm``):
    those are copied detached. Raises :class:`InputError` with the reason otherwise."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in m.__dict__.values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"{type(model).__name__} cannot be deep-copied ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); transform() and strip() work on a copy. "
            f"Pass config=OrthoConfig(..., inplace=True) to transform the model itself") from exc


_deepcopy = safe_deepcopy


def _previous_analysis(root: nn.Module, plan: Plan) -> AnalysisReport:
    """The analysis of an earlier transform, from its plan (nothing is re-run)."""
    report = AnalysisReport(model=type(root).__name__)
    report.notes.append("producers of the earlier transform: " + (", ".join(p.param for p in plan.producers)
                                                                 or "none"))
    return report


def _optional_arguments(model: nn.Module) -> list[str]:
    """Arguments of ``forward`` with defaults, and ``*args``/``**kwargs``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return ["<unknown signature>"]
    out = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out.append(("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name)
        elif p.default is not p.empty:
            out.append(f"{p.name}={p.default!r}")
    return out


_MODULE_API = frozenset(dir(nn.Module))


def _incomplete(work: nn.Module, gm: fx.GraphModule) -> str:
    """What a GraphModule of ``work`` would not have ("" when nothing): submodules forward
    never calls, hooks on the root, methods or properties of the user's class. Plain instance
    attributes are copied over."""
    gm_modules = {n for n, _ in gm.named_modules()}
    dropped = [n for n, _ in work.named_modules() if n not in gm_modules]
    if dropped:
        return f"the submodule(s) {', '.join(dropped[:3])} that forward does not call"
    hooks = [a for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                         "_state_dict_hooks", "_load_state_dict_pre_hooks") if getattr(work, a, None)]
    if hooks:
        return f"the hooks registered on the root module ({', '.join(h.strip('_') for h in hooks)})"
    extra = sorted({name for klass in type(work).__mro__ if klass not in (nn.Module, object)
                    for name, v in vars(klass).items()
                    if not name.startswith("__") and name not in ("forward", "extra_repr")
                    and name not in _MODULE_API and (callable(v) or isinstance(v, property))})
    if extra:
        return f"the methods of {type(work).__name__} ({', '.join(extra[:3])})"
    for k, v in work.__dict__.items():
        if not k.startswith("_") and k != "training" and k not in gm.__dict__:
            gm.__dict__[k] = v
    return ""


#: what to use instead when a raw decomposition cannot be swapped (the report names it)
REPLACEMENTS = ("orthofx.nn.DecorrelatedBatchNorm(num_features, groups=, eps=, momentum=, iters=) for ZCA "
                "whitening, orthofx.nn.CovariancePooling(in_channels, reduced=, eps=, iters=) for covariance "
                "pooling (iterNum -> iters, dimension_reduction -> reduced)")


def _replacements(entries: Sequence[Any], model: nn.Module) -> str:
    """What to use instead of raw decompositions that stay: the orthofx.nn module with the
    arguments read from the user's module (:func:`orthofx.graph.replacement.replacement_for`)
    for each entry that has one, else the generic :data:`REPLACEMENTS`."""
    from orthofx.graph.replacement import replacement_for

    specific = sorted({t for e in entries if (t := replacement_for(e, model))})
    return "; ".join(specific) if specific else REPLACEMENTS


def _inputs_of(model: nn.Module, scope: str, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The positional inputs of submodule ``scope``'s first call in one forward of a copy
    (None when it takes keyword arguments or is not called). The user's hooks stay silent
    (the copy shares their closures)."""
    from orthofx.graph.state import quiet_user_hooks

    twin = copy.deepcopy(model).train()
    seen: list[tuple[Any, ...]] = []

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append(args if not kwargs else None)  # type: ignore[arg-type]

    rng = torch.get_rng_state()
    try:
        with torch.no_grad(), quiet_user_hooks(twin):
            # registered inside: quiet_user_hooks silences every non-torch hook present when entered
            (twin.get_submodule(scope) if scope else twin).register_forward_pre_hook(pre, with_kwargs=True)
            twin(*inputs)
    finally:
        torch.set_rng_state(rng)
    return seen[0] if seen else None


def _graph_swaps(work: nn.Module, scope: str, n_calls: int, treated_here: bool, cfg: OrthoConfig,
                 inputs: tuple[Any, ...]) -> tuple[nn.Module | None, list[SwapRecord], str]:
    """(candidate model, records, "") of the graph route at ``scope``, or (None, [], why not)."""
    from orthofx.rewrite import _replace_submodule, decomposition_nodes, graph_of

    twin = _deepcopy(work)
    module = twin.get_submodule(scope) if scope else twin
    optional = _optional_arguments(module)
    if optional:
        return None, [], f"forward takes optional arguments ({', '.join(optional)})"
    if treated_here:
        return None, [], "a Pre-SVD weight with OW/SN is its own parameter"
    try:
        gm = graph_of(module, cfg.analysis)
    except TraceFailure as exc:
        return None, [], f"it cannot be traced symbolically ({exc})"
    inplace = [n.args[0].target for n in gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")
               and not n.target.endswith("__") and n.args and getattr(n.args[0], "op", "") == "get_attr"]
    if inplace:
        return None, [], f"it updates {inplace[0]} in place, which a traced graph would do with gradients"
    missing = _incomplete(module, gm)
    if missing:
        return None, [], f"a traced graph would lose {missing}"
    nodes = decomposition_nodes(gm)
    if not nodes:  # every raw call of this forward is swapped; verification guards the others
        return None, [], "the trace shows no decomposition call"
    sub_inputs = _inputs_of(work, scope, inputs) if scope else inputs
    fused: list[Any] = []
    if sub_inputs is not None:
        for usage in ("invsqrtm", "sqrtm"):
            entries = [SimpleNamespace(node=n.name, source="torch", kind="eigh", usage=usage, scope=scope)
                       for n in decomposition_nodes(gm) if n.target is torch.linalg.eigh]
            fused += fuse_reconstructions(gm, entries, sub_inputs)
    fused_nodes = {f.node for f in fused}
    entries = [SimpleNamespace(node=n.name, source="torch", scope=scope)
               for n in decomposition_nodes(gm) if n.name not in fused_nodes]
    stable = swap_meta_layers(gm, SimpleNamespace(entries=entries))
    by_node = {s.node: dataclasses.replace(s, scope=scope) for s in stable}
    by_node.update((f.node, SwapRecord(node=f.node, original=FUSED_ORIGINAL, kind=f.usage, module=f.module,
                                       output=f.output, scope=scope)) for f in fused)
    records = [by_node[n.name] for n in nodes if n.name in by_node]
    if scope:
        _replace_submodule(twin, scope, gm)
    else:
        twin = gm
    return twin, records, ""


def _call_swaps(work: nn.Module, scope: str, n_calls: int, inputs: tuple[Any, ...]
                ) -> tuple[nn.Module | None, list[SwapRecord], str]:
    """(candidate model, records, "") of the call route at ``scope`` (the submodule is kept),
    or (None, [], why not)."""
    from orthofx.rewrite import install_calls, original_name, probe_calls

    runs = probe_calls(work, scope, inputs)
    if not runs or not runs[0] or any(r != runs[0] for r in runs):
        return None, [], "its forward's raw decomposition calls differ from run to run"
    records = []
    for i, target in enumerate(runs[0]):
        kind = StableDecomposition.for_target(target).kind
        records.append(SwapRecord(node=f"call{i}", original=original_name(target), kind=kind,
                                  module=f"{STABLE_PREFIX}call{i}", scope=scope, via="call"))
    twin = _deepcopy(work)
    install_calls(twin, records, scope)
    return twin, records, ""


def _stable_rewrite(work: nn.Module, analysis: AnalysisReport, cfg: OrthoConfig, example_inputs: Any,
                    verify: bool) -> tuple[list[SwapRecord] | None, list[str]]:
    """Decide the verified stable swaps of the raw eigh/svd meta-layers, each at the smallest
    enclosing submodule (the one whose forward calls it; the entry's scope): that submodule
    becomes a GraphModule of its own trace when the trace is complete (fusing eigh +
    ``U f(Λ) Uᵀ``), else it is kept and its decomposition calls are answered at run time
    (:class:`orthofx.rewrite.StableCalls`). Each candidate is verified against ``work``
    (:func:`orthofx.verify.verify_rewrite`); ``work`` itself is not changed (``apply_plan``
    makes the swaps). Returns (swaps or None, notes)."""
    from orthofx.plan import layer_choice

    raw = [e for e in analysis.entries if e.source == "torch" and e.kind in ("eigh", "svd")]
    if not cfg.stabilize or not raw:
        return None, []
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    scopes: dict[str, set[str]] = {}
    for e in raw:
        scopes.setdefault(e.scope or "", set()).add(e.node)
    swaps: list[SwapRecord] = []
    notes: list[str] = []
    for scope, nodes in scopes.items():
        here = [e for e in raw if (e.scope or "") == scope]
        where = f"{', '.join(sorted({e.kind for e in here}))} in {scope or '<root>'}"
        inner = [o for o in scopes if o != scope and (not scope or o.startswith(scope + "."))]
        try:
            if scope:
                work.get_submodule(scope)
        except AttributeError:
            notes.append(f"raw decompositions kept as they are ({where}): not a submodule path; "
                         f"use {_replacements(here, work)}")
            continue
        if inner:
            notes.append(f"raw decompositions kept as they are ({where}): its submodule {inner[0]} has its own; "
                         f"use {_replacements(here, work)}")
            continue
        treated_here = any(
            layer_choice(cfg, e.producer.param.rpartition(".")[0], e.producer.param)[0].weight in ("ow", "sn")
            for e in analysis.entries if e.producer.param.rpartition(".")[0] == scope)
        reasons = []
        for route in ("graph", "call"):
            try:
                if route == "graph":
                    cand, recs, why = _graph_swaps(work, scope, len(nodes), treated_here, cfg, inputs)
                else:
                    cand, recs, why = _call_swaps(work, scope, len(nodes), inputs)
            except Exception as exc:  # noqa: BLE001 - a route that fails is not taken
                cand, recs, why = None, [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if cand is None:
                reasons.append(f"{route}: {why}")
                continue
            how = (f"{route}: {scope or '<root>'} kept as the user's {type(work.get_submodule(scope) if scope else work).__name__}, "
                   f"its raw calls answered by StableDecomposition at run time" if route == "call" else route)
            # the ways not taken and why (a graph that would lose something or diverge) are said too
            untaken = "".join(f"; no {r.partition(': ')[0]} swap: {r.partition(': ')[2]}" for r in reasons)
            if verify:
                check = verify_rewrite(work, cand, inputs)
                if not check.ok:
                    reasons.append(f"{route}: the rewritten model {check.describe()}")
                    continue
                notes.append(f"stable rewrite of {where} ({how}) {check.describe()}{untaken}")
            else:
                notes.append(f"stable rewrite of {where} ({how}) not verified (verify=False){untaken}")
            swaps += recs
            break
        else:
            notes.append(f"raw decompositions kept as they are ({where}): {'; '.join(reasons)}; the original "
                         f"module is kept; use {_replacements(here, work)}")
    return (swaps or None), notes


def producer_specs(gm: nn.Module, plan: Plan) -> dict[str, tuple[nn.Module, str]]:
    """``{parameter name: (owning module, attribute)}`` of the plan's Pre-SVD weights in
    ``gm`` (the unwrapped transformed module): what the gradient treatments act on."""
    return {p.param: ((gm.get_submodule(p.name) if p.name else gm), p.attr) for p in plan.producers}


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, **overrides: Any) -> AttachHandle:
    """Install the plan's NOG/OLR on ``optimizer`` (an optimizer step pre-hook, so they see
    the gradient the optimizer uses: after DDP all-reduce, ``GradScaler.unscale_`` and
    accumulation). ``model``: the transformed module (DDP/compile wrappers are unwrapped).

    The plan decides per Pre-SVD layer (:func:`orthofx.plan.gradient_plan`): the chain acts on
    the layers whose plan entry (their ``layer_configs`` entry, or the config) has NOG or OLR,
    with that entry's :class:`~orthofx.specs.GradientSpec`; ``overrides`` that are spec fields
    (``nog_method="svd"``, ``ow_target=...``) replace its values. An explicit ``nog=True`` /
    ``olr=True``, ``chain=`` or ``skip_nonfinite=`` on a plan without NOG/OLR acts on every
    non-ignored Pre-SVD layer.

    ``chain=`` (in ``overrides``) installs the user's own gradient chain
    (:func:`orthofx.treatments.named_chain` of orthofx's pieces and their own) on those
    producers instead of the spec's default chain.

    Returns the :class:`~orthofx.treatments.attach.AttachHandle`, always: when there is
    nothing to install (no ``chain=`` or ``skip_nonfinite=`` and the plan and ``overrides`` have
    neither NOG nor OLR, or the model has no Pre-SVD layer, with a warning) it is an inactive
    one (:meth:`AttachHandle.inactive <orthofx.treatments.attach.AttachHandle.inactive>`: no
    hook, ``stats()`` without NOG/OLR entries). The other ``overrides`` go to
    :func:`orthofx.treatments.attach` (``chain``, ``lr_mode``, ``history``, ...; guide:
    docs/attach.md).

    Raises :class:`AttachError` for an untransformed model or an optimizer that does not hold
    the producer parameters; :class:`ConfigError` when the layers with NOG/OLR ask for
    different gradient options.
    """
    plan = plan_of(model)
    if plan is None:
        raise AttachError(
            "attach() needs a model returned by orthofx.transform (no orthofx plan found on "
            f"{type(model).__name__})"
        )
    given = {k: overrides.pop(k) for k in GRADIENT_KEYS if k in overrides}
    choice = gradient_plan(plan, given, forced=overrides.get("chain") is not None
                           or bool(overrides.get("skip_nonfinite")))
    if not choice.live and (choice.forced or plan.config.gradients.active):
        warnings.warn("orthofx.attach: the model has no Pre-SVD layer, so the gradient chain has nothing to "
                      "act on", stacklevel=2)
        return AttachHandle.inactive(optimizer)
    if not choice.producers:
        return AttachHandle.inactive(optimizer, [p.param for p in choice.live])
    specs = producer_specs(unwrap(model), dataclasses.replace(plan, producers=choice.producers))
    return _attach_params(optimizer, specs, choice.spec, **overrides)


def orthogonality_loss(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """OL: ``Σ_producers ol_weight · ‖W Wᵀ − I‖_F`` on the flattened producer weights
    (``WᵀW − I`` for tall weights) of the layers whose config (per layer) has ``weight="ol"``;
    otherwise a zero 0-d tensor (so ``loss + orthogonality_loss(gm)`` is always valid).

    ``weight`` overrides the config's ``ol_weight``.
    """
    if weight is not None:
        check_loss_weight(weight, "weight")
    plan = plan_of(model)
    root = unwrap(model)
    if plan is None or not plan.producers:
        p = next(root.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    root_specs = producer_specs(root, plan)
    groups: dict[float, list[torch.Tensor]] = {}  # per layer: its own OL and ol_weight
    for p in plan.producers:
        if p.ignored or p.config is None or p.config.weight != "ol":
            continue
        m, attr = root_specs[p.param]
        groups.setdefault(p.config.ol_weight if weight is None else weight, []).append(getattr(m, attr))
    if not groups:
        q = next(root.parameters(), None)
        return torch.zeros((), device=q.device if q is not None else None)
    terms = [_ol(ts, weight=w) for w, ts in groups.items()]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()
