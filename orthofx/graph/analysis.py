"""``analyze``: find every meta-layer and its Pre-SVD layer, without touching the model.

The entry of :mod:`orthofx.graph`; it picks the engine:

* with example inputs, the **recorded** engine (:mod:`orthofx.graph.recorded`): one concrete
  forward recorded at the ATen op level (:func:`~orthofx.graph.recorded.discover.discover`);
* without them, or when the forward cannot be recorded, the **symbolic** engine
  (:mod:`orthofx.graph.symbolic`): a ``torch.fx`` trace
  (:func:`~orthofx.graph.symbolic.entries.analyze_graph`), or the submodules one by one when
  the root cannot be traced (:mod:`~orthofx.graph.symbolic.partial`).

Either way the report gets the orthofx.nn replacement notes
(:mod:`~orthofx.graph.replacement`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from orthofx.errors import InputError, TraceFailure
from orthofx.graph.config import AnalysisConfig, resolve_analysis_config
from orthofx.graph.recorded.discover import discover
from orthofx.graph.recorded.record import RecordingFailure
from orthofx.graph.replacement import add_replacement_notes
from orthofx.graph.result import AnalysisReport
from orthofx.graph.state import TRACE_LOCK
from orthofx.graph.symbolic.entries import analyze_graph
from orthofx.graph.symbolic.partial import analyze_submodules
from orthofx.graph.symbolic.trace import trace

__all__ = ["analyze"]


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any = None,
    config: Any = None,
) -> AnalysisReport:
    """Find every meta-layer of ``model`` and its Pre-SVD layer. The model is not modified.

    Args:
        model: any ``nn.Module`` (unmodified architecture).
        example_inputs: example inputs (a tensor or a tuple). With them, the analysis is
            grounded in one concrete forward recorded at the op level
            (:func:`orthofx.graph.recorded.discover.discover`): it sees inside autograd.Functions,
            through loops, branches and ``.item()``, in training mode; the model is restored
            exactly. Without them, the model is traced symbolically with ``torch.fx``.
        config: an :class:`~orthofx.graph.config.AnalysisConfig`, ``None``, or an object with
            an ``.analysis`` attribute (e.g. ``OrthoConfig``).

    Returns:
        An :class:`~orthofx.graph.result.AnalysisReport`: ``entries``, ``producers``, ``skipped``;
        ``report.graph_module`` is the traced GraphModule the node names refer to.

    Raises:
        TraceFailure: the model cannot be traced and the failure cannot be worked around
            (always with ``strict=True``); ``.module`` / ``.hint`` say what to change.
        InputError: an example input holds NaN or Inf (the recorded forward would not show
            what the model does); it is named.

    Thread-safe: concurrent calls (and :func:`orthofx.transform`) trace one at a time.
    """
    check_example_inputs(example_inputs)
    with TRACE_LOCK:
        return _analyze(model, example_inputs, resolve_analysis_config(config))


def check_example_inputs(example_inputs: Any) -> None:
    """:class:`InputError` naming the first floating tensor among ``example_inputs`` (nested in
    tuples, lists and dicts) that holds NaN or Inf. Called once per transform/analysis: one
    host read per tensor (a device sync for CUDA inputs), never in a training step."""
    if example_inputs is None:
        return
    top = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    stack: list[tuple[str, Any]] = [(f"example_inputs[{i}]", v) for i, v in enumerate(top)][::-1]
    while stack:
        name, v = stack.pop()
        if isinstance(v, torch.Tensor):
            if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
                raise InputError(
                    f"{name} holds NaN or Inf: the analysis records one forward on the example inputs and "
                    f"would not see what the model does; pass finite example inputs (e.g. a batch of your data)")
        elif isinstance(v, (tuple, list)):
            stack += [(f"{name}[{i}]", x) for i, x in enumerate(v)][::-1]
        elif isinstance(v, dict):
            stack += [(f"{name}[{k!r}]", x) for k, x in v.items()][::-1]


def _analyze(model: nn.Module, example_inputs: Any, cfg: AnalysisConfig) -> AnalysisReport:
    report = _analyze_model(model, example_inputs, cfg)
    add_replacement_notes(report, model)
    return report


def _analyze_model(model: nn.Module, example_inputs: Any, cfg: AnalysisConfig) -> AnalysisReport:
    note = None
    if example_inputs is not None:
        try:
            return discover(model, example_inputs, cfg)
        except RecordingFailure as exc:
            note = f"{exc}; analysed by symbolic fx tracing instead"
    try:
        gm = trace(model, cfg)
    except TraceFailure as exc:
        if cfg.strict or not cfg.auto_leaf or exc.module != "":
            raise
        report = analyze_submodules(model, cfg, str(exc))
    else:
        report = analyze_graph(gm, cfg, example_inputs=example_inputs)
    if note:
        report.notes.insert(0, note)
    return report
