"""The walk from a meta-layer back to its Pre-SVD layer, as networkx queries.

:class:`NodeGraph` mirrors an ``fx.Graph`` as a ``networkx.DiGraph`` (edge = data flow) and
answers the questions the analysis asks: which nodes carry data (depend on a model input
through values, not only through shapes), which node a binary op mixes in, how the result
of a decomposition is used.

:class:`Walker` classifies every node once (:class:`Step`: its role on a walk and the one
input the walk continues through) and builds the *walk graph*: an edge ``source → node``
for every node that the walk may cross. Each node has at most one incoming walk edge, so
the ancestors of a meta-layer's input in the walk graph form a single path; the root of
that path is where the walk ends: a producer, or a node that stops it (with the reason).
A walk then only checks the phase rules along that path: before the covariance only ops
that act per channel or reshape, after it only ops that keep the matrix a (scaled,
shifted, symmetrised) covariance.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from orthofx.graph import patterns as P
from orthofx.graph.patterns import Patterns, Role
from orthofx.graph.trace import FUNCTION_KEY, TraceInfo, function_of, trace_info, user_class
from orthofx.report import CovarianceInfo, ProducerInfo

__all__ = ["NodeGraph", "Step", "WalkOutcome", "Walker", "describe_target", "detect_usage",
           "covariance_info"]

INPUT = "input"  # role of a placeholder


# --------------------------------------------------------------------------- node graph
class NodeGraph:
    """An fx graph as a networkx DiGraph plus the data-dependence of every node.

    Args:
        gm: the GraphModule.
        name: ``""`` for the analysed graph, ``"<Function>.forward"`` for a Function's forward.
    """

    def __init__(self, gm: fx.GraphModule, name: str = "") -> None:
        self.gm = gm
        self.name = name
        self.info: TraceInfo = trace_info(gm)
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        g.add_edges_from((inp, n) for n in self.nodes for inp in n.all_input_nodes)
        self.G = g
        self.shape_nodes = {n for n in self.nodes if _is_shape_op(n)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        # values flow from the inputs; shape/dtype/device queries cut the flow
        values = nx.subgraph_view(g, filter_node=lambda n: n not in self.shape_nodes)
        data: set[fx.Node] = set(self.placeholders)
        for ph in self.placeholders:
            data |= nx.descendants(values, ph)
        self.data = data
        self._params: dict[str, nn.Parameter] | None = None
        self._buffers: dict[str, torch.Tensor] | None = None

    # -- queries ----------------------------------------------------------------------
    def is_data(self, a: Any) -> bool:
        """True for a node whose value depends on a model input (not only its shape)."""
        return isinstance(a, fx.Node) and a in self.data

    @property
    def params(self) -> dict[str, nn.Parameter]:
        if self._params is None:
            self._params = dict(self.gm.named_parameters(remove_duplicate=False))
        return self._params

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        if self._buffers is None:
            self._buffers = dict(self.gm.named_buffers(remove_duplicate=False))
        return self._buffers

    def module(self, target: str) -> nn.Module:
        return self.gm.get_submodule(target)

    def weight(self, qualname: str) -> torch.Tensor:
        """The tensor a weight name stands for (a parameter, or a parametrized attribute)."""
        if qualname in self.params:
            return self.params[qualname]
        owner, _, name = qualname.rpartition(".")
        plist = f"{owner}.parametrizations.{name}" if owner else f"parametrizations.{name}"
        with torch.no_grad():
            try:
                return getattr(self.gm.get_submodule(owner) if owner else self.gm, name)
            except AttributeError:  # the GraphModule copied only the ParametrizationList
                return self.gm.get_submodule(plist)()

    def module_type(self, name: str) -> str:
        """Class name of the model's module ``name`` (from the trace records)."""
        t = self.info.module_types.get(name)
        if t is not None:
            return t
        try:
            return type(self.gm.get_submodule(name)).__name__
        except AttributeError:
            return "?"

    def descendants(self, nodes: Iterable[fx.Node]) -> set[fx.Node]:
        out: set[fx.Node] = set()
        for n in nodes:
            out.add(n)
            out |= nx.descendants(self.G, n)
        return out


def _is_shape_op(n: fx.Node) -> bool:
    if n.op == "call_function":
        if n.target is builtins.getattr:
            return len(n.args) > 1 and n.args[1] in P.SHAPE_ATTRIBUTES
        try:
            return n.target in P.SHAPE_FUNCTIONS
        except TypeError:
            return False
    if n.op == "call_method":
        return n.target in P.SHAPE_METHODS
    return False


# --------------------------------------------------------------------------- descriptions
def describe_target(node: fx.Node, ng: NodeGraph | None = None) -> str:
    """A readable target: ``"Conv2d head.reduce"``, ``"torch.linalg.eigh"``, ``".flatten"``."""
    t = node.target
    if node.op == "call_module":
        tname = ng.module_type(t) if ng is not None else "module"
        return f"{tname} {t}"
    if node.op == "call_method":
        return f".{t}"
    if node.op == "get_attr":
        return f"self.{t}"
    if node.op in ("placeholder", "output"):
        return str(t)
    cls = function_of(t)
    if cls is not None:
        return f"{cls.__qualname__}.apply"
    if t is builtins.getattr and len(node.args) > 1:
        return f".{node.args[1]}"
    if t is operator.getitem:
        return "getitem"
    return _callable_name(t)


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or repr(fn)
    mod = getattr(fn, "__module__", None) or ""
    if fn in _KNOWN_NAMES:
        return _KNOWN_NAMES[fn]
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


