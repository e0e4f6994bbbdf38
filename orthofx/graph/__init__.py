"""orthofx.graph: pure analysis of a model's fx graph (the model is never modified).

* :func:`analyze` / :func:`analyze_graph` - find every SVD/eig meta-layer and its Pre-SVD layer
* :func:`trace` - the tracer the analysis (and the rewrite) use: leaf rules, scopes,
  autograd.Function leaves, friendly :class:`~orthofx.errors.TraceFailure` errors
* :class:`AnalysisConfig`, :class:`MetaSpec` - options and user-registered meta-layers
"""

from __future__ import annotations

from orthofx.graph.analyze import analyze, analyze_graph, find_meta_layers
from orthofx.graph.config import AnalysisConfig, resolve_analysis_config
from orthofx.graph.trace import TraceInfo, function_leaf, function_of, trace, trace_info
from orthofx.vocab import MetaSpec
from orthofx.report import (
    AnalysisReport,
    ChainStep,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
)

__all__ = ["analyze", "analyze_graph", "trace", "function_leaf", "AnalysisConfig", "MetaSpec", "AnalysisReport", "MetaLayerEntry", "SkippedEntry"]
