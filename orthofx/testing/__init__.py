"""orthofx.testing: Hypothesis strategies that generate models with planted Pre-SVD layers.

* :func:`generated_models` - random valid models; each carries ``truth`` (the planted
  producers, kinds, usages, covariance forms and expected skips), ``analysis_config`` and
  ``example_inputs``
* :func:`head_specs`, :func:`head_truth` - the per-branch pieces
* :func:`model_fingerprint` - state, outputs and gradients of a model, to check that an
  analysis left it untouched

Requires ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from orthofx.testing.fingerprint import ModelFingerprint, model_fingerprint
from orthofx.testing.models import (
    EighSqrtFunction,
    GeneratedModel,
    Head,
    HeadSpec,
    HeadTruth,
    Op,
    PlantedTruth,
    StandInCovarianceMeta,
    StandInFeatureMeta,
    UserEighModule,
    user_sqrtm,
)
from orthofx.testing.strategies import (
    DISTRACTORS,
    META_KINDS,
    generated_models,
    head_specs,
    head_truth,
)

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
