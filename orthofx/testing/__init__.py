"""orthofx.testing: Hypothesis strategies that generate models with planted Pre-SVD layers.

* :func:`generated_models` - random valid models; each carries ``truth`` (the planted
  producers, kinds, usages, covariance forms and expected skips), ``analysis_config`` and
  ``example_inputs``
* :func:`head_specs`, :func:`head_truth` - the per-branch pieces
* :func:`model_fingerprint` - state, outputs and gradients of a model, to check that an
  analysis left it untouched
* :mod:`orthofx.testing.matrices` - deterministic SPD/covariance test matrices (no hypothesis)

The strategies require ``hypothesis`` (the ``test`` extra); names load lazily.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orthofx.testing.fingerprint import ModelFingerprint, model_fingerprint  # noqa: F401
    from orthofx.testing.models import (  # noqa: F401
        EighSqrtFunction, GeneratedModel, Head, HeadSpec, HeadTruth, Op, PlantedTruth, StandInCovarianceMeta,
        StandInFeatureMeta, UserEighModule, user_sqrtm,
    )
    from orthofx.testing.strategies import DISTRACTORS, META_KINDS, generated_models, head_specs, head_truth  # noqa: F401

# name -> submodule (loaded on first use, so that orthofx.testing.matrices needs no hypothesis)
_LAZY = {
    **dict.fromkeys(("ModelFingerprint", "model_fingerprint"), "fingerprint"),
    **dict.fromkeys(("EighSqrtFunction", "GeneratedModel", "Head", "HeadSpec", "HeadTruth", "Op", "PlantedTruth",
                     "StandInCovarianceMeta", "StandInFeatureMeta", "UserEighModule", "user_sqrtm"), "models"),
    **dict.fromkeys(("DISTRACTORS", "META_KINDS", "generated_models", "head_specs", "head_truth"), "strategies"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"orthofx.testing.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'orthofx.testing' has no attribute {name!r}")


__all__ = [
    "generated_models",
    "head_specs",
    "head_truth",
    "META_KINDS",
    "DISTRACTORS",
    "GeneratedModel",
    "Head",
    "HeadSpec",
    "HeadTruth",
    "Op",
    "PlantedTruth",
    "StandInCovarianceMeta",
    "StandInFeatureMeta",
    "UserEighModule",
    "EighSqrtFunction",
    "user_sqrtm",
    "ModelFingerprint",
    "model_fingerprint",
]
