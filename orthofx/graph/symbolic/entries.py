"""The symbolic analysis of a traced graph: :func:`analyze_graph` (pure).

Pipeline: :func:`~orthofx.graph.symbolic.trace.trace` →
:func:`~orthofx.graph.symbolic.sites.find_meta_layers` →
:class:`~orthofx.graph.symbolic.walk.Walker` per meta-layer → one
:class:`~orthofx.graph.result.MetaLayerEntry` (or :class:`~orthofx.graph.result.SkippedEntry`)
per meta-layer, in an :class:`~orthofx.graph.result.AnalysisReport`.

:func:`analyze_graph` runs on an existing GraphModule (the rewrite reuses its trace): entry
``node`` names and ``producer.node`` names are names of that graph's nodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx as fx

from orthofx.errors import TraceFailure
from orthofx.graph.config import resolve_analysis_config
from orthofx.graph.result import (
    AnalysisReport,
    ChainStep,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
)
from orthofx.graph.state import quiet_user_hooks
from orthofx.graph.symbolic.covariance import covariance_info
from orthofx.graph.symbolic.gradflow import fx_cut
from orthofx.graph.symbolic.nodes import NodeGraph, describe_target
from orthofx.graph.symbolic.patterns import Patterns
from orthofx.graph.symbolic.sites import MetaSite, find_meta_layers
from orthofx.graph.symbolic.step import Step
from orthofx.graph.symbolic.trace import SCOPE_KEY
from orthofx.graph.symbolic.usage import detect_usage
from orthofx.graph.symbolic.walk import Walker, WalkOutcome
from orthofx.vocab import MetaSpec, Role

__all__ = ["analyze_graph"]


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
        The :class:`~orthofx.graph.result.AnalysisReport` (``report.graph_module is gm``).
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
