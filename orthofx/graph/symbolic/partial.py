"""A model that cannot be traced as a whole: its submodules, analysed on their own (pure).

When the root's forward cannot be traced (and ``AnalysisConfig.auto_leaf`` allows it),
:func:`analyze_submodules` traces every child on its own (recursing into containers and into
children that cannot be traced either) and merges their reports: names are qualified with the
child's path, each entry's ``graph`` names the submodule whose trace holds its ``node``, and the
report is ``partial``. An orthofx meta-layer module met on the way is reported from its marker
alone. Meta-layers whose covariance is formed in an untraceable forward are not seen.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from orthofx.errors import TraceFailure
from orthofx.graph.config import AnalysisConfig
from orthofx.graph.result import (
    AnalysisReport,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
)
from orthofx.graph.symbolic.entries import analyze_graph
from orthofx.graph.symbolic.trace import _class_keys, trace
from orthofx.vocab import is_meta_layer, meta_spec_of

__all__: list[str] = []  # internal module: import what you need by name


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


def analyze_submodules(model: nn.Module, cfg: AnalysisConfig, why: str) -> AnalysisReport:
    """The partial report of ``model``, whose own forward cannot be traced (``why`` says why,
    first of its notes): its children analysed on their own and merged."""
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
