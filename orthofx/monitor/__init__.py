"""Conditioning monitor: κ of every meta-layer's covariance over training (κ(Σ + εI), κ of Σ on
its numerical range, the paper's convention), the Pre-SVD weights' ‖W‖_F and σ_max/σ_min,
failure counts; records as CSV/JSONL, metrics to sinks (TensorBoard, CSV/JSONL, ``logging``,
any callable), plots.

Modules: :mod:`~orthofx.monitor.core` (:class:`ConditioningMonitor`: hooks, schedule,
state), :mod:`~orthofx.monitor.spectrum` (κ conventions), :mod:`~orthofx.monitor.capture` (the
covariance of a meta-layer that is not an orthofx module, captured where it is formed),
:mod:`~orthofx.monitor.weights` (producer weights), :mod:`~orthofx.monitor.pending` (what a
recorded step keeps on the device; the flush), :mod:`~orthofx.monitor.summary` (κ statistics
per meta-layer), :mod:`~orthofx.monitor.records` (schema, CSV/JSONL),
:mod:`~orthofx.monitor.sinks` (logger protocol), :mod:`~orthofx.monitor.plotting`
(:func:`plot`). docs/kappa.md states the κ conventions and how the paper's was inferred.
"""

from orthofx.monitor.core import ConditioningMonitor, MonitorWarning
from orthofx.monitor.plotting import line_styles, plot
from orthofx.monitor.records import FIELDS, load_records
from orthofx.monitor.sinks import (
    CallableSink,
    CSVSink,
    JSONLSink,
    LoggingSink,
    MetricSink,
    TensorBoardSink,
    record_metrics,
)
from orthofx.monitor.spectrum import SPECTRUM_FIELDS, summarize_spectrum
from orthofx.monitor.weights import WEIGHT_FIELDS, weight_summary

__all__ = [
    "ConditioningMonitor",
    "MonitorWarning",
    "plot",
    "line_styles",
    "load_records",
    "FIELDS",
    "MetricSink",
    "TensorBoardSink",
    "CSVSink",
    "JSONLSink",
    "LoggingSink",
    "CallableSink",
    "record_metrics",
    "SPECTRUM_FIELDS",
    "summarize_spectrum",
    "WEIGHT_FIELDS",
    "weight_summary",
]
