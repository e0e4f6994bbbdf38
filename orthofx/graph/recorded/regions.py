"""Matrix-function recognition: does a covariance reach a matrix function? (pure)

The **region** of a covariance C is what is computed from C alone: the ops after C whose
data-dependent inputs all lie in the region (constants, buffers and Python scalars may join).
It never crosses

* a matrix product or convolution with a parameter operand (the next layer; a column
  vector computed from parameters alone, the learned start vector of a power iteration
  ``Σ·self.v.expand(b, d, 1)``, is not a layer and joins the region), nor
* a matrix product or convolution that also takes other features (``W·X``: the *use* of the
  matrix function), nor an elementwise op with other features;
  elementwise ops with a parameter (a learned scalar, shrinkage or mixing weight) or with
  another matrix of the same size (a mixture of covariances) stay in the region, nor
* a softmax (attention scores ``q kᵀ`` are not meta-layers).

C is a meta-layer when its region holds a matrix function:

* a decomposition or solver (eigh, svd, eig, cholesky, inverse, solve, logdet, expm);
* a Padé approximant (a solve/inverse plus products of region tensors);
* a power iteration (a vector norm and matrix-vector products of region tensors);
* a Newton–Schulz iteration (at least two products of two region tensors); square root or
  inverse square root is told from the recorded values (T² ∝ C, or T C T ∝ I).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from orthofx.graph.recorded.covariances import operands
from orthofx.graph.recorded.ops import CONVOLUTIONS, DECOMPOSITIONS, NodeKind, NORMS, PRODUCTS, REGION_STOPS
from orthofx.vocab import MatFn
from orthofx.graph.recorded.record import Node, Recording, Ref

__all__: list[str] = []  # internal module: import what you need by name


@dataclass
class Region:
    """What a covariance feeds.

    Attributes:
        cov: index of the covariance node.
        nodes: indices of the region's nodes (the covariance included), in order.
        kind: the matrix function found, or None (not a meta-layer).
        site: the node that marks the matrix function (the decomposition, or the last
            region product of an iteration).
        products: region × region products (iteration steps).
        stops: why the region ended where it did (op name → count), informative.
    """

    cov: int
    nodes: list[int]
    kind: MatFn | None
    site: int | None
    products: int = 0
    stops: dict[str, int] = field(default_factory=dict)


def region_of(rec: Recording, cov: int, *, limit: int = 20000) -> Region:
    """The :class:`Region` of covariance node ``cov``."""
    inside = {cov}
    order = [cov]
    stops: dict[str, int] = {}
    frontier = list(rec.nodes[cov].users)
    heapq.heapify(frontier)
    queued = set(frontier)
    while frontier and len(order) < limit:
        n = rec.nodes[heapq.heappop(frontier)]  # execution order: inputs before users
        data_in = [r for r in n.inputs if rec.node(r).data or rec.node(r).param]
        if n.op in REGION_STOPS:
            stops[n.op] = stops.get(n.op, 0) + 1
            continue
        outside = [r for r in data_in if r.node not in inside]
        if outside and n.op not in PRODUCTS and n.op not in CONVOLUTIONS:
            # elementwise on the matrix itself: a learned scalar / shrinkage / mixing weight
            # (``w·Σ``, ``Σ + softplus(p)·I``) and another matrix of the same size (a mixture of
            # covariances, as in switchable whitening) join the region like constants
            outside = [r for r in outside if rec.node(r).data and not _same_matrix(rec, r, n)]
        elif outside and n.op in PRODUCTS and len(outside) < len(data_in):
            # ``Σ v₀`` with v₀ a learned start vector (``self.v.expand(b, d, 1)``) of a power
            # iteration: a parameter column, not the next layer's weight matrix
            outside = [r for r in outside if not _start_vector(rec, r)]
        if outside:
            why = "parameter" if any(rec.node(r).param and not rec.node(r).data for r in outside) else "use"
            stops[why] = stops.get(why, 0) + 1
            continue
        inside.add(n.index)
        order.append(n.index)
        for u in n.users:
            if u not in queued:
                queued.add(u)
                heapq.heappush(frontier, u)
    kind, site, products = _matrix_function(rec, order, inside)
    return Region(cov, order, kind, site, products, stops)


def _start_vector(rec: Recording, r: Ref) -> bool:
    """Operand ``r`` is computed from parameters alone and is a column (or a batch of columns,
    shape (…, d, 1)) or a 1-D vector: the start vector of a power iteration."""
    node = rec.node(r)
    shape = node.shapes[r.out] if r.out < len(node.shapes) else None
    return (node.param and not node.data and shape is not None and len(shape) >= 1
            and (len(shape) == 1 or shape[-1] == 1) and shape[-1 if len(shape) == 1 else -2] > 1)


def _same_matrix(rec: Recording, r: Ref, n: Node) -> bool:
    """Operand ``r`` of ``n`` is a square matrix (batch) of the size of ``n``'s output."""
    node = rec.node(r)
    shape = node.shapes[r.out] if r.out < len(node.shapes) else None
    out = n.shape
    return (shape is not None and out is not None and len(shape) >= 2 and len(out) >= 2
            and shape[-1] == shape[-2] == out[-1] == out[-2])


