"""orthofx.graph: pure analysis of a model (the model is never modified).

* :func:`analyze` / :func:`analyze_graph` - find every SVD/eig meta-layer and its Pre-SVD layer
* :func:`trace` - the tracer the symbolic analysis (and the rewrite) use: leaf rules, scopes,
  autograd.Function leaves, friendly :class:`~orthofx.errors.TraceFailure` errors
* :class:`AnalysisConfig`, :class:`MetaSpec` - options and user-registered meta-layers
* :class:`AnalysisReport`, :class:`MetaLayerEntry`, :class:`SkippedEntry` - what it finds

Layout: :mod:`~orthofx.graph.analysis` (``analyze``) picks one of two engines,
``recorded/`` (one concrete forward recorded at the ATen op level, with example inputs) or
``symbolic/`` (a ``torch.fx`` trace); both build the records of :mod:`~orthofx.graph.result`
from :mod:`~orthofx.graph.config`'s options and run the user's model under
:mod:`~orthofx.graph.state`. Names load lazily (PEP 562): ``import orthofx.graph.config``
imports neither engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime these load lazily
    from orthofx.graph.analysis import analyze  # noqa: F401
    from orthofx.graph.config import AnalysisConfig, resolve_analysis_config  # noqa: F401
    from orthofx.graph.result import (  # noqa: F401
        AnalysisReport,
        ChainStep,
        CovarianceInfo,
        MetaLayerEntry,
        ProducerInfo,
        SkippedEntry,
    )
    from orthofx.graph.symbolic.entries import analyze_graph  # noqa: F401
    from orthofx.graph.symbolic.sites import find_meta_layers  # noqa: F401
    from orthofx.graph.symbolic.trace import (  # noqa: F401
        TraceInfo,
        function_leaf,
        function_of,
        trace,
        trace_info,
    )
    from orthofx.vocab import MetaSpec  # noqa: F401

__all__ = ["analyze", "analyze_graph", "trace", "function_leaf", "AnalysisConfig", "MetaSpec", "AnalysisReport", "MetaLayerEntry", "SkippedEntry"]

# name -> module that defines it (the advertised ones are __all__; the others resolve too)
_LAZY: dict[str, str] = {
    "analyze": "orthofx.graph.analysis",
    "analyze_graph": "orthofx.graph.symbolic.entries",
    "find_meta_layers": "orthofx.graph.symbolic.sites",
    "trace": "orthofx.graph.symbolic.trace",
    "trace_info": "orthofx.graph.symbolic.trace",
    "TraceInfo": "orthofx.graph.symbolic.trace",
    "function_leaf": "orthofx.graph.symbolic.trace",
    "function_of": "orthofx.graph.symbolic.trace",
    "AnalysisConfig": "orthofx.graph.config",
    "resolve_analysis_config": "orthofx.graph.config",
    "MetaSpec": "orthofx.vocab",
    "AnalysisReport": "orthofx.graph.result",
    "MetaLayerEntry": "orthofx.graph.result",
    "SkippedEntry": "orthofx.graph.result",
    "ProducerInfo": "orthofx.graph.result",
    "CovarianceInfo": "orthofx.graph.result",
    "ChainStep": "orthofx.graph.result",
}

#: submodules importable as attributes (``orthofx.graph.result``) without an import statement
_SUBMODULES = ("analysis", "config", "draw", "recorded", "replacement", "result", "state", "symbolic")


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(mod), name)
        globals()[name] = value  # resolved once
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_LAZY) | set(_SUBMODULES))
