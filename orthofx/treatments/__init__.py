"""The paper's treatments of Pre-SVD layers, acting on given producer modules/parameters.

* :mod:`orthofx.treatments.weight` — OW (:func:`register_orthogonal`), SN
  (:func:`register_spectral_norm`), OL (:func:`orthogonality_loss`) on the flattened
  ``(out, in·k·k)`` weight, and :func:`bake` / :func:`plain_state_dict` for export.
* :mod:`orthofx.treatments.gradient` — NOG, OLR as composable gradient transforms.
* :mod:`orthofx.treatments.attach` — :func:`attach` installs them as an optimizer step
  pre-hook.
"""

from __future__ import annotations

from orthofx.treatments.attach import AttachHandle, attach, resolve_producers
from orthofx.treatments.gradient import (
    DeviceHistory,
    GradientTransformation,
    GuardState,
    NOGState,
    OLRState,
    chain,
    guard,
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
    "GradientTransformation",
    "GuardState",
    "NOGState",
    "OLRState",
    "DeviceHistory",
    "nog",
    "guard",
    "olr",
    "olr_eta",
    "chain",
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
