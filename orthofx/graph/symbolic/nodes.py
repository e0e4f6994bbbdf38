"""One idea: an fx graph as networkx, and what its nodes are.

:class:`NodeGraph` mirrors an ``fx.Graph`` as a ``networkx.DiGraph`` (edge = data flow) and
knows which nodes carry data (depend on a model input through values, not only through
shapes) and which parameter a weight operand stands for. The functions below read one node:
a readable target (:func:`describe_target`), its arguments, whether it only transposes or
casts its input, whether it indexes only the batch dimension, whether two nodes repeat the
same computation.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from orthofx.graph.symbolic import patterns as P
from orthofx.graph.symbolic.trace import TraceInfo, function_of, trace_info

__all__: list[str] = []  # internal module: import what you need by name

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

    def param_of(self, w: Any, allow_transpose: bool = True) -> tuple[str, str, int] | None:
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
                        self.module(target), parametrize.ParametrizationList):
                    base = owner[: -len("parametrizations")].rstrip(".")
                    return ("param", f"{base}.{name}" if base else name, parity)
                return None
            if w.op == "get_attr":
                qual = str(w.target)
                if qual in self.params:
                    return ("param", qual, parity)
                if qual in self.buffers:
                    return ("buffer", qual, parity)
                return None
            inner = transpose_input(w)
            if inner is not None and allow_transpose:
                parity ^= 1
                w = inner
                continue
            inner = cast_input(w)
            if inner is not None:
                w = inner
                continue
            return None
        return None


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
    **{f: d.name for f, d in P.TORCH_DECOMPOSITIONS.items()},
    torch.nn.functional.linear: "F.linear",
    torch.nn.functional.gelu: "F.gelu",
}


# --------------------------------------------------------------------------- one node
CAST_METHODS = frozenset({"contiguous", "float", "double", "half", "bfloat16", "to", "type",
                          "clone", "detach", "cpu", "cuda"})


def arg_of(n: fx.Node, i: int, kw: str) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(kw)


def first_arg(n: fx.Node) -> Any:
    if n.args:
        return n.args[0]
    for key in ("input", "self", "x"):
        if key in n.kwargs:
            return n.kwargs[key]
    return next(iter(n.kwargs.values()), None)


def is_batch_index(idx: Any) -> bool:
    """``x[i]``, ``x[:]``, ``x[i, ...]``, ``x[i, :, :]``: only the leading dim is indexed."""
    def full(s: Any) -> bool:
        return s is Ellipsis or (isinstance(s, slice) and s == slice(None))

    def lead(s: Any) -> bool:
        return isinstance(s, int) or full(s) or (isinstance(s, slice) and all(
            v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)))

    if isinstance(idx, tuple):
        return len(idx) > 0 and lead(idx[0]) and all(full(s) for s in idx[1:])
    return lead(idx)


def fmt_index(idx: Any) -> str:
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


def transpose_input(n: fx.Node) -> Any:
    """The input of ``n`` when ``n`` swaps the last two dims (``.T``, ``.mT``, ``transpose``...)."""
    if n.op == "call_method":
        if n.target in ("t", "transpose", "swapaxes", "swapdims", "adjoint", "t_"):
            return n.args[0]
        if n.target == "permute":
            dims = n.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = tuple(dims[0])
            return n.args[0] if swaps_last_two(dims) else None
        return None
    if n.op == "call_function":
        if n.target in (torch.t, torch.transpose, torch.swapaxes, torch.swapdims, torch.adjoint):
            return n.args[0]
        if n.target is torch.permute:
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
            return n.args[0] if swaps_last_two(tuple(dims or ())) else None
        if n.target is builtins.getattr and len(n.args) > 1 and n.args[1] in P.TRANSPOSE_ATTRIBUTES:
            return n.args[0]
    return None


def swaps_last_two(dims: tuple[Any, ...]) -> bool:
    if len(dims) < 2 or not all(isinstance(d, int) for d in dims):
        return False
    k = len(dims)
    norm = [d % k for d in dims]
    return norm[:-2] == list(range(k - 2)) and norm[-2:] == [k - 1, k - 2]


def cast_input(n: fx.Node) -> Any:
    if n.op == "call_method" and n.target in CAST_METHODS:
        return n.args[0]
    if n.op == "call_function" and n.target in (torch.clone, torch.detach):
        return n.args[0]
    if n.op == "call_function" and n.target is builtins.getattr and len(n.args) > 1 \
            and n.args[1] in P.IDENTITY_ATTRIBUTES:
        return n.args[0]
    return None


def strip_casts(n: Any) -> Any:
    for _ in range(16):
        if not isinstance(n, fx.Node):
            return n
        inner = cast_input(n)
        if inner is None:
            return n
        n = inner
    return n


def is_matmul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in P.MATMUL_FUNCTIONS) or (
        n.op == "call_method" and n.target in P.MATMUL_METHODS)


def matmul_operands(n: fx.Node) -> tuple[Any, Any]:
    if n.op == "call_method":
        return n.args[0], arg_of(n, 1, "other")
    return arg_of(n, 0, "input"), arg_of(n, 1, "other")


def same_computation(a: Any, b: Any, depth: int = 8) -> bool:
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
            if not same_computation(x, y, depth - 1):
                return False
        elif x != y:
            return False
    return True
