"""Discovery grounded in what runs: record → covariances → regions → producers → report.

:func:`discover` is what :func:`orthofx.analyze` does when example inputs are given. It runs
the model once (:func:`~orthofx.graph.recorded.record.record`), finds the covariance-like products
(:mod:`~orthofx.graph.recorded.covariances`), keeps those whose region reaches a matrix function
(:mod:`~orthofx.graph.recorded.regions`) and walks back to their producers
(:mod:`~orthofx.graph.recorded.producers`). Repeated calls of one meta-layer (a per-sample loop) are
reported once. Pure: the model is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orthofx.graph.config import AnalysisConfig
from orthofx.graph.recorded.covariances import Covariance, find_covariances
from orthofx.graph.recorded.gradflow import recorded_cut
from orthofx.graph.recorded.ops import CovForm, NodeKind
from orthofx.vocab import MatFn, Role
from orthofx.graph.recorded.producers import Producer, walk_producers, weighted
from orthofx.graph.recorded.record import Recording, function_name, record
from orthofx.graph.recorded.regions import Region, region_of
from orthofx.graph.recorded.usage import detect_usage
from orthofx.graph.result import (
    AnalysisReport,
    ChainStep,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
)

__all__: list[str] = []  # internal module: import what you need by name

GRAPH = "recorded"

_USAGE = {MatFn.NS_SQRT: "sqrtm", MatFn.NS_INVSQRT: "invsqrtm"}


@dataclass
class MetaLayer:
    """One meta-layer of a recording: a covariance, its region, its producers."""

    cov: Covariance
    region: Region
    producers: list[Producer]
    parent: dict[int, int]
    dead_ends: list[str]
    calls: int = 1
    covs: list[int] = field(default_factory=list)  # every call's covariance node, in order

    def __post_init__(self) -> None:
        if not self.covs:
            self.covs = [self.cov.node]


def discover(model: Any, example_inputs: Any, config: AnalysisConfig | None = None,
             *, kwargs: dict[str, Any] | None = None) -> AnalysisReport:
    """Find every meta-layer of ``model`` and its producers from one recorded forward.

    Raises:
        TraceFailure: the model's forward fails on ``example_inputs``.
        ConfigError: a ``config`` entry names a module or Function that never runs.
    """
    cfg = config or AnalysisConfig()
    rec = record(model, example_inputs, kwargs=kwargs)
    _check_scope(cfg, rec, model)
    report = discover_recording(rec, cfg)
    report.model = type(model).__name__
    return report


def _check_scope(cfg: AnalysisConfig, rec: Recording, model: Any) -> None:
    from orthofx.errors import ConfigError

    modules = dict(model.named_modules())
    for name in cfg.leaf_modules:
        if name in modules and name not in rec.modules_run:
            raise ConfigError(f"AnalysisConfig.leaf_modules entry {name!r} names a module that does not run "
                              f"in the forward on the example inputs")
    for key in cfg.meta_modules:
        if isinstance(key, str) and key not in rec.modules_run:
            raise ConfigError(f"AnalysisConfig.meta_modules entry {key!r} names no module that runs "
                              f"in the forward on the example inputs")
        if isinstance(key, type) and not any(isinstance(m, key) for n, m in modules.items()
                                             if n in rec.modules_run):
            raise ConfigError(f"AnalysisConfig.meta_modules entry {key.__qualname__} matches no module "
                              f"that runs in the forward on the example inputs")
    for cls in cfg.meta_autograd_functions:
        if function_name(cls) not in rec.functions:
            raise ConfigError(f"AnalysisConfig.meta_autograd_functions entry {function_name(cls)} is not "
                              f"called in the forward on the example inputs")


def _configured_kind(cfg: AnalysisConfig, rec: Recording, region: Region) -> tuple[str, int] | None:
    """A matrix function declared in the config (meta module / Function) inside the region."""
    fn_kinds = {function_name(cls): spec.kind for cls, spec in cfg.meta_autograd_functions.items()}
    for i in region.nodes[1:]:
        n = rec.nodes[i]
        if n.function in fn_kinds:
            return fn_kinds[n.function], i
        for key, spec in cfg.meta_modules.items():
            if isinstance(key, str) and (n.module == key or n.module.startswith(key + ".")):
                return spec.kind, i
            if isinstance(key, type) and issubclass(rec.module_classes.get(n.module, object), key):
                return spec.kind, i
    return None


def find(rec: Recording, cfg: AnalysisConfig | None = None) -> tuple[list[MetaLayer], list[Covariance]]:
    """The meta-layers of a recording, and the covariances that reach no matrix function."""
    cfg = cfg or AnalysisConfig()
    claimed: set[int] = set()
    groups: dict[tuple[Any, ...], MetaLayer] = {}
    plain: list[Covariance] = []
    for cov in find_covariances(rec):
        if cov.node in claimed:
            continue  # a product inside an earlier meta-layer's iteration
        region = region_of(rec, cov.node)
        if region.kind is None and (cfg.meta_modules or cfg.meta_autograd_functions):
            hit = _configured_kind(cfg, rec, region)
            if hit is not None:
                region.kind, region.site = hit[0], hit[1]  # type: ignore[assignment]
        if region.kind is None:
            plain.append(cov)
            continue
        claimed.update(region.nodes)
        if cov.form is CovForm.CONGRUENCE:
            p = weighted(rec, rec.nodes[cov.node])
            producers, parent, dead = ([p] if p else []), {}, []
        else:
            producers, parent, dead = walk_producers(rec, cov.sources)
        site = rec.nodes[region.site] if region.site is not None else rec.nodes[cov.node]
        key = (site.module, site.function, str(region.kind), cov.form,
               tuple(sorted(p.param for p in producers)), rec.nodes[cov.node].op)
        if key in groups:
            groups[key].calls += 1
            groups[key].covs.append(cov.node)
            continue
        groups[key] = MetaLayer(cov, region, producers, parent, dead)
    return list(groups.values()), plain


def discover_recording(rec: Recording, cfg: AnalysisConfig | None = None, *,
                       found: tuple[list[MetaLayer], list[Covariance]] | None = None) -> AnalysisReport:
    """The :class:`AnalysisReport` of a recording (``found``: :func:`find`'s result, if known).
    Every entry is named by :func:`site_name` (:meth:`AnalysisReport.name_meta_layers`)."""
    metas, plain = found if found is not None else find(rec, cfg)
    report = AnalysisReport(model="", graph_module=None)
    report.notes += rec.notes
    for m in metas:
        common = _common(rec, m)
        chain_tail = _tail(rec, m)
        if not m.producers:
            why = "; ".join(m.dead_ends) or "no parameterised linear map feeds the covariance"
            report.skipped.append(SkippedEntry(
                **common, reason=f"no Pre-SVD layer: the features {why}", chain=tuple(chain_tail)))
            continue
        cut = recorded_cut(rec, site_index(m))
        for p in m.producers:
            report.entries.append(MetaLayerEntry(
                **common, covariance=_cov_info(rec, m), producer=_producer_info(rec, p),
                chain=tuple(_chain(rec, m, p) + chain_tail), notes=(cut,) if cut else ()))
    if rec.functions:
        report.notes.append("autograd.Functions run (their forwards were recorded op by op; their "
                            "backwards are untouched): " + ", ".join(rec.functions))
    if not metas:
        report.notes.append(_nothing_found(rec, plain))
    elif plain:
        report.notes.append(f"{len(plain)} covariance-like product(s) reach no matrix function and are not "
                            f"meta-layers (at {', '.join(sorted({_where(rec, c.node) for c in plain}))})")
    report.name_meta_layers()
    return report


def meta_owner(rec: Recording, module: str) -> str:
    """The module a meta-layer that runs in ``module``'s forward belongs to: the nearest
    enclosing orthofx meta-layer module (``module`` itself or an ancestor path: the
    decomposition inside ``DecorrelatedBatchNorm`` belongs to that module), else ``module``."""
    parts = module.split(".") if module else []
    for i in range(len(parts), 0, -1):
        path = ".".join(parts[:i])
        if _is_meta_class(rec.module_classes.get(path)):
            return path
    return module


def _is_meta_class(cls: Any) -> bool:
    """``cls`` carries a meta-layer marker (:func:`orthofx.vocab.is_meta_layer` of its instances)."""
    marker = getattr(cls, "orthofx_meta", None) if cls is not None else None
    return isinstance(getattr(marker, "kind", None), str)


def site_index(m: MetaLayer) -> int:
    """The node that marks meta-layer ``m`` (its decomposition, or its iteration's last product)."""
    return m.region.site if m.region.site is not None else m.cov.node


def _where(rec: Recording, i: int) -> str:
    n = rec.nodes[i]
    return n.module or "<root>"


def _nothing_found(rec: Recording, plain: list[Covariance]) -> str:
    from orthofx.graph.recorded.ops import DECOMPOSITIONS

    ops = [n for n in rec.nodes if n.kind is NodeKind.OP]
    decomps = sorted({f"{n.op} in {n.module or '<root>'}" for n in ops if n.op in DECOMPOSITIONS and n.data})
    parts = [f"the forward ran {len(ops)} ops in {len(rec.modules_run)} modules"
             f"{' (training mode)' if rec.training else ' (eval mode)'}"]
    if plain:
        parts.append(f"{len(plain)} covariance-like product(s) reach no matrix function (at "
                     f"{', '.join(sorted({_where(rec, c.node) for c in plain}))})")
    else:
        parts.append("no covariance-like product X Xᵀ / q kᵀ / Wᵀ S W of features was formed")
    if decomps:
        parts.append("decompositions not applied to a covariance: " + ", ".join(decomps[:6]))
    return "no meta-layer found: " + "; ".join(parts)


def _node_name(rec: Recording, i: int) -> str:
    return f"{rec.nodes[i].op}_{i}"


def _common(rec: Recording, m: MetaLayer) -> dict[str, Any]:
    site = rec.nodes[site_index(m)]
    kind = str(m.region.kind)
    target = site.function if site.function else f"aten.{site.op}"
    source = "autograd.Function" if site.function else "torch"
    scope = meta_owner(rec, site.module)
    owner = rec.module_classes.get(scope)
    usage = getattr(owner, "orthofx_usage", None)  # a meta-layer module states its own use
    if _is_meta_class(owner):
        source = "orthofx"
    if not isinstance(usage, str):
        usage = _USAGE.get(m.region.kind) or detect_usage(rec, site.index)  # type: ignore[call-overload]
    return dict(node=_node_name(rec, site.index), kind=kind, scope=scope, target=target,
                source=source, input="covariance", usage=str(usage), graph=GRAPH)


def _cov_info(rec: Recording, m: MetaLayer) -> CovarianceInfo:
    n = rec.nodes[m.cov.node]
    expr = m.cov.expression + (f" (×{m.calls} calls)" if m.calls > 1 else "")
    return CovarianceInfo(form=n.op, node=_node_name(rec, n.index), expression=expr,
                          centered=m.cov.centered)


def _producer_info(rec: Recording, p: Producer) -> ProducerInfo:
    owner_type = rec.module_types.get(p.module, "")
    applied_in = rec.nodes[p.node].module
    form = "module" if applied_in == p.module and owner_type in _MODULE_PRODUCERS else (
        "parameter" if p.op not in ("convolution", "_convolution", "addmm") and len(p.shape) == 2
        and owner_type not in _MODULE_PRODUCERS else "functional")
    return ProducerInfo(
        name=p.module, type=owner_type, param=p.param, weight_shape=tuple(p.shape),
        flat_shape=p.flat_shape, node=_node_name(rec, p.node), form=form,
        op=owner_type if form == "module" else p.op, transposed=p.transposed, groups=p.groups)


_MODULE_PRODUCERS = frozenset({"Conv1d", "Conv2d", "Conv3d", "Linear", "LazyLinear", "LazyConv2d",
                               "Bilinear", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"})


def _step(rec: Recording, i: int, role: str, text: str = "") -> ChainStep:
    n = rec.nodes[i]
    where = n.module or "<root>"
    fn = f" in {n.function}" if n.function else ""
    return ChainStep(node=_node_name(rec, i), op="aten", target=f"aten.{n.op} ({where}{fn})",
                     role=role, text=text, shape=n.shape, graph=GRAPH)


def _chain(rec: Recording, m: MetaLayer, p: Producer) -> list[ChainStep]:
    """Producer op → … → the op before the covariance (one path of the walk)."""
    steps = [_step(rec, p.node, Role.PRODUCER, f"applies {p.param}")]
    i = m.parent.get(p.node)
    for _ in range(10000):
        if i is None or i == m.cov.node:
            break
        steps.append(_step(rec, i, "op"))
        i = m.parent.get(i)
    return steps


def _tail(rec: Recording, m: MetaLayer) -> list[ChainStep]:
    steps = [_step(rec, m.cov.node, Role.COVARIANCE, f"{m.cov.form}: {m.cov.expression}")]
    if m.region.site is not None and m.region.site != m.cov.node:
        steps.append(_step(rec, m.region.site, Role.META,
                           f"{m.region.kind} ({m.region.products} iteration product(s))"
                           if m.region.products else str(m.region.kind)))
    return steps
