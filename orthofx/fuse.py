"""Fuse a raw ``eigh`` + reconstruction ``U f(Λ) Uᵀ`` into orthofx's exact meta-layer.

A user's ``lam, U = torch.linalg.eigh(C); Y = U @ diag(f(lam)) @ U.mT`` with f = √· or 1/√·
(``usage`` "sqrtm"/"invsqrtm" of the symbolic analysis) is replaced, in a traced GraphModule, by
``Y = orthofx.linalg.sqrtm(C)`` / ``invsqrtm(C)``: the same forward (float64 eigh, eigenvalue
floor n·eps·λ_max) with the exact Daleckii–Krein backward, which is exact and finite also for
repeated eigenvalues (where any backward through the eigenvectors alone is not).

Which node holds the finished reconstruction is decided by what runs: the graph is run once on
the example inputs (on a copy, in training mode), and the first descendant of the ``eigh``
whose value equals ``C^{±1/2}`` (float64 reference, relative 1e-4 of its largest entry) is
the one replaced (:func:`fuse_at`, which needs only the two node names: replaying a saved plan
on a fresh symbolic trace uses it without running anything). Nodes that then feed nothing are
removed. The caller verifies the result against the original model (:mod:`orthofx.verify`).

:func:`emit_plain` is the way back (:func:`orthofx.strip`): plain torch ops computing the
same forward, so a stripped model does not depend on orthofx.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from orthofx.errors import ConfigError, InputError

from orthofx.graph.state import quiet_user_hooks
from orthofx.linalg import invsqrtm, sqrtm
from orthofx.nn.meta import MetaLayer
from orthofx.rewrite import STABLE_PREFIX, user_label
from orthofx.vocab import MetaSpec

__all__ = ["ExactSpectral", "FusedRecord", "FUSED_ORIGINAL", "fuse_reconstructions", "fuse_at", "emit_plain"]

_RTOL = 1e-4

#: ``SwapRecord.original`` of a fused eigh + reconstruction
FUSED_ORIGINAL = "torch.linalg.eigh + U f(Λ) Uᵀ"


@dataclass(frozen=True)
class FusedRecord:
    """An eigh + reconstruction replaced by an exact meta-layer."""

    node: str      # the eigh node
    output: str    # the node whose value was U f(Λ) Uᵀ
    usage: str     # "sqrtm" | "invsqrtm"
    module: str    # the ExactSpectral submodule that replaces them


class ExactSpectral(MetaLayer):
    """``(A)^{1/2}`` or ``(A)^{-1/2}`` with the exact Daleckii–Krein backward
    (:func:`orthofx.linalg.sqrtm` / :func:`~orthofx.linalg.invsqrtm`, float64 eigh, eigenvalue
    floor n·eps·λ_max), standing in for a user's eigh + reconstruction; errors name it.

    A meta-layer (``orthofx_meta`` = MetaSpec(usage, "covariance")): with ``orthofx_record``
    it keeps the eigenvalues of A for the monitor; ``orthofx_label`` is the user's module path
    of the replaced call (the monitor's label)."""

    orthofx_meta = MetaSpec("sqrtm", "covariance")

    def __init__(self, usage: str, name: str, label: str | None = None) -> None:
        super().__init__()
        self.usage = usage
        self.name = name
        self.orthofx_meta = MetaSpec(usage, "covariance")
        self.orthofx_label: str = label or name

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        fn = sqrtm if self.usage == "sqrtm" else invsqrtm
        # no input checks (they read values) while a tracer sees the call; not fx's is_fx_tracing(),
        # which logs a warning on every call, i.e. on every training step
        tracing = (isinstance(a, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.compiler.is_exporting()
                   or torch.jit.is_tracing())
        try:
            if getattr(self, "orthofx_record", False):
                y, lam = fn(a, validate=not tracing, return_eigenvalues=True)
                self._remember(lam)
                return y
            return fn(a, validate=not tracing)
        except InputError as exc:
            raise InputError(f"meta-layer {self.name} (torch.linalg.eigh + U f(Λ) Uᵀ, fused by orthofx): "
                             f"{exc}") from None

    def extra_repr(self) -> str:
        return f"usage={self.usage!r}, name={self.name!r}"


def _values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """Every node's value from one training-mode run of a copy of ``gm``."""
    values: dict[str, Any] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    twin = copy.deepcopy(gm).train()
    rng = torch.get_rng_state()
    try:
        with torch.no_grad(), quiet_user_hooks(twin):
            _Rec(twin).run(*inputs)
    finally:
        torch.set_rng_state(rng)
    return values


def _reference(c: torch.Tensor, usage: str) -> torch.Tensor:
    d = c.detach().double()
    lam, u = torch.linalg.eigh((d + d.mT) / 2)
    lam = lam.clamp_min(float(lam.abs().amax()) * d.shape[-1] * torch.finfo(torch.float64).eps)
    f = lam.sqrt() if usage == "sqrtm" else lam.rsqrt()
    return u @ torch.diag_embed(f) @ u.mT


def _close(v: Any, ref: torch.Tensor) -> bool:
    if not isinstance(v, torch.Tensor) or v.shape != ref.shape or not v.is_floating_point():
        return False
    diff = (v.detach().double() - ref).abs().amax()
    return bool(diff <= _RTOL * ref.abs().amax())


def fuse_reconstructions(gm: fx.GraphModule, entries: Sequence[Any], example_inputs: Sequence[Any]
                         ) -> list[FusedRecord]:
    """Fuse each raw eigh entry (``source == "torch"``, ``kind == "eigh"``, usage sqrtm or
    invsqrtm) of ``entries`` (symbolic-analysis entries naming nodes of ``gm``) whose
    reconstruction is found by running ``gm`` on ``example_inputs`` (module doc); the surgery is
    :func:`fuse_at`. Returns what was fused; ``gm`` is recompiled when anything was."""
    targets = [e for e in entries if e.source == "torch" and e.kind == "eigh"
               and e.usage in ("sqrtm", "invsqrtm")]
    if not targets:
        return []
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    try:
        values = _values(gm, example_inputs)
    except Exception:  # noqa: BLE001 - cannot run: nothing is fused (the swap still applies)
        return []
    done: list[FusedRecord] = []
    for e in {e.node: e for e in targets}.values():
        eig = nodes.get(e.node)
        if eig is None or not eig.args or not isinstance(eig.args[0], fx.Node):
            continue
        cov = eig.args[0]
        c = values.get(cov.name)
        if not isinstance(c, torch.Tensor) or c.dim() < 2:
            continue
        ref = _reference(c, e.usage)
        below = _descendants(eig)
        ordered = sorted(below, key=lambda n: order.get(n, len(order)))  # nodes of earlier fusions last
        hit = next((n for n in ordered if _close(values.get(n.name), ref)), None)
        if hit is None:
            continue
        done.append(fuse_at(gm, e.node, hit.name, e.usage, scope=e.scope or ""))
    return done


def fuse_at(gm: fx.GraphModule, eigh_node: str, output_node: str, usage: str, *, scope: str = "") -> FusedRecord:
    """Fuse without running anything: the node ``output_node`` (a descendant of the ``eigh``
    node ``eigh_node``) is replaced by ``ExactSpectral(usage)(C)``, C the eigh's input, as
    :func:`fuse_reconstructions` did where it found ``output_node`` holding ``C^{±1/2}``
    (:func:`orthofx.pipeline.replay` uses the recorded names on a fresh symbolic trace, whose
    node names are deterministic). ``scope``: the user's module path of the eigh call (the
    module's name and label). ``gm`` is recompiled.

    Raises :class:`ConfigError` when a node is missing, the eigh node has no tensor input,
    ``output_node`` is not computed from it, or ``usage`` is not "sqrtm"/"invsqrtm".
    """
    if usage not in ("sqrtm", "invsqrtm"):
        raise ConfigError(f"fuse_at: usage must be 'sqrtm' or 'invsqrtm', got {usage!r}")
    nodes = {n.name: n for n in gm.graph.nodes}
    eig, hit = nodes.get(eigh_node), nodes.get(output_node)
    if eig is None or eig.op not in ("call_function", "call_method") or not eig.args \
            or not isinstance(eig.args[0], fx.Node):
        raise ConfigError(f"the graph has no eigh call named {eigh_node!r}")
    below = _descendants(eig)
    if hit is None or hit is eig or hit not in below:
        raise ConfigError(f"the graph has no node {output_node!r} computed from the eigh {eigh_node!r}")
    module = f"{STABLE_PREFIX}{eigh_node}"
    label = user_label(eig, SimpleNamespace(scope=scope))
    gm.add_submodule(module, ExactSpectral(usage, f"{eigh_node} in {scope or '<root>'}", label=label))
    with gm.graph.inserting_before(hit):
        new = gm.graph.call_module(module, (eig.args[0],))
    new.meta.update(hit.meta)
    hit.replace_all_uses_with(new)
    _remove_dead(gm.graph, below)
    gm.graph.lint()
    gm.recompile()
    return FusedRecord(eigh_node, output_node, usage, module)


def emit_plain(graph: fx.Graph, a: fx.Node, usage: str) -> fx.Node:
    """Append to ``graph`` plain torch ops (call_function on torch/operator callables and
    call_method, nothing of orthofx) computing :class:`ExactSpectral`'s forward on ``a``, in the
    same order of operations (so the values are bitwise the same on the same device):

        S = ((A + Aᵀ)·0.5).to(float64);  Λ, U = torch.linalg.eigh(S)
        floor = max(max(λ_max, 0)·(n·eps64), tiny64);  s = √max(Λ, floor);  g = s or 1/s
        Y = (U·gᵀ) @ Uᵀ;  Y = ((Y + Yᵀ)·0.5).type_as(A)

    (:func:`orthofx.linalg.sqrtm`/``invsqrtm`` with backend "eigh", ε = 0,
    :func:`orthofx.linalg.spectral.spectral_floor`). What it does not do: the NaN/Inf check
    (InputError), the eigh failure recovery chain, the eigenvalue record for the monitor, the
    Daleckii–Krein backward (autograd differentiates through ``eigh`` instead). Returns the
    node of Y; insert with ``graph.inserting_before``."""
    if usage not in ("sqrtm", "invsqrtm"):
        raise ConfigError(f"emit_plain: usage must be 'sqrtm' or 'invsqrtm', got {usage!r}")
    f64 = torch.finfo(torch.float64)
    g = graph

    def sym(x: fx.Node) -> fx.Node:
        both = g.call_function(operator.add, (x, g.call_method("transpose", (x, -2, -1))))
        return g.call_function(operator.mul, (both, 0.5))

    s64 = g.call_method("to", (sym(a), torch.float64))
    dec = g.call_function(torch.linalg.eigh, (s64,))
    lam = g.call_function(operator.getitem, (dec, 0))
    vec = g.call_function(operator.getitem, (dec, 1))
    top = g.call_method("clamp_min", (g.call_function(torch.amax, (lam, -1, True)), 0.0))
    scale = g.call_function(operator.mul, (g.call_method("size", (lam, -1)), f64.eps))
    floor = g.call_method("clamp_min", (g.call_function(operator.mul, (top, scale)), f64.tiny))
    root = g.call_method("sqrt", (g.call_function(torch.maximum, (lam, floor)),))
    if usage == "invsqrtm":
        root = g.call_function(operator.truediv, (1.0, root))
    scaled = g.call_function(operator.mul, (vec, g.call_method("unsqueeze", (root, -2))))
    y = g.call_function(operator.matmul, (scaled, g.call_method("transpose", (vec, -2, -1))))
    return g.call_method("type_as", (sym(y), a))


def _descendants(node: fx.Node) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n in out or n.op == "output":
            continue
        out.add(n)
        stack.extend(n.users)
    return out | {node}


def _remove_dead(graph: fx.Graph, candidates: set[fx.Node]) -> None:
    """Erase the candidates that no longer feed anything (the eigh and its old reconstruction)."""
    changed = True
    while changed:
        changed = False
        for n in list(candidates):
            if n.graph is graph and not n.users and n.op not in ("output", "placeholder"):
                graph.erase_node(n)
                candidates.discard(n)
                changed = True
