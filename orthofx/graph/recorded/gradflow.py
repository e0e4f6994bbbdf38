"""Does a recorded meta-layer's backward run? (pure)

The treatments of a Pre-SVD layer act on the conditioning of the covariance the
decomposition's **backward** sees (its 1/(λᵢ − λⱼ) terms). When every use of a
decomposition's outputs is ``.detach()``-ed or runs under ``torch.no_grad()`` before it
reaches what the model returns, no gradient flows back through the decomposition: treating
its Pre-SVD layer cannot change that backward (only the forward's conditioning). The
analysis says so in the meta-layer's ``notes`` (:func:`~orthofx.graph.result.cut_note`).

:func:`recorded_cut` reads a :class:`~orthofx.graph.recorded.record.Recording`: the
decomposition's users are followed through the ops that record gradients (grad mode on, not
``detach``; every op inside a user autograd.Function's forward carries its hand-written
backward) to the tensors the forward returned. Only decompositions and solvers are checked (an
iteration's products are often run under ``no_grad`` on purpose, e.g. a power iteration's
vectors, while the gradient flows through ``uᵀ Σ v``). The symbolic engine's counterpart is
:func:`orthofx.graph.symbolic.gradflow.fx_cut`.
"""

from __future__ import annotations

from orthofx.graph.recorded.ops import DECOMPOSITIONS, NodeKind
from orthofx.graph.recorded.record import Recording
from orthofx.graph.result import cut_note

__all__: list[str] = []  # internal module: import what you need by name

_DETACH = frozenset({"detach", "detach_", "detach_copy"})


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
