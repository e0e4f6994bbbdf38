"""orthofx: find SVD meta-layers and their Pre-SVD layers, and improve covariance conditioning.

    gm, report = orthofx.transform(model, example_inputs, config="nog+ow+olr")
    orthofx.attach(optimizer, gm)
    plain = orthofx.strip(gm)

The top level holds the names a training script needs (:data:`__all__`); everything else lives
in its submodule (``orthofx.linalg``, ``orthofx.nn``, ``orthofx.treatments``, ``orthofx.graph``,
``orthofx.optim``, ``orthofx.integrations``, ...). Names and submodules are imported lazily
(PEP 562), so ``import orthofx`` stays cheap. Older top-level names (``orthofx.PRESETS``,
``orthofx.trace``, ``orthofx.sync_audit``, ...) still resolve, with a ``DeprecationWarning``
naming their module (``orthofx.config.PRESETS``, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orthofx._deprecation import warn_deprecated

if TYPE_CHECKING:  # for type checkers and IDEs; at runtime these load lazily
    from orthofx.config import OrthoConfig  # noqa: F401
    from orthofx.errors import ConfigError, InputError, OrthofxError  # noqa: F401
    from orthofx.export import load_checkpoint, save_checkpoint, strip  # noqa: F401
    from orthofx.graph import AnalysisConfig, AnalysisReport, analyze  # noqa: F401
    from orthofx.monitor import ConditioningMonitor  # noqa: F401
    from orthofx.pipeline import attach, orthogonality_loss, transform  # noqa: F401
    from orthofx.report import TransformReport  # noqa: F401

__version__ = "0.2.0"

__all__ = [
    "transform",
    "attach",
    "orthogonality_loss",
    "strip",
    "save_checkpoint",
    "load_checkpoint",
    "analyze",
    "OrthoConfig",
    "AnalysisConfig",
    "TransformReport",
    "AnalysisReport",
    "ConditioningMonitor",
    "OrthofxError",
    "ConfigError",
    "InputError",
]

# public name -> module that defines it (the advertised ones are __all__)
_LAZY: dict[str, str] = {
    "transform": "orthofx.pipeline",
    "attach": "orthofx.pipeline",
    "orthogonality_loss": "orthofx.pipeline",
    "strip": "orthofx.export",
    "save_checkpoint": "orthofx.export",
    "load_checkpoint": "orthofx.export",
    "analyze": "orthofx.graph",
    "OrthoConfig": "orthofx.config",
    "AnalysisConfig": "orthofx.graph",
    "TransformReport": "orthofx.report",
    "AnalysisReport": "orthofx.graph",
    "ConditioningMonitor": "orthofx.monitor",
    "OrthofxError": "orthofx.errors",
    "ConfigError": "orthofx.errors",
    "InputError": "orthofx.errors",
}

# earlier top-level names: still importable from here with a DeprecationWarning naming the
# new place (module.name); documented in their modules
_COMPAT: dict[str, str] = {
    "PRESETS": "orthofx.config",
    "analyze_graph": "orthofx.graph",
    "trace": "orthofx.graph",
    "checkpoint": "orthofx.export",
    "sync_audit": "orthofx.syncs",
    "cuda_policy": "orthofx.syncs",
    "AttachError": "orthofx.errors",
    "DTypeError": "orthofx.errors",
    "SolverError": "orthofx.errors",
    "TraceFailure": "orthofx.errors",
    "TreatmentError": "orthofx.errors",
    "OptionError": "orthofx.errors",
}

#: submodules listed by dir(orthofx)
_SUBMODULES = ("linalg", "nn", "treatments", "graph", "optim", "integrations", "monitor", "testing")
#: submodules importable as attributes but not advertised
_HIDDEN_SUBMODULES = ("config", "errors", "export", "pipeline", "plan", "report", "rewrite", "vocab", "syncs",
                      "data", "experiment", "models", "cli", "fuse", "verify")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES or name in _HIDDEN_SUBMODULES:
        return importlib.import_module(f"orthofx.{name}")
    mod = _LAZY.get(name)
    if mod is None and name in _COMPAT:
        mod = _COMPAT[name]
        warn_deprecated(f"orthofx.{name}", f"{mod}.{name}", stacklevel=2)
    if mod is None:
        raise AttributeError(f"module 'orthofx' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_SUBMODULES) | {"__version__"})
