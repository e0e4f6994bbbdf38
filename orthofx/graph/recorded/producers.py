"""The producer walk on a :class:`~orthofx.graph.recorded.record.Recording` (pure).

From the features a covariance is formed from, walk back through every op (elementwise ops,
normalisation, pooling, reshapes, casts, centring, attention, other meta-layers' outputs) to
the first op on each path that applies a **parameter** as a linear map:

* a convolution whose kernel is (a view of, or computed only from) parameters;
* a matrix product with one data operand and one parameter operand (``nn.Linear``'s
  ``addmm``, ``x @ self.W``, ``Wᵀ X W``).

The walk never climbs into parameters and never crosses such an op. A kernel computed from
data (Cholesky whitening used as a grouped conv kernel) is not a producer: the walk goes on
through both operands. Embedding look-ups end a path without a producer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orthofx.graph.recorded.covariances import operands
from orthofx.graph.recorded.ops import CONVOLUTIONS, NodeKind, TERMINALS, VIEWS
from orthofx.graph.recorded.record import Node, Recording, Ref

__all__: list[str] = []  # internal module: import what you need by name

_TRANSPOSING = frozenset({"t", "transpose", "permute", "numpy_T", "mT", "adjoint"})


@dataclass(frozen=True)
class Producer:
    """A Pre-SVD weight found by the walk.

    Attributes:
        param: user-facing qualified parameter name (``"conv.weight"``, also for a
            parametrized or weight-normed weight).
        module: qualified name of the module that owns it.
        node: index of the op that applies it.
        op: that op's name (``"convolution"``, ``"addmm"``, ``"mm"``, ...).
        shape: the weight's shape.
        transposed: the stored weight is the transpose of the (out, in) map.
        groups: convolution groups.
    """

    param: str
    module: str
    node: int
    op: str
    shape: tuple[int, ...]
    transposed: bool = False
    groups: int = 1

    @property
    def flat_shape(self) -> tuple[int, int]:
        if not self.shape:
            return (0, 0)
        if len(self.shape) == 2 and self.transposed:
            return (self.shape[1], self.shape[0])
        return (self.shape[0], math.prod(self.shape[1:]))


def user_param_name(name: str) -> str:
    """``m.parametrizations.weight.original`` → ``m.weight``; ``m.weight_g``/``_v`` → ``m.weight``."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1].startswith("original"):
        return ".".join(parts[:-3] + [parts[-2]])
    for suffix in ("_g", "_v", "_orig"):
        if parts[-1].endswith(suffix) and parts[-1][: -len(suffix)]:
            return ".".join(parts[:-1] + [parts[-1][: -len(suffix)]])
    return name


def _resolve_weight(rec: Recording, w: Any) -> tuple[str, tuple[int, ...], int] | None:
    """(user param name, stored shape, transpose parity) of a parameter-only operand."""
    parity = 0
    ref = w
    for _ in range(64):
        if not isinstance(ref, Ref):
            return None
        n = rec.node(ref)
        if n.kind is NodeKind.PARAM:
            name = user_param_name(rec.params[n.index])
            return name, tuple(n.shape or ()), parity
        if n.kind is NodeKind.OP and n.op in VIEWS and n.inputs:
            if n.op in _TRANSPOSING:
                parity ^= 1
            ref = n.inputs[0]
            continue
        break
    # computed from parameters only (parametrize, weight_norm): its parameter ancestors
    names: dict[str, tuple[int, ...]] = {}
    stack, seen = [ref.node], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = rec.nodes[i]
        if n.kind is NodeKind.PARAM:
            names.setdefault(user_param_name(rec.params[i]), tuple(n.shape or ()))
        stack.extend(r.node for r in n.inputs)
    if len(names) != 1:
        return None
    ((name, _),) = names.items()
    node = rec.node(w) if isinstance(w, Ref) else None
    shape = tuple(node.shapes[w.out]) if node is not None and w.out < len(node.shapes) else ()
    return name, shape, parity


def _param_only(rec: Recording, v: Any) -> bool:
    return isinstance(v, Ref) and rec.node(v).param and not rec.node(v).data


def weighted(rec: Recording, n: Node) -> Producer | None:
    """The producer applied by op ``n``, or None when ``n`` applies no parameter."""
    if n.kind is not NodeKind.OP:
        return None
    if n.op in CONVOLUTIONS:
        w = n.arg(1)
        if not _param_only(rec, w) or not isinstance(n.arg(0), Ref) or not rec.node(n.arg(0)).data:
            return None
        found = _resolve_weight(rec, w)
        if found is None:
            return None
        name, shape, _ = found
        g = n.arg(8) if n.op in ("convolution", "_convolution") else n.arg(6)
        return Producer(name, name.rpartition(".")[0], n.index, n.op, shape,
                        groups=int(g) if isinstance(g, int) else 1)
    ops = operands(n)
    if ops is None:
        return None
    a, b = ops
    for w, x, w_left in ((b, a, False), (a, b, True)):
        if _param_only(rec, w) and isinstance(x, Ref) and rec.node(x).data:
            found = _resolve_weight(rec, w)
            if found is None:
                return None
            name, shape, parity = found
            # X @ E: E = W (stored (in, out): transposed) when parity 0; W @ X: transposed when parity 1
            transposed = (parity == 0) if not w_left else (parity == 1)
            if len(shape) != 2:
                transposed = False
            return Producer(name, name.rpartition(".")[0], n.index, n.op, shape, transposed=transposed)
    return None


def walk_producers(rec: Recording, sources: tuple[Ref, ...]
                   ) -> tuple[list[Producer], dict[int, int], list[str]]:
    """Producers on every path into ``sources``.

    Returns:
        (producers in order of discovery, parent map for chains (node → the node it feeds
        on the walk), dead ends: why paths ended without a producer).
    """
    found: dict[str, Producer] = {}
    parent: dict[int, int] = {}
    dead: dict[str, None] = {}
    stack = [r.node for r in sources]
    seen: set[int] = set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = rec.nodes[i]
        if n.kind is NodeKind.INPUT:
            dead.setdefault(f"reaches the model input {n.op}", None)
            continue
        if n.kind is not NodeKind.OP:
            continue
        if n.op in TERMINALS:
            dead.setdefault(f"{n.op} (a look-up, not a linear map)", None)
            continue
        p = weighted(rec, n)
        if p is not None:
            found.setdefault(p.param, p)
            continue
        for r in reversed(n.inputs):
            if rec.node(r).data and r.node not in seen:
                parent.setdefault(r.node, i)
                stack.append(r.node)
    return list(found.values()), parent, list(dead)
