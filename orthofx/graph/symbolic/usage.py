"""One idea: how the result of a decomposition is used (:func:`detect_usage`).

Follows the eigen/singular values and vectors of one meta-layer to where they are recombined
(``U diag(f(λ)) Uᵀ``) and reads the power ``f`` applies to the values: ``±1/2`` makes the
meta-layer a matrix square root / inverse square root.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from orthofx.graph.symbolic import patterns as P
from orthofx.graph.symbolic.nodes import NodeGraph, arg_of

__all__: list[str] = []  # internal module: import what you need by name

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
            e = arg_of(n, 1, "exponent")
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
            base, e = n.args[0], arg_of(n, 1, "exponent")
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
