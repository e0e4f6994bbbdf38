"""Does a traced meta-layer's backward run? (pure)

The fx counterpart of :func:`orthofx.graph.recorded.gradflow.recorded_cut`: :func:`fx_cut`
follows a meta-layer call's users to the graph's ``output`` node, not through ``detach`` nor
through nodes between ``torch._C._set_grad_enabled(False)`` and ``(True)`` (a traced
``torch.no_grad()``). When no path gets through, treating the Pre-SVD layer cannot change the
decomposition's backward, and the entry's ``notes`` say so
(:func:`~orthofx.graph.result.cut_note`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from orthofx.graph.result import cut_note

__all__: list[str] = []  # internal module: import what you need by name

_DETACH = frozenset({"detach", "detach_", "detach_copy"})
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
