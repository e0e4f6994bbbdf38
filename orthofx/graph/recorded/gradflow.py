"""Does a meta-layer's backward run? (pure)

The treatments of a Pre-SVD layer act on the conditioning of the covariance the
decomposition's **backward** sees (its 1/(λᵢ − λⱼ) terms). When every use of a
decomposition's outputs is ``.detach()``-ed or runs under ``torch.no_grad()`` before it
reaches what the model returns, no gradient flows back through the decomposition: treating
its Pre-SVD layer cannot change that backward (only the forward's conditioning). The
analysis says so in the meta-layer's ``notes``.

* :func:`recorded_cut` reads a :class:`~orthofx.graph.record.Recording`: the decomposition's
  users are followed through the ops that record gradients (grad mode on, not ``detach``;
  every op inside a user autograd.Function's forward carries its hand-written backward) to
  the tensors the forward returned.
* :func:`fx_cut` reads an fx graph: users are followed to the ``output`` node, not through
  ``detach`` nor through nodes between ``torch._C._set_grad_enabled(False)`` and ``(True)``.

Only decompositions and solvers are checked (an iteration's products are often run under
``no_grad`` on purpose, e.g. a power iteration's vectors, while the gradient flows through
``uᵀ Σ v``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from orthofx.graph.ops import DECOMPOSITIONS, NodeKind
from orthofx.graph.record import Recording

__all__: list[str] = []  # internal module: import what you need by name

_DETACH = frozenset({"detach", "detach_", "detach_copy"})


def cut_note(op: str, how: str) -> str:
    """The note of a meta-layer whose decomposition ``op`` is cut from the gradient."""
    return (f"no gradient flows back through {op}: its outputs are {how} before they reach the "
            f"model's outputs, so treating its Pre-SVD layer cannot change this decomposition's "
            f"backward (only the conditioning of its forward)")


def recorded_cut(rec: Recording, site: int) -> str | None:
    """The note for the decomposition recorded at node ``site`` when no gradient flows back
    through it, else None (also when unknown: a forward recorded without grad mode, no
    recorded outputs, or a site that is not a decomposition)."""
    n = rec.nodes[site]
    if not rec.grad or not rec.outputs or n.kind is not NodeKind.OP or n.op not in DECOMPOSITIONS:
        return None
    if n.function is None and not n.grad:
        return cut_note(n.op, "computed under torch.no_grad()")
    outputs = set(rec.outputs)
    if site in outputs:
        return None
    stack, seen, detached = list(n.users), set(), False
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        u = rec.nodes[i]
        inside = u.function is not None  # a user Function's forward: its own backward carries it
        if not inside and (u.op in _DETACH or not u.grad):
            detached = True
            continue
        if i in outputs:
            return None
        stack.extend(u.users)
    return cut_note(n.op, ".detach()ed or used under torch.no_grad()") if detached else None


_DETACH_TARGETS = (torch.detach, torch.Tensor.detach)


def _is_detach(n: fx.Node) -> bool:
    if n.op == "call_method":
        return str(n.target) in _DETACH
    return n.op == "call_function" and n.target in _DETACH_TARGETS


def _no_grad_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes between ``_set_grad_enabled(False)`` and ``(True)`` (a traced ``torch.no_grad()``)."""
    out: set[fx.Node] = set()
    enabled = True
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled and n.args:
            enabled = bool(n.args[0])
            continue
        if not enabled:
            out.add(n)
    return out


def fx_cut(node: fx.Node, target: Any) -> str | None:
    """The note for meta-layer call ``node`` of an fx graph when no gradient flows back
    through it (every path to ``output`` crosses a ``detach`` or a no-grad block), else None."""
    graph = node.graph
    no_grad = _no_grad_nodes(graph)
    if node in no_grad:
        return cut_note(str(target), "computed under torch.no_grad()")
    stack, seen, detached = list(node.users), set(), False
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "output":
            return None
        if _is_detach(u) or u in no_grad:
            detached = True
            continue
        stack.extend(u.users)
    return cut_note(str(target), ".detach()ed or used under torch.no_grad()") if detached else None
