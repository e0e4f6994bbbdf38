"""The recorded engine: the analysis grounded in one concrete forward (with example inputs).

:func:`~orthofx.graph.recorded.record.record` runs the model once under a
``TorchDispatchMode`` and logs every ATen op; :mod:`~orthofx.graph.recorded.covariances` finds
the covariance-like products, :mod:`~orthofx.graph.recorded.regions` the matrix function
computed from each, :mod:`~orthofx.graph.recorded.producers` the Pre-SVD layers behind it, and
:func:`~orthofx.graph.recorded.discover.discover` assembles the report
(:mod:`~orthofx.graph.recorded.ops`: the op tables; :mod:`~orthofx.graph.recorded.gradflow`:
whether a meta-layer's backward runs). Imports only the shared level of :mod:`orthofx.graph`,
never the symbolic engine.
"""
