"""``analyze``: find every meta-layer and its Pre-SVD layer, without touching the model.

Pipeline: :func:`~orthofx.graph.trace.trace` → :func:`find_meta_layers` →
:class:`~orthofx.graph.fx_walk.Walker` per meta-layer → :class:`~orthofx.report.AnalysisReport`.

:func:`analyze_graph` runs the same analysis on an existing GraphModule (the rewrite reuses
its trace): entry ``node`` names and ``producer.node`` names are names of that graph's nodes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from orthofx.errors import InputError, TraceFailure
from orthofx.graph.config import AnalysisConfig, resolve_analysis_config
from orthofx.graph.fx_covariance import covariance_info
from orthofx.graph.fx_nodes import NodeGraph, describe_target
from orthofx.graph.fx_usage import detect_usage
from orthofx.graph.fx_walk import Step, Walker, WalkOutcome
from orthofx.graph.gradflow import fx_cut
from orthofx.graph.patterns import Patterns
from orthofx.vocab import MetaSpec, Role, is_meta_layer, meta_spec_of
from orthofx.graph.trace import (
    SCOPE_KEY,
    TRACE_LOCK,
    _class_keys,
    function_of,
    trace,
    trace_function_forward,
)
from orthofx.graph.record import quiet_user_hooks
from orthofx.report import (
    AnalysisReport,
    ChainStep,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
)

__all__ = ["analyze", "analyze_graph"]


@dataclass
class MetaSite:
    """A meta-layer call found in a graph.

    Attributes:
        node: its node.
        spec: kind and input.
        source: ``"torch"``, ``"orthofx"``, ``"config"`` or ``"autograd.Function"``.
        target: readable target.
        module: the leaf module for ``call_module`` sites.
        inner: for a Function whose forward holds the meta-layer: (forward's NodeGraph,
            the inner site, placeholder → outer argument keys).
    """

    node: fx.Node
    spec: MetaSpec
    source: str
    target: str
    module: nn.Module | None = None
    inner: tuple[NodeGraph, "MetaSite", list[Any]] | None = None


# --------------------------------------------------------------------------- finding
def find_meta_layers(ng: NodeGraph, patterns: Patterns, notes: list[str] | None = None,
                     _depth: int = 0) -> list[MetaSite]:
    """Every meta-layer call in ``ng``, in graph order."""
    cfg = patterns.config
    linalg = set(patterns.linalg.values())
    sites: list[MetaSite] = []
    for n in ng.nodes:
        if n.op == "call_function":
            cls = function_of(n.target)
            if cls is not None:
                sites += _function_sites(ng, n, cls, patterns, notes, _depth)
                continue
            spec = patterns.meta_for_function(n.target)
            if spec is not None:
                src = ("config" if n.target in cfg.meta_functions
                       else "orthofx" if n.target in linalg else "torch")
                sites.append(MetaSite(n, spec, src, describe_target(n, ng)))
        elif n.op == "call_method":
            spec = patterns.meta_methods.get(str(n.target))
            if spec is not None:
                sites.append(MetaSite(n, spec, "torch", f"Tensor.{n.target}"))
        elif n.op == "call_module":
            mod = ng.module(str(n.target))
            spec = patterns.meta_for_module(mod, str(n.target))
            if spec is not None:
                src = "orthofx" if is_meta_layer(mod) else "config"
                sites.append(MetaSite(n, spec, src, type(mod).__name__, module=mod))
    return sites


def _function_sites(ng: NodeGraph, n: fx.Node, cls: type, patterns: Patterns,
                    notes: list[str] | None, depth: int) -> list[MetaSite]:
    cfg = patterns.config
    name = cls.__qualname__
    for key, spec in cfg.meta_autograd_functions.items():
        if issubclass(cls, key):
            return [MetaSite(n, spec, "config", f"{name}.apply")]
    if not cfg.trace_autograd_functions or depth > 2:
        return []
    try:
        inner_gm, keys = trace_function_forward(cls, n, patterns)
    except TraceFailure as exc:
        if notes is not None:
            notes.append(f"autograd.Function {name}: {exc}")
        return []
    inner = NodeGraph(inner_gm, name=f"{name}.forward")
    inner_sites = find_meta_layers(inner, patterns, notes, depth + 1)
    return [MetaSite(n, s.spec, "autograd.Function", f"{name}.apply", inner=(inner, s, keys))
            for s in inner_sites]


# --------------------------------------------------------------------------- analysis
def analyze_graph(
    gm: fx.GraphModule,
    config: Any = None,
    *,
    example_inputs: Sequence[Any] | Any = None,
) -> AnalysisReport:
    """Analyse an existing GraphModule (e.g. from :func:`orthofx.graph.trace`); pure.

    Args:
        gm: the GraphModule. Entry ``node`` / ``producer.node`` names refer to its nodes.
        config: an :class:`AnalysisConfig`, ``None`` or an object with ``.analysis``.
        example_inputs: optional inputs; when given (and ``config.shapes``), tensor shapes
            along each chain are recorded by running the graph once on fake tensors.

    Returns:
        The :class:`~orthofx.report.AnalysisReport` (``report.graph_module is gm``).
    """
    cfg = resolve_analysis_config(config)
    patterns = Patterns(cfg)
    ng = NodeGraph(gm)
    info = ng.info
    report = AnalysisReport(model=info.model_type or type(gm).__name__, graph_module=gm)
    report.auto_leaves = list(info.auto_leaves)
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    if example_inputs is not None and cfg.shapes:
        shapes = _shapes(gm, example_inputs, report.notes)
    walker = Walker(ng, patterns)
    inner_walkers: dict[int, Walker] = {}
    sites = find_meta_layers(ng, patterns, report.notes)
    for cls in info.functions:
        report.notes.append(
            f"autograd.Function {cls.__qualname__} kept as one graph node (its custom backward "
            f"is preserved)")
    for site in sites:
        entry = _analyze_site(site, ng, walker, inner_walkers, patterns, shapes)
        cut = fx_cut(site.node, site.target) if isinstance(entry, MetaLayerEntry) else None
        if cut:
            entry = dataclasses.replace(entry, notes=(*entry.notes, cut))
        if site.module is not None:  # a meta-layer module: named by its path, its own usage
            usage = getattr(site.module, "orthofx_usage", None)
            entry = dataclasses.replace(entry, name=str(site.node.target),
                                        usage=usage if isinstance(usage, str) else entry.usage)
        (report.entries if isinstance(entry, MetaLayerEntry) else report.skipped).append(entry)
    report.name_meta_layers()
    if cfg.strict and report.skipped:
        s = report.skipped[0]
        raise TraceFailure(
            f"strict analysis: the Pre-SVD layer of meta-layer {s.node} ({s.kind}) in "
            f"{s.scope or '<root>'} could not be determined: {s.reason}",
            module=s.scope,
            hint="AnalysisConfig(transparent_functions=/transparent_methods=/transparent_modules=) "
                 "for ops that act per channel, or strict=False to skip it",
        )
    return report


def _scope(node: fx.Node) -> str:
    return str(node.meta.get(SCOPE_KEY, ""))


def _chain_steps(steps: Sequence[Step], ng: NodeGraph,
                 shapes: dict[fx.Node, tuple[int, ...]]) -> list[ChainStep]:
    return [ChainStep(node=s.node.name, op=s.node.op, target=describe_target(s.node, ng),
                      role=s.role, text=s.text or s.reason, shape=shapes.get(s.node),
                      graph=ng.name) for s in steps]


def _meta_step(site: MetaSite, ng: NodeGraph, shapes: dict[fx.Node, tuple[int, ...]]) -> ChainStep:
    n = site.node
    return ChainStep(node=n.name, op=n.op, target=site.target, role=Role.META,
                     text=f"{site.spec.kind} meta-layer ({site.source})",
                     shape=shapes.get(n), graph=ng.name)


def _analyze_site(site: MetaSite, ng: NodeGraph, walker: Walker, inner_walkers: dict[int, Walker],
                  patterns: Patterns, shapes: dict[fx.Node, tuple[int, ...]]
                  ) -> MetaLayerEntry | SkippedEntry:
    n = site.node
    spec = site.spec
    scope = _scope(n)
    common = dict(node=n.name, kind=spec.kind, scope=scope, target=site.target,
                  source=site.source, input=spec.input)
    meta_step = _meta_step(site, ng, shapes)

    # ---- a Pre-SVD layer inside an orthofx meta module
    if site.module is not None and hasattr(site.module, "orthofx_internal_producer"):
        try:
            rel = site.module.orthofx_internal_producer()
        except Exception as exc:  # noqa: BLE001
            return SkippedEntry(**common, reason=f"orthofx_internal_producer() failed: {exc}",
                                usage=_usage(ng, n, spec.kind), chain=(meta_step,))
        if rel:
            return _internal_entry(site, rel, common, ng, meta_step)

    allow_direct = spec.kind in ("svd", "svdvals")
    need_cov = spec.input == "covariance"
    # ---- a Function whose forward holds the meta-layer: walk inside, then outside
    if site.inner is not None:
        inner_ng, inner_site, keys = site.inner
        iw = inner_walkers.get(id(inner_ng))
        if iw is None:
            iw = inner_walkers[id(inner_ng)] = Walker(inner_ng, patterns)
        usage = detect_usage(inner_ng, inner_site.node, spec.kind)
        inner_meta = _meta_step(inner_site, inner_ng, {})
        out_in = iw.walk(_first_input(inner_site.node), have_cov=False, need_cov=need_cov,
                         allow_direct=allow_direct)
        inner_steps = _chain_steps(out_in.steps, inner_ng, {}) + [inner_meta]
        if out_in.status == "input":
            key = keys[out_in.input_index] if out_in.input_index is not None else None
            start = n.args[key] if isinstance(key, int) else n.kwargs.get(key)
            out = walker.walk(start, have_cov=out_in.have_cov, need_cov=need_cov,
                              allow_direct=allow_direct)
            steps_all = out.steps + out_in.steps
            chain = _chain_steps(out.steps, ng, shapes) + inner_steps + [meta_step]
            return _finish(out, steps_all, chain, common, usage, spec)
        chain = inner_steps + [meta_step]
        return _finish(out_in, out_in.steps, chain, common, usage, spec)

    usage = _usage(ng, n, spec.kind)
    out = walker.walk(_first_input(n), have_cov=False, need_cov=need_cov,
                      allow_direct=allow_direct)
    chain = _chain_steps(out.steps, ng, shapes) + [meta_step]
    return _finish(out, out.steps, chain, common, usage, spec)


def _usage(ng: NodeGraph, n: fx.Node, kind: str) -> str:
    try:
        return detect_usage(ng, n, kind)
    except Exception:  # noqa: BLE001 - usage is informative only
        return "unknown"


def _first_input(n: fx.Node) -> Any:
    if n.args:
        return n.args[0]
    return next(iter(n.kwargs.values()), None)


def _finish(out: WalkOutcome, steps: list[Step], chain: list[ChainStep], common: dict[str, Any],
            usage: str, spec: MetaSpec) -> MetaLayerEntry | SkippedEntry:
    if out.status != "producer":
        stop = out.steps[0].node.name if out.steps else None
        return SkippedEntry(**common, reason=out.reason or "no producer", stop_node=stop,
                            usage=usage, chain=tuple(chain))
    producer = out.producer
    assert producer is not None
    if spec.input == "features":
        cov = CovarianceInfo(form="module", expression=f"built inside {common['target']}")
    else:
        cov = covariance_info(steps, form_if_none="none")
    return MetaLayerEntry(**common, usage=usage, covariance=cov, producer=producer,
                          chain=tuple(chain))


def _internal_entry(site: MetaSite, rel: str, common: dict[str, Any], ng: NodeGraph,
                    meta_step: ChainStep) -> MetaLayerEntry | SkippedEntry:
    assert site.module is not None
    full = f"{site.node.target}.{rel}"
    try:
        sub = site.module.get_submodule(rel)
        w = sub.weight
    except AttributeError as exc:
        return SkippedEntry(**common, reason=f"internal producer {rel!r} not found: {exc}",
                            usage=site.spec.kind, chain=(meta_step,))
    shape = tuple(int(s) for s in w.shape)
    flat = (shape[0], int(torch.Size(shape[1:]).numel())) if shape else (0, 0)
    producer = ProducerInfo(
        name=full, type=type(sub).__name__, param=f"{full}.weight", weight_shape=shape,
        flat_shape=flat, node=site.node.name, form="internal", op=type(sub).__name__,
        groups=int(getattr(sub, "groups", 1)),
    )
    prod_step = ChainStep(node=site.node.name, op="call_module", target=f"{type(sub).__name__} {full}",
                          role=Role.PRODUCER, text=f"inside {site.target}", graph=ng.name)
    return MetaLayerEntry(**common, usage=_usage(ng, site.node, site.spec.kind),
                          covariance=CovarianceInfo(form="module",
                                                    expression=f"built inside {site.target}"),
                          producer=producer, chain=(prod_step, meta_step))


# --------------------------------------------------------------------------- shapes
def _shapes(gm: fx.GraphModule, example_inputs: Any, notes: list[str]
            ) -> dict[fx.Node, tuple[int, ...]]:
    """Output shapes of every node, from one run on fake tensors (eval mode, restored)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:  # pragma: no cover - private torch API
        notes.append("shapes not recorded: this torch has no FakeTensorMode")
        return {}

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                shapes[node] = tuple(int(s) for s in result.shape)
            return result

    modes = {m: m.training for m in gm.modules()}
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        gm.eval()
        # the user's hooks stay silent: they must never see (or keep) a FakeTensor
        with torch.no_grad(), quiet_user_hooks(gm), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            _Recorder(gm).run(*fake)
    except Exception as exc:  # noqa: BLE001 - shapes are informative only
        notes.append(f"shapes recorded up to the first node that cannot run on fake tensors "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    finally:
        for m, flag in modes.items():
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)
    return shapes