_KNOWN_NAMES: dict[Any, str] = {
    torch.linalg.eigh: "torch.linalg.eigh",
    torch.linalg.eigvalsh: "torch.linalg.eigvalsh",
    torch.linalg.svd: "torch.linalg.svd",
    torch.linalg.svdvals: "torch.linalg.svdvals",
    torch.svd: "torch.svd",
    torch.nn.functional.linear: "F.linear",
    torch.nn.functional.gelu: "F.gelu",
}


# --------------------------------------------------------------------------- steps
@dataclass
class Step:
    """How one node acts on a walk.

    Attributes:
        node: the fx node.
        role: a :class:`~orthofx.graph.patterns.Role` value, or ``"input"`` for a placeholder.
        source: the input the walk continues through (None: the walk ends here).
        text: readable description.
        reason: why the walk stops here (role ``stop``).
        info: details: ``producer`` (ProducerInfo), ``cov`` (dict), ``eps``, ``index``.
    """

    node: fx.Node
    role: str
    source: fx.Node | None = None
    text: str = ""
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class WalkOutcome:
    """The result of one walk.

    Attributes:
        steps: the crossed steps, from where the walk ended (first) to the start (last).
        status: ``"producer"``, ``"stopped"`` or ``"input"`` (reached placeholder ``input_index``
            of a Function's forward).
        reason: why it stopped.
        have_cov: whether a covariance was crossed (or was already crossed before the start).
        direct: the producer's output is decomposed without a covariance (SVD of features).
        input_index: for ``"input"``, the placeholder index.
    """

    steps: list[Step]
    status: str
    reason: str = ""
    have_cov: bool = False
    direct: bool = False
    input_index: int | None = None

    @property
    def producer(self) -> ProducerInfo | None:
        return self.steps[0].info.get("producer") if self.status == "producer" else None

    @property
    def stop_step(self) -> Step | None:
        return self.steps[0] if self.status == "stopped" and self.steps else None


_CAST_METHODS = frozenset({"contiguous", "float", "double", "half", "bfloat16", "to", "type",
                           "clone", "detach", "cpu", "cuda"})
_SHAPE_ONLY_SECOND_ARG = frozenset({"view_as", "reshape_as", "type_as"})


