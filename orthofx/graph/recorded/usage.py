"""One idea: how the result of a recorded decomposition is used (:func:`detect_usage`).

The recorded counterpart of :mod:`orthofx.graph.symbolic.usage`: follows the eigen/singular
values of one ``eigh``/``svd`` op through the ops that ran, one consumer at a time, to the op
where they meet the vectors again (``U diag(f(λ)) Uᵀ``: ``mm``/``bmm``/``mul``/``div``), and
reads the power ``f`` applies to them (``sqrt`` ½, ``rsqrt`` −½, ``pow(x, p)`` p, ``1/x``
−1; clamps, casts, views, ``diag_embed`` and scalar ``+ − × ÷`` leave it). A power of ±½
makes the meta-layer a matrix square root / inverse square root, values alone are
``"eigenvalues"``; anything else (the values used twice, an unknown op, an exponent other than
±½) is ``"unknown"`` — the labels of the symbolic path, checked on the same models. Autograd's own
``detach`` consumers are not uses.
"""

from __future__ import annotations

import math
from typing import Any

from orthofx.graph.recorded.record import Recording, Ref

__all__: list[str] = []  # internal module: import what you need by name

#: output index of the values and the vectors, per decomposition op
_OUTPUTS = {
    "_linalg_eigh": (0, (1,)), "linalg_eigh": (0, (1,)),
    "_linalg_svd": (1, (0, 2)), "linalg_svd": (1, (0, 2)), "svd": (1, (0, 2)),
}
_POWERS = {"sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0}
#: ops that keep the exponent when every other tensor input is independent of the vectors
_NEUTRAL = frozenset({
    "clamp", "clamp_min", "clamp_max", "abs", "relu", "_to_copy", "to", "clone", "view",
    "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "diag_embed", "diag", "alias",
    "contiguous", "flip", "maximum", "where", "add", "sub", "mul", "div", "nan_to_num",
})
_REASSEMBLY = frozenset({"mm", "bmm", "mul", "matmul", "div", "einsum"})


def _users_of(rec: Recording, ref: Ref) -> list[int]:
    """The nodes that read output ``ref`` (``Node.users`` narrowed to that output), once per
    argument that reads it, autograd's ``detach`` left out."""
    return [u for u in rec.nodes[ref.node].users if rec.nodes[u].op != "detach"
            for r in rec.nodes[u].inputs if r == ref]


def _descendants(rec: Recording, starts: list[Ref]) -> set[int]:
    """Every node downstream of the outputs ``starts`` (``Node.users``, ``detach`` left out)."""
    seen: set[int] = set()
    stack = [i for r in starts for i in _users_of(rec, r)]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack += [u for u in rec.nodes[i].users if rec.nodes[u].op != "detach"]
    return seen


def _power(node: Any, cur: Ref, vec_desc: set[int]) -> float | None:
    """The exponent ``node`` applies to its input ``cur`` (None: unknown)."""
    others = [r for r in node.inputs if Ref(r.node, r.out) != cur]
    if any(r.node in vec_desc for r in others):
        return None
    op = node.op
    if op in _POWERS:
        return _POWERS[op]
    if op == "pow":
        base, e = (node.args + (None, None))[:2]
        return float(e) if base == cur and isinstance(e, (int, float)) and not isinstance(e, bool) else None
    if op == "div" and node.args and node.args[0] != cur:
        return -1.0  # something / λ
    if op in _NEUTRAL:
        return 1.0
    return None


def detect_usage(rec: Recording, site: int) -> str:
    """``"sqrtm"`` / ``"invsqrtm"`` when the values of the decomposition at node ``site`` are
    raised to ±½ and recombined with its vectors, ``"eigenvalues"`` when only the values are
    used, else ``"unknown"`` (module doc)."""
    node = rec.nodes[site]
    outs = _OUTPUTS.get(node.op)
    if outs is None:
        return "unknown"
    if not any(_users_of(rec, Ref(site, o)) for o in outs[1]):  # the vectors are not used
        return "eigenvalues" if _users_of(rec, Ref(site, outs[0])) else "unknown"
    vec_desc = _descendants(rec, [Ref(site, o) for o in outs[1]])
    cur, exponent = Ref(site, outs[0]), 1.0
    for _ in range(len(rec.nodes)):
        nxt = _users_of(rec, cur)
        if len(nxt) != 1:
            return "unknown"
        u = rec.nodes[nxt[0]]
        if u.index in vec_desc:  # the values meet the vectors
            if u.op not in _REASSEMBLY:
                return "unknown"
            if u.op == "div" and u.args and u.args[0] != cur:
                exponent = -exponent  # U / f(λ)
            break
        p = _power(u, cur, vec_desc)
        if p is None:
            return "unknown"
        exponent *= p
        cur = Ref(u.index, 0)
    else:
        return "unknown"
    if math.isclose(exponent, 0.5):
        return "sqrtm"
    if math.isclose(exponent, -0.5):
        return "invsqrtm"
    return "unknown"