# --------------------------------------------------------------------------- analyze()
def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any = None,
    config: Any = None,
) -> AnalysisReport:
    """Find every meta-layer of ``model`` and its Pre-SVD layer. The model is not modified.

    Args:
        model: any ``nn.Module`` (unmodified architecture).
        example_inputs: example inputs (a tensor or a tuple). With them, the analysis is
            grounded in one concrete forward recorded at the op level
            (:func:`orthofx.graph.discover.discover`): it sees inside autograd.Functions,
            through loops, branches and ``.item()``, in training mode; the model is restored
            exactly. Without them, the model is traced symbolically with ``torch.fx``.
        config: an :class:`~orthofx.graph.config.AnalysisConfig`, ``None``, or an object with
            an ``.analysis`` attribute (e.g. ``OrthoConfig``).

    Returns:
        An :class:`~orthofx.report.AnalysisReport`: ``entries``, ``producers``, ``skipped``;
        ``report.graph_module`` is the traced GraphModule the node names refer to.

    Raises:
        TraceFailure: the model cannot be traced and the failure cannot be worked around
            (always with ``strict=True``); ``.module`` / ``.hint`` say what to change.
        InputError: an example input holds NaN or Inf (the recorded forward would not show
            what the model does); it is named.

    Thread-safe: concurrent calls (and :func:`orthofx.transform`) trace one at a time.
    """
    check_example_inputs(example_inputs)
    with TRACE_LOCK:
        return _analyze(model, example_inputs, resolve_analysis_config(config))