class Walker:
    """Classifies every node of a :class:`NodeGraph` and walks back from meta-layer inputs.

    Args:
        ng: the node graph.
        patterns: registries merged with the config.
    """

    def __init__(self, ng: NodeGraph, patterns: Patterns) -> None:
        self.ng = ng
        self.patterns = patterns
        self.leaf_modules = set(ng.info.leaf_modules)
        self.auto_leaves = {a.name for a in ng.info.auto_leaves}
        self.steps: dict[fx.Node, Step] = {}
        wg = nx.DiGraph()
        wg.add_nodes_from(ng.nodes)
        for n in ng.nodes:
            if n.op == "output":
                continue
            step = self._classify(n)
            self.steps[n] = step
            if step.source is not None:
                wg.add_edge(step.source, n)
        self.wg = wg

    # ================================================================== walking
    def path_to(self, start: fx.Node) -> list[fx.Node]:
        """The walk path ending at ``start``: root first (networkx ancestors in the walk graph)."""
        anc = nx.ancestors(self.wg, start)
        if not anc:
            return [start]
        root = next(n for n in anc if self.wg.in_degree(n) == 0)
        return nx.shortest_path(self.wg, root, start)

    def walk(self, start: Any, *, have_cov: bool, need_cov: bool,
             allow_direct: bool = False) -> WalkOutcome:
        """Walk back from ``start`` (a meta-layer's first argument).

        Args:
            have_cov: a covariance was already crossed (inside a Function's forward).
            need_cov: the meta-layer decomposes a covariance (input="covariance").
            allow_direct: accept a producer without a covariance (SVD of the features).
        """
        if not isinstance(start, fx.Node):
            return WalkOutcome([], "stopped", f"the meta-layer's input is a constant ({start!r})")
        path = self.path_to(start)
        after = need_cov and not have_cov  # walking on the covariance matrix (towards X Xᵀ)
        direct = False  # an SVD of the feature map itself (no covariance), allow_direct only
        crossed: list[Step] = []
        for node in reversed(path):
            step = self.steps[node]
            crossed.append(step)
            role = step.role
            if role == Role.COVARIANCE:
                if direct:
                    return self._stop(crossed, (
                        f"{step.text}: a covariance further up than a per-channel op on the "
                        f"decomposed matrix; not a recognised pattern"))
                if not after:
                    why = ("a second covariance" if need_cov else
                           "a covariance, but this meta-layer builds its own from features")
                    return self._stop(crossed, f"{step.text}: {why} on the way to the meta-layer")
                after = False
                have_cov = True
                continue
            if role == Role.PRODUCER:
                if after:
                    if allow_direct:
                        return WalkOutcome(list(reversed(crossed)), "producer", have_cov=have_cov,
                                           direct=True)
                    return self._stop(crossed, (
                        f"reached {step.text} without crossing a covariance (X Xᵀ, torch.cov, ...): "
                        f"the decomposed matrix is not recognised as a covariance of its output"))
                return WalkOutcome(list(reversed(crossed)), "producer", have_cov=have_cov,
                                   direct=direct)
            if role == INPUT:
                if self.ng.name:  # inside a Function's forward: continue outside
                    return WalkOutcome(list(reversed(crossed)), "input", have_cov=have_cov,
                                       input_index=step.info["index"])
                return self._stop(crossed, step.reason)
            if role == Role.STOP:
                return self._stop(crossed, step.reason)
            allowed = Role.AFTER_COV if after else Role.BEFORE_COV
            if after and allow_direct and role not in allowed and role in Role.BEFORE_COV:
                after, direct = False, True  # svd(f(X)): decomposes the features directly
                allowed = Role.BEFORE_COV
            if role not in allowed:
                if after:
                    return self._stop(crossed, (
                        f"no covariance (X Xᵀ, torch.cov, ...) was recognised before {step.text} "
                        f"({role}), which is not an op on a covariance matrix (only scaling, "
                        f"+ εI, symmetrising, casts and reshapes are)"))
                return self._stop(crossed, (
                    f"{step.text} ({role}) acts on the feature map before the covariance; orthofx "
                    f"does not treat it as transparent there"))
            if step.source is None:  # defensive: a transparent step always has a source
                return self._stop(crossed, f"{step.text}: no input to continue from")
        raise AssertionError("walk path did not end at a root")  # pragma: no cover

    @staticmethod
    def _stop(crossed: list[Step], reason: str) -> WalkOutcome:
        return WalkOutcome(list(reversed(crossed)), "stopped", reason)

    # ================================================================== classification
    def _classify(self, n: fx.Node) -> Step:
        try:
            if n.op == "placeholder":
                idx = self.ng.placeholders.index(n)
                return Step(n, INPUT, text=f"input {n.target}", info={"index": idx},
                            reason=f"reached the model input {n.target!r} without a weighted layer")
            if n.op == "get_attr":
                return Step(n, Role.STOP, text=f"self.{n.target}",
                            reason=f"reached the attribute {n.target!r}, not a weighted layer")
            if n.op == "call_module":
                return self._classify_module(n)
            if n.op == "call_function":
                return self._classify_function(n)
            if n.op == "call_method":
                return self._classify_method(n)
        except Exception as exc:  # noqa: BLE001 - never crash on an odd node; stop there instead
            return Step(n, Role.STOP, text=describe_target(n, self.ng),
                        reason=f"could not classify {describe_target(n, self.ng)}: {exc}")
        return Step(n, Role.STOP, text=n.op, reason=f"unexpected node {n.op}")

    # -- helpers --------------------------------------------------------------------
    def _other_data(self, n: fx.Node, src: Any, exempt: Iterable[Any] = ()) -> list[fx.Node]:
        """Data nodes among ``n``'s inputs other than ``src``."""
        exempt = set(exempt)
        return [a for a in n.all_input_nodes
                if a is not src and a not in exempt and self.ng.is_data(a)]

    def _transparent(self, n: fx.Node, role: str, src: Any, text: str,
                     exempt: Iterable[Any] = ()) -> Step:
        if not isinstance(src, fx.Node) or not self.ng.is_data(src):
            return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
        others = self._other_data(n, src, exempt)
        if others:
            return Step(n, Role.STOP, text=text,
                        reason=f"{text} mixes in another tensor ({others[0].name})")
        return Step(n, role, src, text)

    # -- modules ----------------------------------------------------------------------
    def _classify_module(self, n: fx.Node) -> Step:
        target = str(n.target)
        mod = self.ng.module(target)
        text = describe_target(n, self.ng)
        rule = self.patterns.module_rule(mod, target)
        if rule.role == Role.META:
            return Step(n, Role.STOP, text=text,
                        reason=f"it is the output of another meta-layer ({text})")
        if rule.role == Role.PRODUCER:
            src = n.args[0] if n.args else None
            if not self.ng.is_data(src):
                return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
            return Step(n, Role.PRODUCER, None, text,
                        info={"producer": self._module_producer(n, mod)})
        if rule.role == Role.STOP and (target in self.leaf_modules):
            how = ("made a leaf automatically because it cannot be traced"
                   if target in self.auto_leaves else "a leaf by AnalysisConfig.leaf_modules")
            return Step(n, Role.STOP, text=text,
                        reason=f"{text} is an opaque leaf ({how}); its contents are not analysed")
        if rule.role == Role.STOP:
            return Step(n, Role.STOP, text=text, reason=f"{text}: {rule.reason}")
        src = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        return self._transparent(n, rule.role, src, text)

    def _module_producer(self, n: fx.Node, mod: nn.Module) -> ProducerInfo:
        target = str(n.target)
        w = mod.weight
        shape = tuple(int(s) for s in w.shape)
        groups = int(getattr(mod, "groups", 1))
        cls = user_class(mod)  # not the generated Parametrized* subclass
        return ProducerInfo(
            name=target, type=cls.__name__, param=f"{target}.weight",
            weight_shape=shape, flat_shape=(shape[0], math.prod(shape[1:])),
            node=n.name, form="module", op=cls.__name__, groups=groups,
        )

    # -- functions --------------------------------------------------------------------
    def _classify_function(self, n: fx.Node) -> Step:
        t = n.target
        text = describe_target(n, self.ng)
        pats = self.patterns
        cls = function_of(t) or n.meta.get(FUNCTION_KEY)
        if cls is not None:
            if cls in pats.config.meta_autograd_functions:
                return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} is a custom autograd.Function kept as a leaf; the walk does not cross it "
                f"(register it in AnalysisConfig.transparent_functions if it acts per channel)"))
        if pats.meta_for_function(t) is not None:
            return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
        if t in pats.transparent_functions:
            return self._transparent(n, pats.transparent_functions[t], _first_arg(n), text)
        if t in P.FUNCTIONAL_PRODUCERS:
            return self._functional_producer(n, text)
        if t in P.MATMUL_FUNCTIONS:
            return self._matmul(n, n.args[0], n.args[1], text)
        if t in P.EINSUM_FUNCTIONS:
            return self._einsum(n, text)
        if t in P.TORCH_COV_FUNCTIONS:
            return self._cov_function(n, "torch.cov", text, centered=True, scaled=True)
        if t in pats.covariance_functions:
            name = pats.covariance_functions[t]
            eps = n.kwargs.get("eps")
            return self._cov_function(n, name, text, centered=name.startswith("orthofx"),
                                      scaled=name.startswith("orthofx"),
                                      eps=eps if isinstance(eps, (int, float)) and eps else None)
        if t in P.ARITHMETIC_FUNCTIONS:
            return self._arith(n, P.ARITHMETIC_FUNCTIONS[t], _arg(n, 0, "input"),
                               _arg(n, 1, "other"), text)
        if t is operator.getitem:
            return self._getitem(n, text)
        if t is builtins.getattr:
            attr = n.args[1]
            if attr in P.TRANSPOSE_ATTRIBUTES:
                return self._transparent(n, Role.RESHAPE, n.args[0], text)
            if attr in P.IDENTITY_ATTRIBUTES:
                return self._transparent(n, Role.CAST, n.args[0], text)
            return Step(n, Role.STOP, text=text, reason=f"attribute {attr!r} is not a tensor op the walk knows")
        if t in P.STOP_FUNCTIONS:
            return self._known_stop(n, P.STOP_FUNCTIONS[t], text)
        if t in P.MEAN_FUNCTIONS:
            return Step(n, Role.STOP, text=text, reason=f"{text} reduces over a dimension (may average channels)")
        return Step(n, Role.STOP, text=text, reason=(
            f"unknown function {text}; if it acts per channel or only reshapes, add it to "
            f"AnalysisConfig.transparent_functions"))

    def _known_stop(self, n: fx.Node, reason: str, text: str) -> Step:
        others = [a.name for a in n.all_input_nodes if self.ng.is_data(a)]
        shown = ", ".join(others[:3]) + (f", ... {len(others) - 3} more" if len(others) > 3 else "")
        extra = f" ({shown})" if len(others) > 1 else ""
        return Step(n, Role.STOP, text=text, reason=f"{text}: {reason}{extra}")

    def _getitem(self, n: fx.Node, text: str) -> Step:
        src, idx = n.args[0], n.args[1]
        if isinstance(src, fx.Node) and (src.op == "call_function" and (
                self.patterns.meta_for_function(src.target) is not None or function_of(src.target))
                or src.op == "call_method" and src.target in self.patterns.meta_methods):
            return Step(n, Role.STOP, text=text, reason=f"it is an output of another meta-layer ({src.name})")
        if _is_batch_index(idx):
            return self._transparent(n, Role.BATCH_SELECT, src, f"{text}[{_fmt_index(idx)}]")
        return Step(n, Role.STOP, text=text, reason=(
            f"indexing [{_fmt_index(idx)}] may select a subset of channels; orthofx only crosses "
            f"indexing of the leading (batch) dimension"))

    def _functional_producer(self, n: fx.Node, text: str) -> Step:
        name, widx = P.FUNCTIONAL_PRODUCERS[n.target]
        src = _arg(n, 0, "input")
        w = _arg(n, widx, "weight")
        if not self.ng.is_data(src):
            return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
        if self.ng.is_data(w):
            return Step(n, Role.STOP, text=text, reason=f"{text} has a data-dependent weight ({getattr(w, 'name', w)})")
        found = self._param_of(w, allow_transpose=False)
        if found is None or found[0] != "param":
            what = "a buffer" if found is not None else "computed, not an nn.Parameter"
            return Step(n, Role.STOP, text=text, reason=(
                f"the weight of {text} is {what}; the walk stops at the nearest weighted layer"))
        _, qual, _ = found
        param = self.ng.weight(qual)
        shape = tuple(int(s) for s in param.shape)
        groups = _arg(n, 6, "groups") if name.startswith("conv") else 1
        owner = qual.rsplit(".", 1)[0] if "." in qual else ""
        info = ProducerInfo(
            name=owner, type=self.ng.module_type(owner), param=qual, weight_shape=shape,
            flat_shape=(shape[0], math.prod(shape[1:])), node=n.name, form="functional",
            op=f"F.{name}", groups=int(groups) if isinstance(groups, int) else 1,
        )
        return Step(n, Role.PRODUCER, None, text, info={"producer": info})

    def _param_of(self, w: Any, allow_transpose: bool = True) -> tuple[str, str, int] | None:
        """Resolve a weight operand to ``("param"|"buffer", qualified name, transpose parity)``.

        A parametrized weight (``torch.nn.utils.parametrize``, e.g. after orthofx's own
        rewrite) appears as a call of its ``ParametrizationList``; it resolves to the
        user-facing name (``"head.w"``, not ``"head.parametrizations.w.original"``)."""
        parity = 0
        for _ in range(16):
            if not isinstance(w, fx.Node):
                return None
            if w.op == "call_module" and not w.args and not w.kwargs:
                target = str(w.target)
                owner, _, name = target.rpartition(".")
                if owner.endswith("parametrizations") and isinstance(
                        self.ng.module(target), parametrize.ParametrizationList):
                    base = owner[: -len("parametrizations")].rstrip(".")
                    return ("param", f"{base}.{name}" if base else name, parity)
                return None
            if w.op == "get_attr":
                qual = str(w.target)
                if qual in self.ng.params:
                    return ("param", qual, parity)
                if qual in self.ng.buffers:
                    return ("buffer", qual, parity)
                return None
            inner = _transpose_input(w)
            if inner is not None and allow_transpose:
                parity ^= 1
                w = inner
                continue
            inner = _cast_input(w)
            if inner is not None:
                w = inner
                continue
            return None
        return None

    def _matmul(self, n: fx.Node, a: Any, b: Any, text: str) -> Step:
        cov = self._covariance_of_product(n, a, b, text)
        if cov is not None:
            return cov
        da, db = self.ng.is_data(a), self.ng.is_data(b)
        if da and db:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies two different tensors ({a.name}, {b.name}); not a covariance "
                f"of one feature map"))
        if not da and not db:
            return Step(n, Role.STOP, text=text, reason=f"{text} of constants")
        data, weight = (a, b) if da else (b, a)
        found = self._param_of(weight)
        if found is None:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by a computed constant matrix, not an nn.Parameter"))
        kind, qual, parity = found
        if kind != "param":
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by the buffer {qual!r}, a fixed (non-trainable) linear map"))
        param = self.ng.weight(qual)
        if param.dim() != 2:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by the {param.dim()}-d parameter {qual!r}; only 2-d weights "
                f"are supported Pre-SVD layers"))
        shape = (int(param.shape[0]), int(param.shape[1]))
        # data on the left: X @ E, E (in, out) = W if parity 0 (stored transposed) else Wᵀ
        transposed = (parity == 0) if da else (parity == 1)
        flat = (shape[1], shape[0]) if transposed else shape
        owner = qual.rsplit(".", 1)[0] if "." in qual else ""
        info = ProducerInfo(
            name=owner, type=self.ng.module_type(owner), param=qual, weight_shape=shape,
            flat_shape=flat, node=n.name, form="functional", op="matmul", transposed=transposed,
        )
        return Step(n, Role.PRODUCER, None, text, info={"producer": info})

    def _covariance_of_product(self, n: fx.Node, a: Any, b: Any, text: str) -> Step | None:
        if not (self.ng.is_data(a) and self.ng.is_data(b)):
            return None
        xa, pa, ja = self._strip_matrix(a, "left")
        xb, pb, jb = self._strip_matrix(b, "right")
        if pa == pb or not self._same(xa, xb):
            return None
        expr = ("X" if pa == 0 else "Xᵀ") + (" J" if (ja is not None or jb is not None) else "") \
            + (" Xᵀ" if pb == 1 else " X")
        form = {operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
                torch.mm: "mm"}.get(n.target, str(n.target) if n.op == "call_method" else "matmul")
        # continue through the un-transposed factor (keeps its casts in the chain)
        src = self._strip_centring(a, "left") if pa == 0 else self._strip_centring(b, "right")
        return Step(n, Role.COVARIANCE, src, f"{text} ({expr})", info={"cov": {
            "form": form, "expression": expr, "centered": ja is not None or jb is not None,
        }})

    def _strip_matrix(self, n: Any, side: str) -> tuple[Any, int, Any]:
        """Remove transposes, casts and a centring matrix J from one factor of a product."""
        parity, J = 0, None
        for _ in range(16):
            if not isinstance(n, fx.Node):
                break
            inner = _transpose_input(n)
            if inner is not None:
                parity ^= 1
                n = inner
                continue
            inner = _cast_input(n)
            if inner is not None:
                n = inner
                continue
            if J is None and side in ("left", "right") and _is_matmul(n):
                x, y = _matmul_operands(n)
                const, data = (y, x) if side == "left" else (x, y)
                if self.ng.is_data(data) and isinstance(const, fx.Node) \
                        and not self.ng.is_data(const) and self._param_of(const) is None:
                    J = const
                    n = data
                    continue
            break
        return n, parity, J

    def _strip_centring(self, n: Any, side: str) -> Any:
        """``X @ J`` (left factor) / ``J @ Xᵀ`` (right factor) → the data operand; else ``n``."""
        if isinstance(n, fx.Node) and _is_matmul(n):
            x, y = _matmul_operands(n)
            const, data = (y, x) if side == "left" else (x, y)
            if self.ng.is_data(data) and not self.ng.is_data(const):
                return data
        return n

    def _same(self, a: Any, b: Any, depth: int = 8) -> bool:
        """Same node, or the same computation repeated (``(x - m) @ (x - m).T``)."""
        if a is b:
            return True
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or depth == 0:
            return False
        if a.op != b.op or a.op not in ("call_function", "call_method", "call_module"):
            return False
        if a.target != b.target or len(a.args) != len(b.args) or set(a.kwargs) != set(b.kwargs):
            return False
        pairs = list(zip(a.args, b.args)) + [(a.kwargs[k], b.kwargs[k]) for k in a.kwargs]
        for x, y in pairs:
            if isinstance(x, fx.Node) or isinstance(y, fx.Node):
                if not self._same(x, y, depth - 1):
                    return False
            elif x != y:
                return False
        return True

    def _einsum(self, n: fx.Node, text: str) -> Step:
        eq = n.args[0] if n.args else None
        ops = list(n.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if isinstance(eq, str) and len(ops) == 2:
            a, b = ops
            if self.ng.is_data(a) and self.ng.is_data(b):
                xa, xb = _strip_casts(a), _strip_casts(b)
                if self._same(xa, xb) and _einsum_is_gram(eq):
                    return Step(n, Role.COVARIANCE, a, f"{text} ({eq})", info={"cov": {
                        "form": "einsum", "expression": eq.replace(" ", ""), "centered": False}})
        data_ops = [o for o in ops if self.ng.is_data(o)]
        if len(data_ops) == 1 and len(ops) == 2:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} with a weight operand is not a recognised Pre-SVD layer (use F.linear, "
                f"matmul or a module)"))
        return Step(n, Role.STOP, text=text, reason=(
            f"{text} ({eq!r}) is not recognised as X Xᵀ of one feature map"))

    def _cov_function(self, n: fx.Node, form: str, text: str, *, centered: bool,
                      scaled: bool, eps: Any = None) -> Step:
        src = _first_arg(n)
        step = self._transparent(n, Role.COVARIANCE, src, text)
        if step.role == Role.COVARIANCE:
            step.info["cov"] = {"form": form, "expression": f"{form}(X)", "centered": centered,
                                "scaled": scaled, "eps": eps}
        return step

    # -- arithmetic ------------------------------------------------------------------
    def _arith(self, n: fx.Node, op: str, a: Any, b: Any, text: str) -> Step:
        if op in ("neg", "pos"):
            return self._transparent(n, Role.SCALE, a, text)
        if op == "rsub":
            a, b, op = b, a, "sub"
        da, db = self.ng.is_data(a), self.ng.is_data(b)
        if da and not db:
            role = {"add": Role.SHIFT, "sub": Role.SHIFT, "mul": Role.SCALE, "div": Role.SCALE,
                    "pow": Role.POINTWISE}[op]
            step = self._transparent(n, role, a, text)
            if role == Role.SHIFT and step.role == Role.SHIFT:
                step.info["eps"] = self._eps_value(b, negate=(op == "sub"))
            return step
        if db and not da:
            role = {"add": Role.SHIFT, "sub": Role.SHIFT, "mul": Role.SCALE,
                    "div": Role.POINTWISE, "pow": Role.POINTWISE}[op]
            step = self._transparent(n, role, b, text)
            if role == Role.SHIFT and step.role == Role.SHIFT and op == "add":
                step.info["eps"] = self._eps_value(a)
            return step
        if not da and not db:
            return Step(n, Role.STOP, text=text, reason=f"{text} of constants")
        # both operands carry data
        if a is b:
            role = {"add": Role.SCALE, "mul": Role.POINTWISE, "div": Role.POINTWISE,
                    "pow": Role.POINTWISE, "sub": Role.STOP}[op]
            if role == Role.STOP:
                return Step(n, Role.STOP, text=text, reason=f"{text}: x - x is zero")
            return Step(n, role, a, text)
        if op == "sub":
            if self._is_mean_of(b, a):
                return Step(n, Role.CENTER, a, f"{text} (x - mean(x))")
        if op == "add":
            for x, y in ((a, b), (b, a)):
                src, parity, _ = self._strip_matrix(y, "none")
                if parity == 1 and self._same(src, x):
                    return Step(n, Role.SYMMETRIZE, x, f"{text} (A + Aᵀ)")
        verb = {"add": "adds", "sub": "subtracts", "mul": "multiplies by", "div": "divides by",
                "pow": "raises to"}[op]
        other = b if op != "div" or da else a
        return Step(n, Role.STOP, text=text, reason=(
            f"{text} {verb} another tensor ({getattr(other, 'name', other)}; "
            f"{a.name} and {b.name} are both data)"))

    def _eps_value(self, c: Any, negate: bool = False) -> float | bool:
        return _eps_value(c, negate, self.ng.gm)

    def _is_mean_of(self, m: Any, x: Any) -> bool:
        for _ in range(8):
            if not isinstance(m, fx.Node):
                return False
            if (m.op == "call_method" and m.target in P.MEAN_METHODS) or (
                    m.op == "call_function" and m.target in P.MEAN_FUNCTIONS):
                return self._same(m.args[0] if m.args else m.kwargs.get("input"), x)
            if (m.op == "call_method" and m.target in ("unsqueeze", "view", "reshape", "expand",
                                                       "expand_as", "contiguous", "detach")) or (
                    m.op == "call_function" and m.target in (torch.unsqueeze, torch.reshape)):
                m = m.args[0]
                continue
            return False
        return False

    # -- methods ----------------------------------------------------------------------
    def _classify_method(self, n: fx.Node) -> Step:
        t = str(n.target)
        text = describe_target(n, self.ng)
        pats = self.patterns
        self_arg = n.args[0] if n.args else None
        if t in pats.meta_methods:
            return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
        if t in pats.transparent_methods:
            exempt = n.args[1:2] if t in _SHAPE_ONLY_SECOND_ARG else ()
            return self._transparent(n, pats.transparent_methods[t], self_arg, text, exempt=exempt)
        if t in P.MATMUL_METHODS:
            return self._matmul(n, self_arg, _arg(n, 1, "other"), text)
        if t in P.ARITHMETIC_METHODS:
            return self._arith(n, P.ARITHMETIC_METHODS[t], self_arg, _arg(n, 1, "other"), text)
        if t in P.STOP_METHODS:
            return Step(n, Role.STOP, text=text, reason=f"{text}: {P.STOP_METHODS[t]}")
        if t in P.MEAN_METHODS:
            return Step(n, Role.STOP, text=text, reason=f"{text} reduces over a dimension (may average channels)")
        return Step(n, Role.STOP, text=text, reason=(
            f"unknown method {text}; if it acts per channel or only reshapes, add {t!r} to "
            f"AnalysisConfig.transparent_methods"))


