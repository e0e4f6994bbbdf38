"""The symbolic engine: the analysis of a ``torch.fx`` trace (without example inputs).

:func:`~orthofx.graph.symbolic.trace.trace` traces the model (leaf rules in
:mod:`~orthofx.graph.symbolic.patterns`); :mod:`~orthofx.graph.symbolic.sites` finds the
meta-layer calls, :mod:`~orthofx.graph.symbolic.walk` walks back from each to its Pre-SVD layer
(one :class:`~orthofx.graph.symbolic.step.Step` per node; node helpers in
:mod:`~orthofx.graph.symbolic.nodes`, covariance recognition in
:mod:`~orthofx.graph.symbolic.covariance`, how the result is used in
:mod:`~orthofx.graph.symbolic.usage`), and :func:`~orthofx.graph.symbolic.entries.analyze_graph`
assembles the report (:mod:`~orthofx.graph.symbolic.partial`: a model traced submodule by
submodule). Imports only the shared level of :mod:`orthofx.graph`, never the recorded engine.
"""