def check_example_inputs(example_inputs: Any) -> None:
    """:class:`InputError` naming the first floating tensor among ``example_inputs`` (nested in
    tuples, lists and dicts) that holds NaN or Inf. Called once per transform/analysis: one
    host read per tensor (a device sync for CUDA inputs), never in a training step."""
    if example_inputs is None:
        return
    top = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    stack: list[tuple[str, Any]] = [(f"example_inputs[{i}]", v) for i, v in enumerate(top)][::-1]
    while stack:
        name, v = stack.pop()
        if isinstance(v, torch.Tensor):
            if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
                raise InputError(
                    f"{name} holds NaN or Inf: the analysis records one forward on the example inputs and "
                    f"would not see what the model does; pass finite example inputs (e.g. a batch of your data)")
        elif isinstance(v, (tuple, list)):
            stack += [(f"{name}[{i}]", x) for i, x in enumerate(v)][::-1]
        elif isinstance(v, dict):
            stack += [(f"{name}[{k!r}]", x) for k, x in v.items()][::-1]


def _analyze(model: nn.Module, example_inputs: Any, cfg: AnalysisConfig) -> AnalysisReport:
    from orthofx.graph.replacement import add_replacement_notes

    report = _analyze_model(model, example_inputs, cfg)
    add_replacement_notes(report, model)
    return report