# --------------------------------------------------------------------------- small helpers
def _arg(n: fx.Node, i: int, kw: str) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(kw)


def _first_arg(n: fx.Node) -> Any:
    if n.args:
        return n.args[0]
    for key in ("input", "self", "x"):
        if key in n.kwargs:
            return n.kwargs[key]
    return next(iter(n.kwargs.values()), None)


def _is_batch_index(idx: Any) -> bool:
    """``x[i]``, ``x[:]``, ``x[i, ...]``, ``x[i, :, :]``: only the leading dim is indexed."""
    def full(s: Any) -> bool:
        return s is Ellipsis or (isinstance(s, slice) and s == slice(None))

    def lead(s: Any) -> bool:
        return isinstance(s, int) or full(s) or (isinstance(s, slice) and all(
            v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)))

    if isinstance(idx, tuple):
        return len(idx) > 0 and lead(idx[0]) and all(full(s) for s in idx[1:])
    return lead(idx)


def _fmt_index(idx: Any) -> str:
    def one(s: Any) -> str:
        if s is Ellipsis:
            return "..."
        if isinstance(s, slice):
            parts = ["" if v is None else str(getattr(v, "name", v)) for v in (s.start, s.stop)]
            txt = ":".join(parts)
            return txt + (f":{s.step}" if s.step is not None else "")
        return str(getattr(s, "name", s))

    if isinstance(idx, tuple):
        return ", ".join(one(s) for s in idx)
    return one(idx)


