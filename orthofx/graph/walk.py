"""Compatibility module: the symbolic-fx walk, now split by idea.

* :mod:`orthofx.graph.fx_nodes` - :class:`NodeGraph`, :func:`describe_target`, one-node helpers
* :mod:`orthofx.graph.fx_covariance` - covariance recognition, :func:`covariance_info`
* :mod:`orthofx.graph.fx_walk` - :class:`Walker`, :class:`Step`, :class:`WalkOutcome`
* :mod:`orthofx.graph.fx_usage` - :func:`detect_usage`

The names below are re-exported so that ``from orthofx.graph.walk import ...`` keeps working.
"""

from __future__ import annotations

from orthofx.graph.fx_covariance import covariance_info
from orthofx.graph.fx_covariance import einsum_is_gram as _einsum_is_gram
from orthofx.graph.fx_covariance import eps_value as _eps_value
from orthofx.graph.fx_nodes import NodeGraph, describe_target
from orthofx.graph.fx_nodes import is_batch_index as _is_batch_index
from orthofx.graph.fx_nodes import swaps_last_two as _swaps_last_two
from orthofx.graph.fx_usage import detect_usage
from orthofx.graph.fx_walk import INPUT, Step, Walker, WalkOutcome

__all__: list[str] = []  # internal module: import what you need by name