def _analyze_model(model: nn.Module, example_inputs: Any, cfg: AnalysisConfig) -> AnalysisReport:
    note = None
    if example_inputs is not None:
        from orthofx.graph.discover import discover
        from orthofx.graph.record import RecordingFailure

        try:
            return discover(model, example_inputs, cfg)
        except RecordingFailure as exc:
            note = f"{exc}; analysed by symbolic fx tracing instead"
    try:
        gm = trace(model, cfg)
    except TraceFailure as exc:
        if cfg.strict or not cfg.auto_leaf or exc.module != "":
            raise
        report = _analyze_submodules(model, cfg, str(exc))
    else:
        report = analyze_graph(gm, cfg, example_inputs=example_inputs)
    if note:
        report.notes.insert(0, note)
    return report


def _child_config(cfg: AnalysisConfig, child: nn.Module, prefix: str) -> AnalysisConfig:
    names = {n for n, _ in child.named_modules() if n}
    classes: set[str] = set()
    for m in child.modules():
        classes |= _class_keys(type(m))
    keep = []
    for leaf in cfg.leaf_modules:
        if leaf.startswith(prefix) and leaf[len(prefix):] in names:
            keep.append(leaf[len(prefix):])
        elif leaf in classes:
            keep.append(leaf)
    return dataclasses.replace(cfg, leaf_modules=tuple(keep))


