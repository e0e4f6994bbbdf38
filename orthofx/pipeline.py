"""``orthofx.transform``: trace → find → plan → rewrite → report, and the training-time API.

    gm, report = orthofx.transform(model, example_inputs, config="nog+ow+olr")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    orthofx.attach(opt, gm)                                # NOG / OLR at every opt.step()
    loss = task_loss + orthofx.orthogonality_loss(gm)      # OL (zero unless configured)
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from orthofx._log import logger
from orthofx.config import OrthoConfig, check_weight, resolve_config
from orthofx.errors import AttachError, ConfigError, InputError, TraceFailure
from orthofx.graph import AnalysisReport, analyze, analyze_graph, trace
from orthofx.graph.trace import traces_one_at_a_time
from orthofx.plan import Action, ActionKind, Plan, SwapRecord, make_plan
from orthofx.report import TransformReport
from orthofx.rewrite import META_KEY, STABLE_PREFIX, apply_plan, swap_meta_layers
from orthofx.fuse import FUSED_ORIGINAL, ExactSpectral, fuse_at, fuse_reconstructions
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
            the analysis records one concrete forward (:func:`orthofx.graph.discover`), so it
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
    (``orthofx.graph.trace.TRACE_LOCK``; torch.fx patches module calls process-wide while it traces).

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
    swaps = None
    if example_inputs is None:
        analysis = analyze(work, None, cfg.analysis)
        root: nn.Module = analysis.graph_module if analysis.graph_module is not None else work
        notes.append("no example inputs: the analysis used symbolic fx tracing only, which cannot see inside "
                     "autograd.Functions, loops or branches; pass example inputs to analyse what really runs")
        if analysis.graph_module is None:
            notes.append("the root module could not be traced; treatments were applied to the analysed "
                         "submodules and raw meta-layers were not swapped")
    else:
        analysis = analyze(work, example_inputs, cfg.analysis)  # recorded (symbolic if it cannot be)
        root, swaps, rewrite_notes = _stable_rewrite(work, analysis, cfg, example_inputs, verify)
        notes += rewrite_notes
        if swaps and cfg.weight in ("ow", "sn") and any(
                e.producer.param.rpartition(".")[0] == "" for e in analysis.entries):
            # a parametrization on a GraphModule's own attribute breaks its generated code
            root, swaps = work, None
            notes.append("raw decompositions kept as they are: a Pre-SVD weight is a parameter of the root "
                         "module, which OW/SN cannot re-parametrize inside a rewritten graph")
    if not analysis.entries:
        notes.append("no meta-layer with a Pre-SVD layer was found; the model is unchanged"
                     + (f" ({len(analysis.skipped)} meta-layer(s) skipped, see report)" if analysis.skipped else ""))
    plan = make_plan(analysis, cfg, swaps=swaps)
    plan, actions = apply_plan(root, plan, analysis=analysis if swaps is None else None)
    if swaps:
        actions += [Action.of_swap(s, ActionKind.FUSE if isinstance(root.get_submodule(s.module), ExactSpectral)
                                   else ActionKind.STABLE_SWAP) for s in swaps]
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
    analysing it again (checkpoints): the same producers get the same treatments, and raw
    decompositions the plan swapped are swapped again on a symbolic trace (same node names):
    a fused eigh + ``U f(Λ) Uᵀ`` (a swap with an ``output`` node) becomes the same
    ``ExactSpectral`` (:func:`orthofx.fuse.fuse_at`), the others ``StableDecomposition``.
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
    root: nn.Module = work
    swaps: list[SwapRecord] = []
    fused_nodes: set[str] = set()
    if plan.swaps:
        gm = trace(work, plan.config.analysis)
        fx_analysis = analyze_graph(gm, plan.config.analysis)
        scopes = {e.node: e.scope or "" for e in fx_analysis.entries}
        done: dict[str, SwapRecord] = {}
        for s in plan.swaps:
            if s.output is None:
                if s.original == FUSED_ORIGINAL:
                    warnings.warn(f"the checkpoint's plan fused the eigh + U f(Λ) Uᵀ at {s.node!r} without "
                                  f"recording its output node (an older orthofx): it is replayed as a stable eigh, "
                                  f"with the same forward but not the exact {s.kind} backward", UserWarning,
                                  stacklevel=2)
                continue
            try:
                f = fuse_at(gm, s.node, s.output, s.kind, scope=scopes.get(s.node, ""))
            except ConfigError as exc:
                raise ConfigError(f"the checkpoint fused an eigh + U f(Λ) Uᵀ at {s.node!r} -> {s.output!r}; "
                                  f"this model's trace does not fit ({exc}; a different architecture?)") from None
            done[s.node] = SwapRecord(f.node, FUSED_ORIGINAL, f.usage, f.module, output=f.output)
        wanted = {s.node for s in plan.swaps if s.node not in done}
        fx_analysis.entries = [e for e in fx_analysis.entries if e.node in wanted]
        stable = swap_meta_layers(gm, fx_analysis) if wanted else []
        if {s.node for s in stable} != wanted:
            raise ConfigError(f"the checkpoint swapped meta-layers at {sorted(wanted)}, this model's trace has "
                              f"{sorted(s.node for s in stable)} (a different architecture?)")
        done.update((s.node, s) for s in stable)
        swaps = [done[s.node] for s in plan.swaps]
        fused_nodes = {s.node for s in swaps if s.output is not None}
        root = gm
    applied, actions = apply_plan(root, Plan(plan.config, plan.producers, swaps))
    actions += [Action.of_swap(s, ActionKind.FUSE if s.node in fused_nodes else ActionKind.STABLE_SWAP)
                for s in swaps]
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


def _stable_rewrite(work: nn.Module, analysis: AnalysisReport, cfg: OrthoConfig, example_inputs: Any,
                    verify: bool) -> tuple[nn.Module, list[SwapRecord] | None, list[str]]:
    """Swap raw eigh/svd meta-layers for stable ones where the rewrite is faithful.

    Returns (root, swaps, notes). The root is a verified GraphModule when something was
    swapped, else ``work`` itself (the deep copy of the user's model).
    """
    raw = [e for e in analysis.entries if e.source == "torch" and e.kind in ("eigh", "svd")]
    if not cfg.stabilize or not raw:
        return work, None, []
    sites = sorted({f"{e.kind} in {e.scope or '<root>'}" for e in raw})
    where = ", ".join(sites) if len(sites) <= 3 else f"{', '.join(sites[:3])} and {len(sites) - 3} more"
    optional = _optional_arguments(work)
    if optional:
        return work, None, [f"raw decompositions kept as they are ({where}): forward takes optional arguments "
                            f"({', '.join(optional)}) that a traced graph would fix to their defaults"]
    try:
        gm = trace(work, cfg.analysis)
    except TraceFailure as exc:
        return work, None, [f"raw decompositions kept as they are ({where}): the model cannot be traced "
                            f"symbolically for the stable rewrite ({exc})"]
    fx_analysis = analyze_graph(gm, cfg.analysis)
    want = set(analysis.producer_params)
    fx_analysis.entries = [e for e in fx_analysis.entries if e.producer.param in want and e.source == "torch"]
    if not fx_analysis.entries:
        return work, None, [f"raw decompositions kept as they are ({where}): the symbolic trace does not "
                            f"show them"]
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    fused = fuse_reconstructions(gm, fx_analysis.entries, inputs)
    fused_nodes = {f.node for f in fused}
    fx_analysis.entries = [e for e in fx_analysis.entries if e.node not in fused_nodes]
    swaps = swap_meta_layers(gm, fx_analysis)
    swaps += [SwapRecord(node=f.node, original=FUSED_ORIGINAL, kind=f.usage, module=f.module, output=f.output)
              for f in fused]
    if not swaps:
        return work, None, []
    missing = _incomplete(work, gm)
    if missing:
        return work, None, [f"raw decompositions kept as they are ({where}): a rewritten graph would lose "
                            f"{missing}; the original module is kept"]
    if verify:
        check = verify_rewrite(work, gm, inputs)
        if not check.ok:
            return work, None, [f"stable rewrite of {where} not applied: the rewritten model {check.describe()}; "
                                f"the original module is kept"]
        return gm, swaps, [f"stable rewrite {check.describe()}"]
    return gm, swaps, ["stable rewrite not verified (verify=False)"]


def producer_specs(gm: nn.Module, plan: Plan) -> dict[str, tuple[nn.Module, str]]:
    """``{parameter name: (owning module, attribute)}`` of the plan's Pre-SVD weights in
    ``gm`` (the unwrapped transformed module): what the gradient treatments act on."""
    return {p.param: ((gm.get_submodule(p.name) if p.name else gm), p.attr) for p in plan.producers}


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, **overrides: Any) -> AttachHandle:
    """Install the plan's NOG/OLR on ``optimizer`` (an optimizer step pre-hook, so they see
    the gradient the optimizer uses: after DDP all-reduce, ``GradScaler.unscale_`` and
    accumulation). ``model``: the transformed module (DDP/compile wrappers are unwrapped).

    ``chain=`` (in ``overrides``) installs the user's own gradient chain
    (:func:`orthofx.treatments.named_chain` of orthofx's pieces and their own) on the plan's
    producers instead of the config's default chain, whatever treatments the plan holds.

    Returns the :class:`~orthofx.treatments.attach.AttachHandle`, always: when there is
    nothing to install (no ``chain=`` or ``skip_nonfinite=`` and the plan and ``overrides`` have
    neither NOG nor OLR, or the model has no Pre-SVD layer, with a warning) it is an inactive
    one (:meth:`AttachHandle.inactive <orthofx.treatments.attach.AttachHandle.inactive>`: no
    hook, ``stats()`` without NOG/OLR entries). ``overrides`` go to
    :func:`orthofx.treatments.attach` (``chain``, ``lr_mode``, ``nog_method``, ``history``, ...).

    Raises :class:`AttachError` for an untransformed model or an optimizer that does not hold
    the producer parameters.
    """
    plan = plan_of(model)
    if plan is None:
        raise AttachError(
            "attach() needs a model returned by orthofx.transform (no orthofx plan found on "
            f"{type(model).__name__})"
        )
    cfg = plan.config
    custom = overrides.get("chain") is not None
    if not (custom or cfg.nog or cfg.olr or overrides.get("nog") or overrides.get("olr")
            or overrides.get("skip_nonfinite")):
        return AttachHandle.inactive(optimizer, [p.param for p in plan.producers])
    if not plan.producers:
        warnings.warn("orthofx.attach: the model has no Pre-SVD layer, so the gradient chain has nothing to "
                      "act on", stacklevel=2)
        return AttachHandle.inactive(optimizer)
    if cfg.ow_target is not None:  # what NOG/OLR act on under OW; forwarded only when chosen
        overrides.setdefault("ow_target", cfg.ow_target)
    return _attach_params(optimizer, producer_specs(unwrap(model), plan), cfg, **overrides)


def orthogonality_loss(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """OL: ``ol_weight · Σ_producers ‖W Wᵀ − I‖_F`` on the flattened producer weights
    (``WᵀW − I`` for tall weights), when the plan's config has ``weight="ol"``; otherwise a
    zero 0-d tensor (so ``loss + orthogonality_loss(gm)`` is always valid).

    ``weight`` overrides the config's ``ol_weight``.
    """
    if weight is not None:
        check_weight(weight, "weight")
    plan = plan_of(model)
    root = unwrap(model)
    if plan is None or plan.config.weight != "ol" or not plan.producers:
        p = next(root.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    w = plan.config.ol_weight if weight is None else check_weight(weight, "weight")
    tensors = [getattr(m, attr) for m, attr in producer_specs(root, plan).values()]
    return _ol(tensors, weight=w)
