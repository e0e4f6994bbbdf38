"""The paper's treatments of Pre-SVD layers, acting on given producer modules/parameters.

* :mod:`orthofx.treatments.weight` — OW (:func:`register_orthogonal`), SN
  (:func:`register_spectral_norm`), OL (:func:`orthogonality_loss`) on the flattened
  ``(out, in·k·k)`` weight, and :func:`bake` / :func:`plain_state_dict` for export.
* :mod:`orthofx.treatments.gradient` — NOG, OLR, guard as pure composable gradient
  transforms (``init`` / ``update(updates, state, params, ctx) -> (updates, state)``) and
  :func:`named_chain` / :func:`chain` / :func:`default_chain` to compose them.
* :mod:`orthofx.treatments.attach` — :func:`attach` installs a chain (a
  :class:`~orthofx.specs.GradientSpec`'s, or your own) as an optimizer step pre-hook;
  :mod:`~orthofx.treatments.options`, :mod:`~orthofx.treatments.handle_stats`,
  :mod:`~orthofx.treatments.groups`, :mod:`~orthofx.treatments.lr` and
  :mod:`~orthofx.treatments.sharding` are its parts.
* :mod:`orthofx.treatments.ow_target` — under OW, NOG/OLR act on the generator A (the
  default, as the authors' code) or on the weight W = Φ(A) (:func:`weight_target`,
  ``attach(ow_target="weight")``: exact closed-form pull-back at A = 0, re-based every step).
* :mod:`orthofx.treatments.guidance` — :class:`AdaptiveOptimizerWarning`.
"""

from __future__ import annotations

from orthofx.treatments.attach import AttachHandle, attach, resolve_producers
from orthofx.treatments.guidance import AdaptiveOptimizerWarning
from orthofx.treatments.ow_target import WeightGradCapture, weight_target
from orthofx.vocab import OW_TARGETS
from orthofx.treatments.gradient import (
    ChainState,
    DeviceHistory,
    GradientTransformation,
    GuardState,
    NOGState,
    OLRState,
    Updates,
    as_updates,
    chain,
    default_chain,
    guard,
    named_chain,
    nog,
    olr,
    olr_eta,
)
from orthofx.treatments.weight import (
    FlatOrthogonal,
    FlatSpectralNorm,
    bake,
    bake_all,
    orthogonality_loss,
    plain_state_dict,
    register_orthogonal,
    register_spectral_norm,
    treatment_of,
)

__all__ = [
    "attach",
    "AttachHandle",
    "resolve_producers",
    "AdaptiveOptimizerWarning",
    "OW_TARGETS",
    "weight_target",
    "WeightGradCapture",
    "GradientTransformation",
    "Updates",
    "ChainState",
    "as_updates",
    "GuardState",
    "NOGState",
    "OLRState",
    "DeviceHistory",
    "nog",
    "guard",
    "olr",
    "olr_eta",
    "chain",
    "named_chain",
    "default_chain",
    "FlatOrthogonal",
    "FlatSpectralNorm",
    "register_orthogonal",
    "register_spectral_norm",
    "orthogonality_loss",
    "bake",
    "bake_all",
    "treatment_of",
    "plain_state_dict",
]
