"""Covariance recognition on a :class:`~orthofx.graph.recorded.record.Recording` (pure).

A matrix product ``P = A·B`` (mm/bmm/matmul/baddbmm/addmm; einsum and ``@`` reach ATen as
these) is covariance-like when

* **Gram** ``X Xᵀ`` / ``Xᵀ X`` / ``X J Xᵀ``: both operands are views (transpose, permute,
  reshape, expand, casts, constant scaling) of the same data tensor X, optionally through a
  product with a constant centring matrix J, and P is symmetric (checked on the recorded
  value, so ``X·X`` of a square X is not taken for ``X Xᵀ``);
* **cross** ``q kᵀ``: the operands are two slices of one tensor (the halves of one linear's
  output) or two weighted maps (two linears / convs) of the same input; square output;
* **congruence** ``Wᵀ S W``: both sides are the same bare parameter W around a data matrix S
  (SPD networks); the producer is W itself.

Whether a covariance is a meta-layer is decided by :mod:`orthofx.graph.recorded.regions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch

from orthofx.graph.recorded.ops import CONVOLUTIONS, CovForm, NodeKind, PRODUCTS, SCALES, SLICES, VIEWS
from orthofx.graph.recorded.record import Node, Recording, Ref

__all__: list[str] = []  # internal module: import what you need by name


@dataclass(frozen=True)
class Covariance:
    """A covariance-like product.

    Attributes:
        node: index of the product node.
        form: :class:`~orthofx.graph.recorded.ops.CovForm`.
        sources: the feature tensors it is formed from (walk starts of the producer search).
        param: for a congruence, the node index of the parameter W.
        centered: a centring matrix or a mean subtraction was seen.
        expression: ``"X Xᵀ"``, ``"X J Xᵀ"``, ``"q kᵀ"``, ``"Wᵀ S W"``.
    """

    node: int
    form: CovForm
    sources: tuple[Ref, ...]
    param: int | None = None
    centered: bool = False
    expression: str = ""


def operands(n: Node) -> tuple[Any, Any] | None:
    """The two matrix operands of a product node (Refs or constants), or None."""
    pos = PRODUCTS.get(n.op)
    if pos is None:
        return None
    a, b = n.arg(pos[0]), n.arg(pos[1])
    return a, b


def _is_const(rec: Recording, v: Any) -> bool:
    """A python scalar, or a tensor derived from neither data nor parameters."""
    if not isinstance(v, Ref):
        return True
    n = rec.node(v)
    return not n.data and not n.param


def strip(rec: Recording, ref: Any, *, scales: bool = True) -> Any:
    """Follow views, casts and constant scalings back to the tensor they re-index."""
    for _ in range(64):
        if not isinstance(ref, Ref):
            return ref
        n = rec.node(ref)
        if n.kind is not NodeKind.OP:
            return ref
        if n.op in VIEWS and n.inputs:
            ref = n.inputs[0]
            continue
        if scales and n.op in SCALES and len(n.inputs) >= 1:
            data_in = [r for r in n.inputs if not _is_const(rec, r)]
            if len(data_in) == 1 and all(_scalar_like(rec, v) for v in n.args if v is not data_in[0]):
                ref = data_in[0]
                continue
        return ref
    return ref


def _scalar_like(rec: Recording, v: Any) -> bool:
    if not isinstance(v, Ref):
        return True
    n = rec.node(v)
    if n.data or n.param:
        return False
    shape = n.shapes[v.out] if v.out < len(n.shapes) else None
    return shape is not None and all(s == 1 for s in shape)


def _key(rec: Recording, ref: Any, depth: int = 0) -> Hashable:
    """Identity of a stripped operand; equal slices of one tensor get equal keys."""
    ref = strip(rec, ref)
    if not isinstance(ref, Ref) or depth > 8:
        return ("const", repr(ref))
    n = rec.node(ref)
    if n.kind is NodeKind.OP and n.op in SLICES and n.inputs:
        rest = tuple(_hashable(a) for a in n.args[1:])
        return (n.op, _key(rec, n.inputs[0], depth + 1), rest, ref.out)
    return (ref.node, ref.out)


def _hashable(v: Any) -> Hashable:
    if isinstance(v, Ref):
        return ("ref", v.node, v.out)
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _slice_base(rec: Recording, ref: Any) -> Hashable | None:
    """The tensor a stripped operand is a part of (through slices, then views), or None."""
    ref = strip(rec, ref)
    if not isinstance(ref, Ref):
        return None
    n = rec.node(ref)
    if n.kind is NodeKind.OP and n.op in SLICES and n.inputs:
        return _key(rec, n.inputs[0])
    return None


def _uncentre(rec: Recording, ref: Any) -> Any:
    """``X J`` / ``J X`` with J constant → X (stripped); anything else unchanged."""
    if not isinstance(ref, Ref):
        return ref
    n = rec.node(ref)
    ops = operands(n) if n.kind is NodeKind.OP else None
    if ops is None:
        return ref
    a, b = ops
    if _is_const(rec, b) and not _is_const(rec, a):
        return strip(rec, a)
    if _is_const(rec, a) and not _is_const(rec, b):
        return strip(rec, b)
    return ref


def param_operand(rec: Recording, v: Any) -> int | None:
    """Node index of the parameter that operand ``v`` re-indexes (views, casts and slices of
    the parameter alone, e.g. ``self.W[0, 0]`` of a (1, 1, n, m) Parameter), or None."""
    ref = v
    for _ in range(64):
        ref = strip(rec, ref, scales=False)
        if not isinstance(ref, Ref):
            return None
        n = rec.node(ref)
        if n.kind is NodeKind.PARAM:
            return ref.node
        if n.kind is NodeKind.OP and n.op in SLICES and n.inputs and n.param and not n.data:
            ref = n.inputs[0]
            continue
        return None
    return None


def _param_only(rec: Recording, v: Any) -> bool:
    return isinstance(v, Ref) and rec.node(v).param and not rec.node(v).data


def _unbias(rec: Recording, ref: Any) -> Any:
    """``y + b`` with b a parameter (a linear's bias added after the product) → y (stripped)."""
    for _ in range(4):
        ref = strip(rec, ref)
        if not isinstance(ref, Ref):
            return ref
        n = rec.node(ref)
        if n.kind is not NodeKind.OP or n.op not in ("add", "add_"):
            return ref
        data_in = [r for r in n.inputs if rec.node(r).data]
        if len(data_in) != 1 or not all(_param_only(rec, r) for r in n.inputs if r is not data_in[0]):
            return ref
        ref = data_in[0]
    return ref


def _weighted_input(rec: Recording, ref: Any) -> Hashable | None:
    """For the output of a weighted map (linear/conv with a parameter weight): its input's key."""
    ref = _unbias(rec, ref)
    if not isinstance(ref, Ref):
        return None
    n = rec.node(ref)
    if n.kind is not NodeKind.OP:
        return None
    if n.op in CONVOLUTIONS and isinstance(n.arg(1), Ref) and rec.node(n.arg(1)).param \
            and not rec.node(n.arg(1)).data:
        return _key(rec, n.arg(0))
    ops = operands(n)
    if ops is None:
        return None
    a, b = ops
    for w, x in ((a, b), (b, a)):
        if isinstance(w, Ref) and rec.node(w).param and not rec.node(w).data \
                and isinstance(x, Ref) and rec.node(x).data:
            return _key(rec, x)
    return None


def _centred(rec: Recording, ref: Any) -> bool:
    ref = strip(rec, ref)
    if not isinstance(ref, Ref):
        return False
    n = rec.node(ref)
    return n.kind is NodeKind.OP and n.op in ("sub", "subtract") or _uncentre(rec, ref) != ref


def find_covariances(rec: Recording) -> list[Covariance]:
    """Every covariance-like product of the recording, in execution order."""
    found: list[Covariance] = []
    for n in rec.nodes:
        if n.kind is not NodeKind.OP or not n.data:
            continue
        ops = operands(n)
        if ops is None:
            continue
        cov = _classify(rec, n, *ops)
        if cov is not None:
            found.append(cov)
    return found


def _symmetric(n: Node) -> bool | None:
    """Whether the recorded product is symmetric (max|P − Pᵀ| ≤ 1e-4·max|P|, in float64);
    None when its value was not kept."""
    if n.symmetric is None and n.value is not None:
        with torch.no_grad():
            d = n.value.detach().double()
            scale = d.abs().amax().clamp_min(1e-300)
            n.symmetric = bool(((d - d.mT).abs().amax() <= 1e-4 * scale).item())
    return n.symmetric


def _square(rec: Recording, n: Node) -> bool:
    """The product's matrices are square (also when a batched matmul was folded into one
    ``mm`` whose only use views it back as a batch of square matrices)."""
    shapes = [n.shape]
    if len(n.users) == 1 and rec.nodes[n.users[0]].op in VIEWS:
        shapes.append(rec.nodes[n.users[0]].shape)
    return any(s is not None and len(s) >= 2 and s[-1] == s[-2] and s[-1] > 1 for s in shapes)


def _classify(rec: Recording, n: Node, a: Any, b: Any) -> Covariance | None:
    if not isinstance(a, Ref) or not isinstance(b, Ref) or not _square(rec, n):
        return None
    na, nb = rec.node(a), rec.node(b)
    # ---- congruence Wᵀ S W: this product has W on one side, the other side is a product of W
    pw = param_operand(rec, b) if na.data and not nb.data else \
        param_operand(rec, a) if nb.data and not na.data else None
    if pw is not None:
        inner = a if na.data else b
        inner_n = rec.node(strip(rec, inner, scales=False))
        inner_ops = operands(inner_n) if inner_n.kind is NodeKind.OP else None
        if inner_ops is not None:
            ia, ib = inner_ops
            w_in, s_in = (ia, ib) if param_operand(rec, ia) == pw else (ib, ia) \
                if param_operand(rec, ib) == pw else (None, None)
            if w_in is not None and isinstance(s_in, Ref) and rec.node(s_in).data:
                return Covariance(n.index, CovForm.CONGRUENCE, (s_in,), param=pw, expression="Wᵀ S W")
        return None
    if not (na.data and nb.data) or a == b:  # a == b: a power A·A, not a Gram
        return None
    sa, sb = strip(rec, a), strip(rec, b)
    ka, kb = _key(rec, sa), _key(rec, sb)
    ua, ub = _uncentre(rec, sa), _uncentre(rec, sb)
    gram = ka == kb or _key(rec, ua) == kb or ka == _key(rec, ub)
    if gram and _symmetric(n) is not False:
        centred_matrix = ua != sa or ub != sb
        src = ub if ka == _key(rec, ub) and ub != sb else ua if ua != sa else sa
        return Covariance(n.index, CovForm.GRAM, (src,), centered=centred_matrix or _centred(rec, src),
                          expression="X J Xᵀ" if centred_matrix else "X Xᵀ")
    if gram:
        return None
    base_a, base_b = _slice_base(rec, sa), _slice_base(rec, sb)
    if base_a is not None and base_a == base_b:
        return Covariance(n.index, CovForm.CROSS, (sa, sb), expression="q kᵀ (two slices)")
    wa, wb = _weighted_input(rec, sa), _weighted_input(rec, sb)
    if wa is not None and wa == wb:
        return Covariance(n.index, CovForm.CROSS, (sa, sb), expression="q kᵀ (two projections)")
    return None
