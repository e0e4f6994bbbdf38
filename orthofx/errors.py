"""The orthofx error hierarchy.

Every failure that orthofx can diagnose raises a subclass of :class:`OrthofxError`
with a message that names the offending object and, where one exists, the option
that fixes it. Input-validation errors also subclass :class:`ValueError` /
:class:`TypeError` so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "OrthofxError",
    "InputError",
    "DTypeError",
    "TraceFailure",
    "ConfigError",
    "AttachError",
    "TreatmentError",
    "SolverError",
    "ScriptingError",
    "OptionError",
]


class OrthofxError(Exception):
    """Base class of all orthofx errors."""


class InputError(OrthofxError, ValueError):
    """A tensor argument has the wrong shape, is empty, or holds NaN/Inf."""


class DTypeError(OrthofxError, TypeError):
    """A tensor argument has an unsupported dtype (e.g. an integer dtype)."""


class TraceFailure(OrthofxError):
    """A model (or one of its submodules) could not be traced by torch.fx.

    Attributes:
        module: qualified name of the module that failed ("" for the root).
        hint: the configuration option that works around the failure.
    """

    def __init__(self, message: str, module: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.hint = hint


class ConfigError(OrthofxError, ValueError):
    """An unknown preset, an invalid option, or a pattern that matches nothing."""


class AttachError(OrthofxError, ValueError):
    """``orthofx.attach`` was given an optimizer that does not fit the model."""


class TreatmentError(OrthofxError, TypeError):
    """A treatment cannot be applied to a parameter (e.g. a non-float weight)."""


class SolverError(OrthofxError, RuntimeError):
    """A linear-algebra solver failed even after every recovery strategy."""


class ScriptingError(OrthofxError, RuntimeError):
    """``torch.jit.script`` was asked to compile an orthofx module without a TorchScript path
    (``StableDecomposition``, a fused square root; DecorrelatedBatchNorm and CovariancePooling
    script); the message names the module and the alternatives (``orthofx.strip``,
    ``torch.jit.trace``, ``torch.export``)."""


class OptionError(ConfigError):
    """One named option or config field holds an invalid value.

    Attributes:
        option: the field or command-line option (``"ol_weight"``, ``"--batch-size"``).
        value: the offending value.
        problem: what is wrong with it, e.g. ``"must be >= 1"``.
    """

    def __init__(self, option: str, value: object, problem: str) -> None:
        super().__init__(f"{option}={value!r}: {problem}")
        self.option = option
        self.value = value
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, object, str]]:
        return (type(self), (self.option, self.value, self.problem))