def _transpose_input(n: fx.Node) -> Any:
    """The input of ``n`` when ``n`` swaps the last two dims (``.T``, ``.mT``, ``transpose``...)."""
    if n.op == "call_method":
        if n.target in ("t", "transpose", "swapaxes", "swapdims", "adjoint", "t_"):
            return n.args[0]
        if n.target == "permute":
            dims = n.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            return n.args[0] if _swaps_last_two(dims) else None
        return None
    if n.op == "call_function":
        if n.target in (torch.t, torch.transpose, torch.swapaxes, torch.swapdims, torch.adjoint):
            return n.args[0]
        if n.target is torch.permute:
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
            return n.args[0] if _swaps_last_two(tuple(dims or ())) else None
        if n.target is builtins.getattr and len(n.args) > 1 and n.args[1] in P.TRANSPOSE_ATTRIBUTES:
            return n.args[0]
    return None


def _swaps_last_two(dims: tuple[Any, ...]) -> bool:
    if len(dims) < 2 or not all(isinstance(d, int) for d in dims):
        return False
    k = len(dims)
    norm = [d % k for d in dims]
    return norm[:-2] == list(range(k - 2)) and norm[-2:] == [k - 1, k - 2]


def _cast_input(n: fx.Node) -> Any:
    if n.op == "call_method" and n.target in _CAST_METHODS:
        return n.args[0]
    if n.op == "call_function" and n.target in (torch.clone, torch.detach):
        return n.args[0]
    if n.op == "call_function" and n.target is builtins.getattr and len(n.args) > 1 \
            and n.args[1] in P.IDENTITY_ATTRIBUTES:
        return n.args[0]
    return None