def _matrix_function(rec: Recording, order: list[int], inside: set[int]
                     ) -> tuple[MatFn | None, int | None, int]:
    decomps: list[tuple[int, MatFn]] = []
    products: list[int] = []
    vector_products = 0
    has_norm = False
    for i in order[1:]:
        n = rec.nodes[i]
        kind = DECOMPOSITIONS.get(n.op)
        if kind is not None:
            decomps.append((i, kind))
            continue
        if n.op in NORMS:
            has_norm = True
        ops = operands(n)
        if ops is None:
            continue
        a, b = ops
        if all(isinstance(v, Ref) and v.node in inside for v in (a, b)):
            products.append(i)
            shapes = [rec.node(v).shapes[v.out] if v.out < len(rec.node(v).shapes) else () for v in (a, b)]
            if any(len(s) < 2 or s[-1] == 1 for s in shapes):
                vector_products += 1
    spectral = [d for d in decomps if d[1] in (MatFn.EIGH, MatFn.SVD, MatFn.EIG)]
    if spectral:
        return spectral[0][1], spectral[0][0], len(products)
    solvers = [d for d in decomps if d[1] in (MatFn.INVERSE, MatFn.SOLVE)]
    if solvers and len(products) >= 2:
        return MatFn.PADE, solvers[0][0], len(products)
    if decomps:
        return decomps[0][1], decomps[0][0], len(products)
    if has_norm and vector_products >= 1:
        return MatFn.POWER_ITERATION, products[0], len(products)
    if len(products) >= 2:
        used = [i for i in products if rec.nodes[i].users] or products  # the last round's unused iterate is dead
        return _newton_schulz_kind(rec, order[0], used), used[-1], len(products)
    return None, None, len(products)


def _newton_schulz_kind(rec: Recording, cov: int, products: list[int]) -> MatFn:
    """Square root (T² ∝ C) or inverse square root (T C T ∝ I), from the recorded values."""
    c = rec.nodes[cov].value
    t = None
    for i in reversed(products):
        v = rec.nodes[i].value
        if v is not None and c is not None and v.shape == c.shape:
            t = v
            break
    if t is None or c is None:
        return MatFn.NEWTON_SCHULZ
    with torch.no_grad():
        c64, t64 = c.detach().double(), t.detach().double()
        sq = t64 @ t64
        eye = torch.eye(c64.shape[-1], dtype=torch.float64, device=c64.device)
        sandwich = t64 @ c64 @ t64
        r_sqrt = _ratio_residual(sq, c64)
        r_inv = _ratio_residual(sandwich, eye.expand_as(sandwich))
    best = min(r_sqrt, r_inv)
    if not best < 0.5:
        return MatFn.NEWTON_SCHULZ
    return MatFn.NS_SQRT if r_sqrt <= r_inv else MatFn.NS_INVSQRT


def _ratio_residual(x: torch.Tensor, y: torch.Tensor) -> float:
    """min over α of ‖x − α y‖/‖x‖ (per matrix α, worst over the batch)."""
    xf, yf = x.flatten(-2), y.flatten(-2)
    alpha = (xf * yf).sum(-1, keepdim=True) / (yf * yf).sum(-1, keepdim=True).clamp_min(1e-300)
    res = (xf - alpha * yf).norm(dim=-1) / xf.norm(dim=-1).clamp_min(1e-300)
    return float(res.max()) if res.numel() else float("inf")
