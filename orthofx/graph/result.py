"""What the analysis finds, as data: the records :func:`orthofx.graph.analyze` returns.

:class:`AnalysisReport` holds one :class:`MetaLayerEntry` per meta-layer whose Pre-SVD
layer (producer, :class:`ProducerInfo`) was determined, one :class:`SkippedEntry` per
meta-layer whose producer could not be determined (with the reason), and the automatic
decisions of the tracer. An entry's :class:`CovarianceInfo` says how the decomposed matrix is
formed; its ``chain`` (:class:`ChainStep`) lists the ops from the producer to the meta-layer.

Both engines (``recorded/`` and ``symbolic/``) build these records; :mod:`orthofx.report`
re-exports them next to ``TransformReport``. Views: ``str(report)`` (a table),
``report.to_dict()`` (JSON-serialisable), ``report.to_dot()`` / ``report.to_png(path)``
(:mod:`orthofx.graph.draw`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "ProducerInfo",
    "CovarianceInfo",
    "ChainStep",
    "MetaLayerEntry",
    "SkippedEntry",
    "AnalysisReport",
    "meta_layer_name",
    "ROOT_NAME",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


#: the name of a meta-layer that runs in the root module's own forward: ``<root>.forward:<kind>``
ROOT_NAME = "<root>"


def meta_layer_name(scope: str, kind: str) -> str:
    """The one name of a meta-layer, used by the report, the monitor, its sinks, the loggers
    and the CLI: the qualified path of the module whose forward runs it (``"head.cov_pool"``,
    ``"layer4.0.whiten"``); for the root module's own forward, ``"<root>.forward:<kind>"``
    (``"<root>.forward:eigh"``). A second meta-layer of the same module gets ``"#2"``, and so on
    (:meth:`AnalysisReport.name_meta_layers`). The graph node (``_linalg_eigh_20``) is detail."""
    return scope if scope else f"{ROOT_NAME}.forward:{kind}"


def cut_note(op: str, how: str) -> str:
    """The note of a meta-layer whose decomposition ``op`` is cut from the gradient."""
    return (f"no gradient flows back through {op}: its outputs are {how} before they reach the "
            f"model's outputs, so treating its Pre-SVD layer cannot change this decomposition's "
            f"backward (only the conditioning of its forward)")


@dataclass(frozen=True)
class ProducerInfo:
    """The Pre-SVD layer: the weighted linear map whose output becomes the covariance.

    Attributes:
        name: qualified name of the module that owns the weight (``"head.reduce"``).
        type: its class name (``"Conv2d"``).
        param: qualified name of the weight parameter (``"head.reduce.weight"``).
        weight_shape: shape of the weight.
        flat_shape: the weight as the (out, in·k·k) matrix the treatments act on.
        node: name of the fx node that applies the weight (the ``call_module`` node, the
            functional call, or for an internal producer the meta-layer module's node).
        form: ``"module"`` (nn.Conv*/nn.Linear), ``"functional"`` (F.conv*/F.linear/matmul
            with an nn.Parameter weight) or ``"internal"`` (inside an orthofx meta module).
        op: the op, e.g. ``"Conv2d"``, ``"F.conv2d"``, ``"F.linear"``, ``"matmul"``.
        transposed: True when the stored weight is the transpose of the (out, in) map
            (``X @ W`` with W of shape (in, out)).
        groups: convolution groups (1 otherwise).
    """

    name: str
    type: str
    param: str
    weight_shape: tuple[int, ...]
    flat_shape: tuple[int, int]
    node: str
    form: str = "module"
    op: str = ""
    transposed: bool = False
    groups: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "param": self.param,
            "weight_shape": list(self.weight_shape), "flat_shape": list(self.flat_shape),
            "node": self.node, "form": self.form, "op": self.op,
            "transposed": self.transposed, "groups": self.groups,
        }


@dataclass(frozen=True)
class CovarianceInfo:
    """How the decomposed matrix is built from the features X.

    Attributes:
        form: ``"matmul"``, ``"bmm"``, ``"mm"``, ``"einsum"``, ``"torch.cov"``,
            ``"orthofx.linalg.covariance"``, ``"module"`` (built inside a meta-layer module
            that takes features), ``"none"`` (an SVD of the feature matrix itself) or the name
            of a registered covariance function.
        node: name of the node that forms it (None when inside a module).
        expression: e.g. ``"X Xᵀ"``, ``"Xᵀ X"``, ``"X J Xᵀ"``, or the einsum equation.
        centered: the mean is removed (``X - mean``, a centring matrix J, torch.cov, ...).
        scaled: the product is scaled (``/ M``, ``* c``, torch.cov, ...).
        eps: the value of an added ``ε·I`` when it can be read, ``True`` when a constant
            is added whose value cannot be read, ``None`` when nothing is added.
        symmetrized: ``(A + Aᵀ)`` appears on the way to the meta-layer.
    """

    form: str
    node: str | None = None
    expression: str = ""
    centered: bool = False
    scaled: bool = False
    eps: float | bool | None = None
    symmetrized: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form, "node": self.node, "expression": self.expression,
            "centered": self.centered, "scaled": self.scaled, "eps": self.eps,
            "symmetrized": self.symmetrized,
        }

    def describe(self) -> str:
        parts = [self.form]
        if self.expression:
            parts.append(self.expression)
        flags = [name for name, on in (("centred", self.centered), ("scaled", self.scaled),
                                        ("sym", self.symmetrized)) if on]
        if self.eps is True:
            flags.append("+const")
        elif self.eps is not None:
            flags.append(f"+{self.eps:g}I")
        if flags:
            parts.append(",".join(flags))
        return " ".join(parts)


@dataclass(frozen=True)
class ChainStep:
    """One op between the producer and the meta-layer.

    Attributes:
        node: fx node name (in the graph named by ``graph``).
        op: fx opcode (``call_module``, ``call_function``, ``call_method``, ...).
        target: readable target (``"BatchNorm2d head.bn"``, ``"torch.flatten"``, ``".transpose"``).
        role: what it does on the walk (see ``orthofx.vocab.Role``).
        text: a one-line description.
        shape: the output shape when example inputs were given.
        graph: ``""`` for the analysed GraphModule; ``"<Function>.forward"`` for a step inside
            an autograd.Function's forward (traced on its own).
    """

    node: str
    op: str
    target: str
    role: str
    text: str = ""
    shape: tuple[int, ...] | None = None
    graph: str = ""

    def __post_init__(self) -> None:
        # a plain str, also when given a str Enum (``Role``): reports go into checkpoints that
        # must load with ``torch.load(weights_only=True)``
        if isinstance(self.role, str) and type(self.role) is not str:
            object.__setattr__(self, "role", str.__str__(self.role))

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "op": self.op, "target": self.target, "role": self.role,
            "text": self.text, "shape": list(self.shape) if self.shape is not None else None,
            "graph": self.graph,
        }

    def short(self) -> str:
        return f"{self.node}[{self.role}]"


@dataclass(frozen=True)
class MetaLayerEntry:
    """A meta-layer whose producer was found.

    Attributes:
        node: fx node name of the meta-layer call in the analysed GraphModule.
        kind: ``"eigh"``, ``"eigvalsh"``, ``"svd"``, ``"svdvals"``, ``"sqrtm"`` or ``"invsqrtm"``.
        usage: how the result is used: ``"sqrtm"`` (U diag(√λ) Uᵀ), ``"invsqrtm"``
            (U diag(1/√λ) Uᵀ), ``"eigenvalues"`` (only the values), ``"unknown"``.
        scope: qualified name of the module whose forward made the call.
        target: readable call target (``"torch.linalg.eigh"``, ``"CovariancePooling"``).
        source: ``"torch"``, ``"orthofx"``, ``"config"`` or ``"autograd.Function"``.
        input: ``"covariance"`` or ``"features"`` (what the first argument is).
        covariance: how the decomposed matrix is formed.
        producer: the Pre-SVD layer.
        chain: ops from the producer (first) to the meta-layer (last), both included.
        graph: ``""``: ``node`` is in ``report.graph_module``; for a partial report, the
            qualified name of the submodule whose own trace holds ``node``.
        name: the meta-layer's one name (:func:`meta_layer_name`: the module path where it
            runs), the same in the report, the monitor, its sinks and the CLI; ``node`` is
            the graph detail.
        notes: what to know about this meta-layer (its decomposition's outputs are detached,
            so a treatment cannot change its backward; the orthofx.nn module that replaces it).
    """

    node: str
    kind: str
    usage: str
    scope: str
    target: str
    source: str
    input: str
    covariance: CovarianceInfo
    producer: ProducerInfo
    chain: tuple[ChainStep, ...] = ()
    graph: str = ""
    name: str = ""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name or meta_layer_name(self.scope, self.kind), "node": self.node, "kind": self.kind, "usage": self.usage, "scope": self.scope,
            "target": self.target, "source": self.source, "input": self.input,
            "covariance": self.covariance.to_dict(), "producer": self.producer.to_dict(),
            "chain": [s.to_dict() for s in self.chain], "graph": self.graph, "notes": list(self.notes),
        }


@dataclass(frozen=True)
class SkippedEntry:
    """A meta-layer whose producer could not be determined.

    Attributes:
        node, kind, usage, scope, target, source, input: as in :class:`MetaLayerEntry`.
        reason: why the walk stopped.
        stop_node: the node where it stopped (None when it never started).
        chain: the ops crossed, from the stop node (first) to the meta-layer (last).
        graph, name: as in :class:`MetaLayerEntry`.
    """

    node: str
    kind: str
    scope: str
    target: str
    reason: str
    stop_node: str | None = None
    usage: str = "unknown"
    source: str = "torch"
    input: str = "covariance"
    chain: tuple[ChainStep, ...] = ()
    graph: str = ""
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name or meta_layer_name(self.scope, self.kind), "node": self.node, "kind": self.kind, "usage": self.usage, "scope": self.scope,
            "target": self.target, "source": self.source, "input": self.input,
            "reason": self.reason, "stop_node": self.stop_node,
            "chain": [s.to_dict() for s in self.chain], "graph": self.graph,
        }


@dataclass
class AnalysisReport:
    """The result of ``orthofx.analyze`` (pure: the model is not modified).

    Attributes:
        model: class name of the analysed model.
        entries: one per meta-layer with a determined producer.
        skipped: meta-layers whose producer could not be determined, with the reason.
        auto_leaves: submodules made fx leaves automatically (``AutoLeafRecord``).
        notes: other things worth knowing (autograd.Functions kept as leaves, shapes, ...).
        partial: True when the model could not be traced as a whole and its submodules were
            analysed on their own (each entry's ``graph`` then names the submodule whose own
            trace holds its ``node``).
        graph_module: the traced GraphModule the node names refer to (not serialised;
            None for a partial report).
    """

    model: str
    entries: list[MetaLayerEntry] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    auto_leaves: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    partial: bool = False
    graph_module: Any = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ queries
    @property
    def producers(self) -> list[str]:
        """Qualified names of the Pre-SVD modules, unique, in order of first appearance."""
        return list(dict.fromkeys(e.producer.name for e in self.entries))

    @property
    def producer_params(self) -> list[str]:
        """Qualified names of the Pre-SVD weight parameters, unique, in order."""
        return list(dict.fromkeys(e.producer.param for e in self.entries))

    @property
    def meta_layers(self) -> list[str]:
        """The names of every meta-layer found (with or without a Pre-SVD layer), unique, in
        order: the module paths where they run (:func:`meta_layer_name`)."""
        self.name_meta_layers()
        return list(dict.fromkeys(e.name for e in [*self.entries, *self.skipped]))

    def entry(self, node: str) -> MetaLayerEntry:
        """The entry of the meta-layer called ``node``: its name or its graph node's name."""
        self.name_meta_layers()
        for e in self.entries:
            if e.name == node:
                return e
        for e in self.entries:
            if e.node == node:
                return e
        raise KeyError(node)

    def name_meta_layers(self) -> None:
        """Give every entry and skipped entry its :func:`meta_layer_name` (idempotent): one
        name per meta-layer (a meta-layer with two producers has two entries of one name), and
        ``"#2"``, ``"#3"``... for further meta-layers of the same module, in report order."""
        if all(e.name for e in [*self.entries, *self.skipped]):
            return
        names: dict[tuple[str, str], str] = {}
        taken: dict[str, int] = {}
        for e in [*self.entries, *self.skipped]:
            if e.name:
                names[(e.graph, e.node)] = e.name
                taken[e.name] = taken.get(e.name, 0) + 1
        for attr in ("entries", "skipped"):
            out = []
            for e in getattr(self, attr):
                key = (e.graph, e.node)
                if key not in names:
                    base = meta_layer_name(e.scope, e.kind)
                    n = taken.get(base, 0) + 1
                    taken[base] = n
                    names[key] = base if n == 1 else f"{base}#{n}"
                out.append(e if e.name else dataclasses.replace(e, name=names[key]))
            setattr(self, attr, out)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``json.dumps(report.to_dict())`` works); every entry carries
        its ``name`` (the module path, :func:`meta_layer_name`) and its graph ``node``."""
        self.name_meta_layers()
        return {
            "model": self.model,
            "meta_layers": self.meta_layers,
            "producers": self.producers,
            "entries": [e.to_dict() for e in self.entries],
            "skipped": [s.to_dict() for s in self.skipped],
            "auto_leaves": [_jsonable(a) for a in self.auto_leaves],
            "notes": list(self.notes),
            "partial": self.partial,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # ------------------------------------------------------------------ table
    def __str__(self) -> str:
        self.name_meta_layers()
        lines = [
            f"orthofx analysis of {self.model}: {len(self.entries)} meta-layer(s) with a "
            f"Pre-SVD layer, {len(self.skipped)} skipped"
            + (" (partial: per-submodule traces)" if self.partial else "")
        ]
        if self.entries:
            header = ("#", "meta-layer", "node", "kind", "usage", "covariance", "producer",
                      "type", "flat weight", "ops")
            rows = [header]
            for i, e in enumerate(self.entries):
                p = e.producer
                rows.append((
                    str(i), e.name, e.node, e.kind, e.usage,
                    e.covariance.describe(), p.name or "<root>", p.op or p.type,
                    "x".join(map(str, p.flat_shape)), str(max(len(e.chain) - 2, 0)),
                ))
            lines += _table(rows)
            lines.append("")
            lines.append("chains (producer -> meta-layer):")
            for i, e in enumerate(self.entries):
                lines.append(f"  [{i}] " + " -> ".join(s.short() for s in e.chain))
            said = dict.fromkeys((e.name, n) for e in self.entries for n in e.notes)  # once per meta-layer
            if said:
                lines += ["", "meta-layer notes:"] + [f"  - {name}: {n}" for name, n in said]
        if self.skipped:
            lines.append("")
            lines.append("skipped (producer not determined):")
            for s in self.skipped:
                where = f" at {s.stop_node}" if s.stop_node else ""
                lines.append(f"  - {s.name} ({s.kind}, node {s.node}): stopped{where}: {s.reason}")
        if self.auto_leaves:
            lines.append("")
            lines.append("modules traced as opaque leaves automatically (fx cannot trace them; "
                         "make it explicit with AnalysisConfig(leaf_modules=...)):")
            for a in self.auto_leaves:
                lines.append(f"  - {a.name} ({a.type}): {a.error}")
        if self.notes:
            lines.append("")
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------ pictures
    def to_networkx(self) -> Any:
        """A ``networkx.DiGraph`` of every chain: nodes ``"<entry>:<node>"`` with attributes
        ``label``, ``role``, ``entry``, ``column``; edges producer → … → meta-layer."""
        from orthofx.graph.draw import to_networkx

        return to_networkx(self)

    def to_dot(self) -> str:
        """Graphviz DOT text: one cluster per entry (producer → … → meta-layer) and per
        skipped meta-layer (stop node → … → meta-layer, in red)."""
        from orthofx.graph.draw import to_dot

        self.name_meta_layers()
        return to_dot(self)

    def to_png(self, path: str, *, dpi: int = 120) -> str:
        """Draw the chains with networkx + matplotlib into ``path``; returns ``path``.

        Builds a ``matplotlib.figure.Figure`` with an Agg canvas (no ``pyplot``: the global
        backend is left alone). Needs matplotlib (extra ``plot``): without it,
        :class:`~orthofx.errors.MissingExtraError`."""
        from orthofx.graph.draw import to_png

        return to_png(self, path, dpi=dpi)


def _table(rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
