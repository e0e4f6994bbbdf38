"""orthofx: find SVD meta-layers and their Pre-SVD layers, and improve covariance conditioning.

    gm, report = orthofx.transform(model, example_inputs, config="nog+ow+olr")
    orthofx.attach(optimizer, gm)
    plain = orthofx.strip(gm)

Public names are imported lazily (PEP 562), so ``import orthofx`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime these load lazily
    from orthofx.config import PRESETS, OrthoConfig  # noqa: F401
    from orthofx.export import checkpoint, load_checkpoint, save_checkpoint, strip  # noqa: F401
    from orthofx.graph import AnalysisConfig, AnalysisReport, analyze, analyze_graph, trace  # noqa: F401
    from orthofx.monitor import ConditioningMonitor  # noqa: F401
    from orthofx.pipeline import TransformReport, attach, orthogonality_loss, transform  # noqa: F401
    from orthofx.syncs import cuda_policy, sync_audit  # noqa: F401

from orthofx.errors import (  # noqa: F401
    AttachError,
    ConfigError,
    DTypeError,
    InputError,
    OrthofxError,
    SolverError,
    TraceFailure,
    TreatmentError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "OrthoConfig": "orthofx.config",
    "PRESETS": "orthofx.config",
    "analyze": "orthofx.graph",
    "analyze_graph": "orthofx.graph",
    "trace": "orthofx.graph",
    "AnalysisConfig": "orthofx.graph",
    "AnalysisReport": "orthofx.graph",
    "transform": "orthofx.pipeline",
    "attach": "orthofx.pipeline",
    "orthogonality_loss": "orthofx.pipeline",
    "TransformReport": "orthofx.pipeline",
    "strip": "orthofx.export",
    "checkpoint": "orthofx.export",
    "save_checkpoint": "orthofx.export",
    "load_checkpoint": "orthofx.export",
    "ConditioningMonitor": "orthofx.monitor",
    "sync_audit": "orthofx.syncs",
    "cuda_policy": "orthofx.syncs",
}
_SUBMODULES = ("linalg", "nn", "graph", "treatments", "config", "data", "testing", "monitor", "export", "rewrite", "experiment", "syncs")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"orthofx.{name}")
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'orthofx' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
