"""Where the meta-layers are in a traced graph: :func:`find_meta_layers` (pure).

A meta-layer call is a ``call_function`` of a decomposition (torch, orthofx.linalg or one the
config registers), a ``call_method`` (``x.svd()``), a ``call_module`` of a meta-layer module,
or an autograd.Function whose forward holds one (its forward is traced on its own and searched,
up to three levels deep). Each becomes a :class:`MetaSite`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from orthofx.errors import TraceFailure
from orthofx.graph.symbolic.nodes import NodeGraph, describe_target
from orthofx.graph.symbolic.patterns import Patterns
from orthofx.graph.symbolic.trace import function_of, trace_function_forward
from orthofx.vocab import MetaSpec, is_meta_layer

__all__: list[str] = []  # internal module: import what you need by name


@dataclass
class MetaSite:
    """A meta-layer call found in a graph.

    Attributes:
        node: its node.
        spec: kind and input.
        source: ``"torch"``, ``"orthofx"``, ``"config"`` or ``"autograd.Function"``.
        target: readable target.
        module: the leaf module for ``call_module`` sites.
        inner: for a Function whose forward holds the meta-layer: (forward's NodeGraph,
            the inner site, placeholder → outer argument keys).
    """

    node: fx.Node
    spec: MetaSpec
    source: str
    target: str
    module: nn.Module | None = None
    inner: tuple[NodeGraph, "MetaSite", list[Any]] | None = None


# --------------------------------------------------------------------------- finding
def find_meta_layers(ng: NodeGraph, patterns: Patterns, notes: list[str] | None = None,
                     _depth: int = 0) -> list[MetaSite]:
    """Every meta-layer call in ``ng``, in graph order."""
    cfg = patterns.config
    linalg = set(patterns.linalg.values())
    sites: list[MetaSite] = []
    for n in ng.nodes:
        if n.op == "call_function":
            cls = function_of(n.target)
            if cls is not None:
                sites += _function_sites(ng, n, cls, patterns, notes, _depth)
                continue
            spec = patterns.meta_for_function(n.target)
            if spec is not None:
                src = ("config" if n.target in cfg.meta_functions
                       else "orthofx" if n.target in linalg else "torch")
                sites.append(MetaSite(n, spec, src, describe_target(n, ng)))
        elif n.op == "call_method":
            spec = patterns.meta_methods.get(str(n.target))
            if spec is not None:
                sites.append(MetaSite(n, spec, "torch", f"Tensor.{n.target}"))
        elif n.op == "call_module":
            mod = ng.module(str(n.target))
            spec = patterns.meta_for_module(mod, str(n.target))
            if spec is not None:
                src = "orthofx" if is_meta_layer(mod) else "config"
                sites.append(MetaSite(n, spec, src, type(mod).__name__, module=mod))
    return sites


def _function_sites(ng: NodeGraph, n: fx.Node, cls: type, patterns: Patterns,
                    notes: list[str] | None, depth: int) -> list[MetaSite]:
    cfg = patterns.config
    name = cls.__qualname__
    for key, spec in cfg.meta_autograd_functions.items():
        if issubclass(cls, key):
            return [MetaSite(n, spec, "config", f"{name}.apply")]
    if not cfg.trace_autograd_functions or depth > 2:
        return []
    try:
        inner_gm, keys = trace_function_forward(cls, n, patterns)
    except TraceFailure as exc:
        if notes is not None:
            notes.append(f"autograd.Function {name}: {exc}")
        return []
    inner = NodeGraph(inner_gm, name=f"{name}.forward")
    inner_sites = find_meta_layers(inner, patterns, notes, depth + 1)
    return [MetaSite(n, s.spec, "autograd.Function", f"{name}.apply", inner=(inner, s, keys))
            for s in inner_sites]
