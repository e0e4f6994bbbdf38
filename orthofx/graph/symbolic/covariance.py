"""One idea: recognising a covariance on fx nodes.

A product of one feature map with its own transpose (``X Xᵀ``, ``Xᵀ X``, through casts,
transposes and a constant centring matrix ``J``), a Gram ``einsum`` (``"bcm,bdm->bcd"``),
``x - mean(x)`` (centring), ``A + Aᵀ`` (symmetrising), the ``ε`` of an ``+ ε·I`` shift, and
:func:`covariance_info`: how the decomposed matrix is built, read off a successful walk.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from orthofx.graph.result import CovarianceInfo
from orthofx.graph.symbolic import patterns as P
from orthofx.graph.symbolic.nodes import (
    NodeGraph,
    arg_of,
    cast_input,
    is_matmul,
    matmul_operands,
    same_computation,
    strip_casts,
    transpose_input,
)
from orthofx.graph.symbolic.step import CovarianceOp, Step
from orthofx.vocab import Role

__all__: list[str] = []  # internal module: import what you need by name


# --------------------------------------------------------------------------- X Xᵀ
def covariance_of_product(ng: NodeGraph, n: fx.Node, a: Any, b: Any) -> tuple[Any, CovarianceOp] | None:
    """``(source, cov)`` when the product ``a @ b`` at ``n`` is ``X Xᵀ`` / ``Xᵀ X`` (possibly
    centred, ``X J Xᵀ``) of one feature map; ``source`` is the factor the walk continues
    through. None otherwise."""
    if not (ng.is_data(a) and ng.is_data(b)):
        return None
    xa, pa, ja = strip_matrix(ng, a, "left")
    xb, pb, jb = strip_matrix(ng, b, "right")
    if pa == pb or not same_computation(xa, xb):
        return None
    expr = ("X" if pa == 0 else "Xᵀ") + (" J" if (ja is not None or jb is not None) else "") \
        + (" Xᵀ" if pb == 1 else " X")
    form = {operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
            torch.mm: "mm"}.get(n.target, str(n.target) if n.op == "call_method" else "matmul")
    # continue through the un-transposed factor (keeps its casts in the chain)
    src = strip_centring(ng, a, "left") if pa == 0 else strip_centring(ng, b, "right")
    return src, CovarianceOp(form=form, expression=expr, centered=ja is not None or jb is not None)


def strip_matrix(ng: NodeGraph, n: Any, side: str) -> tuple[Any, int, Any]:
    """Remove transposes, casts and a centring matrix J from one factor of a product:
    ``(what is left, transpose parity, J or None)``."""
    parity, J = 0, None
    for _ in range(16):
        if not isinstance(n, fx.Node):
            break
        inner = transpose_input(n)
        if inner is not None:
            parity ^= 1
            n = inner
            continue
        inner = cast_input(n)
        if inner is not None:
            n = inner
            continue
        if J is None and side in ("left", "right") and is_matmul(n):
            x, y = matmul_operands(n)
            const, data = (y, x) if side == "left" else (x, y)
            if ng.is_data(data) and isinstance(const, fx.Node) \
                    and not ng.is_data(const) and ng.param_of(const) is None:
                J = const
                n = data
                continue
        break
    return n, parity, J


def strip_centring(ng: NodeGraph, n: Any, side: str) -> Any:
    """``X @ J`` (left factor) / ``J @ Xᵀ`` (right factor) → the data operand; else ``n``."""
    if isinstance(n, fx.Node) and is_matmul(n):
        x, y = matmul_operands(n)
        const, data = (y, x) if side == "left" else (x, y)
        if ng.is_data(data) and not ng.is_data(const):
            return data
    return n


# --------------------------------------------------------------------------- einsum
def einsum_gram(ng: NodeGraph, eq: Any, ops: list[Any]) -> tuple[Any, CovarianceOp] | None:
    """``(source, cov)`` when ``einsum(eq, a, b)`` is the Gram matrix of one feature map."""
    if isinstance(eq, str) and len(ops) == 2:
        a, b = ops
        if ng.is_data(a) and ng.is_data(b):
            xa, xb = strip_casts(a), strip_casts(b)
            if same_computation(xa, xb) and einsum_is_gram(eq):
                return a, CovarianceOp(form="einsum", expression=eq.replace(" ", ""))
    return None


def einsum_is_gram(eq: str) -> bool:
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



# --------------------------------------------------------------------------- centring, symmetrising
def symmetrized_source(ng: NodeGraph, a: Any, b: Any) -> Any:
    """``A`` when ``a + b`` is ``A + Aᵀ`` (either order); else None."""
    for x, y in ((a, b), (b, a)):
        src, parity, _ = strip_matrix(ng, y, "none")
        if parity == 1 and same_computation(src, x):
            return x
    return None


def is_mean_of(m: Any, x: Any) -> bool:
    """True when ``m`` is a mean of ``x`` (possibly unsqueezed / reshaped / expanded)."""
    for _ in range(8):
        if not isinstance(m, fx.Node):
            return False
        if (m.op == "call_method" and m.target in P.MEAN_METHODS) or (
                m.op == "call_function" and m.target in P.MEAN_FUNCTIONS):
            return same_computation(m.args[0] if m.args else m.kwargs.get("input"), x)
        if (m.op == "call_method" and m.target in ("unsqueeze", "view", "reshape", "expand",
                                                   "expand_as", "contiguous", "detach")) or (
                m.op == "call_function" and m.target in (torch.unsqueeze, torch.reshape)):
            m = m.args[0]
            continue
        return False
    return False


# --------------------------------------------------------------------------- ε·I
def eps_value(c: Any, negate: bool = False, gm: fx.GraphModule | None = None) -> float | bool:
    """The ε of ``ε·I`` (a number), or True when a constant whose value is unknown is added."""
    sign = -1.0 if negate else 1.0
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return True  # a scalar shift of every entry, not ε·I
    node = strip_casts(c)
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
            x, y = node.args[0], arg_of(node, 1, "other")
            if isinstance(x, (int, float)) and isinstance(y, fx.Node):
                scale *= float(x)
                node = strip_casts(y)
                continue
            if isinstance(y, (int, float)) and isinstance(x, fx.Node):
                scale *= float(y)
                node = strip_casts(x)
                continue
            return True
        if node.op == "call_method" and node.target in ("unsqueeze", "expand", "expand_as", "view",
                                                         "reshape"):
            node = strip_casts(node.args[0])
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
    c = steps[cov_i].cov or CovarianceOp(form="matmul", expression="")
    before, after = steps[:cov_i], steps[cov_i + 1:]
    centered = c.centered or any(s.role == Role.CENTER for s in before)
    scaled = c.scaled or any(s.role == Role.SCALE for s in after)
    eps: float | bool | None = c.eps
    for s in after:
        if s.role == Role.SHIFT:
            v = True if s.eps is None else s.eps  # a shift whose ε was not read: a constant
            if isinstance(v, bool) or isinstance(eps, bool):
                eps = True
            else:
                eps = (eps or 0.0) + v
    return CovarianceInfo(
        form=c.form, node=steps[cov_i].node.name,
        expression=c.expression, centered=centered, scaled=scaled, eps=eps,
        symmetrized=any(s.role == Role.SYMMETRIZE for s in after),
    )