def _strip_casts(n: Any) -> Any:
    for _ in range(16):
        if not isinstance(n, fx.Node):
            return n
        inner = _cast_input(n)
        if inner is None:
            return n
        n = inner
    return n


def _is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in P.MATMUL_FUNCTIONS) or (
        n.op == "call_method" and n.target in P.MATMUL_METHODS)


def _matmul_operands(n: fx.Node) -> tuple[Any, Any]:
    if n.op == "call_method":
        return n.args[0], _arg(n, 1, "other")
    return _arg(n, 0, "input"), _arg(n, 1, "other")


def _einsum_is_gram(eq: str) -> bool:
    """True for equations like ``"bcm,bdm->bcd"`` / ``"nc,nd->cd"``: X Xᵀ contracted over
    at least one shared index, the two free indices kept."""
    eq = eq.replace(" ", "").replace("...", "#")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) != 2:
        return False
    t1, t2 = terms
    if len(t1) != len(t2) or len(set(t1)) != len(t1) or len(set(t2)) != len(t2):
        return False
    diff = [i for i in range(len(t1)) if t1[i] != t2[i]]
    if len(diff) != 1:
        return False
    c, d = t1[diff[0]], t2[diff[0]]
    if c in t2 or d in t1 or c not in out or d not in out:
        return False
    shared = set(t1) - {c}
    contracted = shared - set(out)
    return bool(contracted) and set(out) <= shared | {c, d}