def _analyze_submodules(model: nn.Module, cfg: AnalysisConfig, why: str) -> AnalysisReport:
    report = AnalysisReport(model=type(model).__name__, partial=True)
    report.notes.append(f"{why} The submodules were analysed on their own; meta-layers whose "
                        f"covariance is formed in an untraceable forward are not seen.")
    _collect_children(model, "", cfg, report)
    report.name_meta_layers()
    return report


def _collect_children(module: nn.Module, prefix: str, cfg: AnalysisConfig,
                      report: AnalysisReport) -> None:
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if is_meta_layer(child):
            _standalone_meta(child, full, report)
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or type(child).forward is nn.Module.forward:
            _collect_children(child, f"{full}.", cfg, report)
            continue
        if type(child).__module__.startswith(("torch.nn", "torch.ao.nn")) \
                and not isinstance(child, nn.Sequential):
            continue  # a standard leaf holds no meta-layer
        try:
            sub = analyze_graph(trace(child, _child_config(cfg, child, f"{full}.")), cfg)
        except TraceFailure as exc:
            if exc.module == "":
                report.notes.append(f"{full} ({type(child).__name__}) cannot be traced either; "
                                    f"analysing its submodules")
                _collect_children(child, f"{full}.", cfg, report)
            else:
                report.notes.append(f"{full}: {exc}")
            continue
        _merge(report, sub, full)


def _merge(report: AnalysisReport, sub: AnalysisReport, prefix: str) -> None:
    def q(name: str) -> str:
        return f"{prefix}.{name}" if name else prefix

    for e in sub.entries:
        p = e.producer
        report.entries.append(dataclasses.replace(
            e, scope=q(e.scope), graph=prefix, name=q(e.name) if e.name and not e.name.startswith("<root>") else "",
            producer=dataclasses.replace(p, name=q(p.name), param=q(p.param)),
        ))
    for s in sub.skipped:
        report.skipped.append(dataclasses.replace(s, scope=q(s.scope), graph=prefix,
                                                  name=q(s.name) if s.name and not s.name.startswith("<root>") else ""))
    for a in sub.auto_leaves:
        report.auto_leaves.append(dataclasses.replace(a, name=q(a.name)))
    report.notes += [f"{prefix}: {n}" for n in sub.notes]


def _standalone_meta(mod: nn.Module, name: str, report: AnalysisReport) -> None:
    spec = meta_spec_of(mod)
    kind, inp = (spec.kind, spec.input) if spec is not None else ("?", "covariance")
    rel = mod.orthofx_internal_producer() if hasattr(mod, "orthofx_internal_producer") else None
    common = dict(node=name, kind=kind, scope=name, target=type(mod).__name__, source="orthofx",
                  input=inp, graph=name, name=name)
    if rel:
        sub = mod.get_submodule(rel)
        shape = tuple(int(s) for s in sub.weight.shape)
        producer = ProducerInfo(
            name=f"{name}.{rel}", type=type(sub).__name__, param=f"{name}.{rel}.weight",
            weight_shape=shape, flat_shape=(shape[0], int(torch.Size(shape[1:]).numel())),
            node=name, form="internal", op=type(sub).__name__,
        )
        report.entries.append(MetaLayerEntry(
            **common, usage=getattr(mod, "orthofx_usage", None) or (kind if kind in ("sqrtm", "invsqrtm") else "unknown"),
            covariance=CovarianceInfo(form="module", expression=f"built inside {type(mod).__name__}"),
            producer=producer))
    else:
        report.skipped.append(SkippedEntry(
            **common, reason="its input is computed in a forward that cannot be traced"))