def _eps_value(c: Any, negate: bool = False, gm: fx.GraphModule | None = None) -> float | bool:
    """The ε of ``ε·I`` (a number), or True when a constant whose value is unknown is added."""
    sign = -1.0 if negate else 1.0
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return True  # a scalar shift of every entry, not ε·I
    node = _strip_casts(c)
    scale = 1.0
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return True
        if node.op == "call_function" and node.target is torch.eye:
            return sign * scale
        if node.op == "get_attr" and gm is not None:  # a constant folded while tracing
            eps = _scaled_identity(gm, str(node.target))
            return True if eps is None else sign * scale * eps
        if (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
                node.op == "call_method" and node.target == "mul"):
            x, y = node.args[0], _arg(node, 1, "other")
            if isinstance(x, (int, float)) and isinstance(y, fx.Node):
                scale *= float(x)
                node = _strip_casts(y)
                continue
            if isinstance(y, (int, float)) and isinstance(x, fx.Node):
                scale *= float(y)
                node = _strip_casts(x)
                continue
            return True
        if node.op == "call_method" and node.target in ("unsqueeze", "expand", "expand_as", "view",
                                                         "reshape"):
            node = _strip_casts(node.args[0])
            continue
        return True
    return True


def _scaled_identity(gm: fx.GraphModule, target: str) -> float | None:
    """c when the attribute ``target`` is c·I (possibly with leading broadcast dims)."""
    t: Any = gm
    try:
        for part in target.split("."):
            t = getattr(t, part)
    except AttributeError:
        return None
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != t.shape[-2] \
            or t.numel() > 1 << 20:
        return None
    t = t.detach().reshape(-1, t.shape[-1], t.shape[-1])[0].double()
    c = float(t[0, 0])
    return c if torch.equal(t, c * torch.eye(t.shape[-1], dtype=t.dtype)) else None


# --------------------------------------------------------------------------- covariance info
def covariance_info(steps: list[Step], *, form_if_none: str = "none") -> CovarianceInfo:
    """Assemble how the decomposed matrix is built, from the steps of a successful walk
    (producer first, the meta-layer's input last)."""
    cov_i = next((i for i, s in enumerate(steps) if s.role == Role.COVARIANCE), None)
    if cov_i is None:
        return CovarianceInfo(
            form=form_if_none, expression="X" if form_if_none == "none" else "",
            centered=any(s.role == Role.CENTER for s in steps),
            scaled=any(s.role == Role.SCALE for s in steps))
    c = steps[cov_i].info.get("cov", {})
    before, after = steps[:cov_i], steps[cov_i + 1:]
    centered = bool(c.get("centered")) or any(s.role == Role.CENTER for s in before)
    scaled = bool(c.get("scaled")) or any(s.role == Role.SCALE for s in after)
    eps: float | bool | None = c.get("eps")
    for s in after:
        if s.role == Role.SHIFT:
            v = s.info.get("eps", True)
            if isinstance(v, bool) or isinstance(eps, bool):
                eps = True
            else:
                eps = (eps or 0.0) + v
    return CovarianceInfo(
        form=c.get("form", "matmul"), node=steps[cov_i].node.name,
        expression=c.get("expression", ""), centered=centered, scaled=scaled, eps=eps,
        symmetrized=any(s.role == Role.SYMMETRIZE for s in after),
    )


# --------------------------------------------------------------------------- usage
_NEUTRAL_METHODS = frozenset({
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clip", "abs", "relu", "to",
    "float", "double", "half", "contiguous", "clone", "detach", "unsqueeze", "view", "reshape",
    "expand", "expand_as", "flip", "diag_embed", "diag", "type_as", "squeeze", "add", "sub",
    "mul", "div", "maximum", "max", "where",
})
_NEUTRAL_FUNCTIONS = frozenset({
    torch.clamp, torch.clamp_min, torch.clamp_max, torch.clip, torch.abs, torch.relu,
    torch.diag_embed, torch.diag, torch.diagflat, torch.unsqueeze, torch.flip, torch.maximum,
    torch.nn.functional.relu, torch.clone, torch.reshape, operator.add, operator.sub,
    operator.mul, torch.add, torch.sub, torch.mul, operator.getitem,
})
_REASSEMBLY_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.bmm, torch.mm,
                                   operator.mul, torch.mul, torch.einsum, operator.truediv,
                                   torch.div})
_REASSEMBLY_METHODS = frozenset({"matmul", "bmm", "mm", "mul", "div", "__matmul__"})


def _power_of(n: fx.Node, prev: fx.Node) -> float | None:
    """The exponent a node applies to ``prev`` (1.0 for neutral ops); None if unknown."""
    t = n.target
    if n.op == "call_method":
        if t == "sqrt":
            return 0.5
        if t == "rsqrt":
            return -0.5
        if t == "reciprocal":
            return -1.0
        if t == "pow":
            e = _arg(n, 1, "exponent")
            return float(e) if isinstance(e, (int, float)) else None
        if t in ("div", "__rtruediv__") and n.args and n.args[0] is not prev:
            return -1.0
        if t in _NEUTRAL_METHODS:
            return 1.0
        return None
    if n.op == "call_function":
        if t in (torch.sqrt,):
            return 0.5
        if t is torch.rsqrt:
            return -0.5
        if t is torch.reciprocal:
            return -1.0
        if t in (operator.pow, torch.pow):
            base, e = n.args[0], _arg(n, 1, "exponent")
            if base is prev and isinstance(e, (int, float)):
                return float(e)
            return None
        if t in (operator.truediv, torch.div, torch.true_divide):
            return -1.0 if n.args[0] is not prev else 1.0
        if t in _NEUTRAL_FUNCTIONS:
            return 1.0
    return None


def detect_usage(ng: NodeGraph, meta: fx.Node, kind: str) -> str:
    """How the result of the decomposition at ``meta`` is used.

    ``"sqrtm"`` / ``"invsqrtm"``: the values are raised to ±1/2 (sqrt, pow(0.5), rsqrt,
    pow(-0.5), 1/sqrt, ...) and recombined with the vectors (U diag(f(λ)) Uᵀ);
    ``"eigenvalues"``: only the values are used; ``"unknown"`` otherwise.
    """
    if kind in ("sqrtm", "invsqrtm"):
        return kind
    if kind in ("eigvalsh", "svdvals"):
        return "eigenvalues"
    fields = P.OUTPUT_FIELDS.get(kind)
    if fields is None:
        return "unknown"
    values, vectors = [], []
    for user in meta.users:
        key: Any = None
        if user.op == "call_function" and user.target is operator.getitem:
            key = user.args[1]
        elif user.op == "call_function" and user.target is builtins.getattr:
            key = user.args[1]
        role = fields.get(key) if key is not None else None
        if role is None:
            return "unknown"  # the whole result escapes (returned, passed on)
        if not user.users:
            continue
        (values if role == "values" else vectors).append(user)
    if not values and not vectors:
        return "unknown"
    if not vectors:
        return "eigenvalues"
    if not values:
        return "unknown"
    dv = ng.descendants(values)
    dU = ng.descendants(vectors)
    common = [n for n in dv & dU if n.op != "output"]
    if not common:
        return "unknown"
    first = min(common, key=ng.order.__getitem__)
    if not ((first.op == "call_function" and first.target in _REASSEMBLY_FUNCTIONS) or (
            first.op == "call_method" and first.target in _REASSEMBLY_METHODS)):
        return "unknown"
    # the value-side path into the reassembly must be one chain of known ops
    between = (dv & nx.ancestors(ng.G, first)) - set(values)
    if len(values) != 1:
        return "unknown"
    exponent = 1.0
    prev = values[0]
    chain = sorted(between, key=ng.order.__getitem__)
    for node in chain:
        ins = [a for a in node.all_input_nodes if a in between or a is values[0]]
        if len(ins) != 1 or ins[0] is not prev:
            return "unknown"
        p = _power_of(node, prev)
        if p is None:
            return "unknown"
        exponent *= p
        prev = node
    if first.op == "call_function" and first.target in (operator.truediv, torch.div) \
            and first.args[0] is not prev:
        exponent = -exponent
    if first.op == "call_method" and first.target == "div" and first.args[0] is not prev:
        exponent = -exponent
    if math.isclose(exponent, 0.5):
        return "sqrtm"
    if math.isclose(exponent, -0.5):
        return "invsqrtm"
    return "unknown"
