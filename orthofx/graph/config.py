"""Options of the graph analysis: :class:`AnalysisConfig` (meta-layer specs are the shared
:class:`orthofx.vocab.MetaSpec`).

The analysis is driven by registries (``orthofx.graph.symbolic.patterns``). This config extends them
per call: extra meta-layer functions, modules and ``torch.autograd.Function`` classes with
their kind, extra ops that the walk may cross, modules traced as opaque leaves, and how
strictly failures are handled.

``OrthoConfig.analysis`` embeds one of these; :func:`resolve_analysis_config` accepts an
``AnalysisConfig``, ``None`` or any object carrying an ``.analysis`` attribute.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from orthofx.errors import ConfigError
from orthofx.vocab import KINDS, INPUTS, MetaSpec  # noqa: F401  (MetaSpec is shared with orthofx.nn)

__all__ = ["AnalysisConfig"]

def callable_name(obj: Any) -> str:
    """``"module:qualname"`` of a function or class (what ``to_dict`` stores)."""
    if isinstance(obj, str):
        return obj
    mod = getattr(obj, "__module__", None)
    names = [getattr(obj, "__qualname__", None), getattr(obj, "__name__", None)]
    names = [n for n in names if n]
    if not mod or not names:
        raise ConfigError(f"cannot name {obj!r}; register functions and classes, not instances")
    for name in names:  # torch builtins: __qualname__ is "_VariableFunctionsClass.cumsum"
        try:
            if resolve_callable_name(f"{mod}:{name}") is obj:
                return f"{mod}:{name}"
        except ConfigError:
            continue
    return f"{mod}:{names[0]}"


def resolve_callable_name(name: str) -> Any:
    """Inverse of :func:`callable_name` (imports the module)."""
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError(f"expected 'module:qualname', got {name!r}")
    mod_name, qual = name.split(":", 1)
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot resolve {name!r}: {exc}") from exc
    return obj


def _spec_map(value: Mapping[Any, Any] | None, what: str) -> dict[Any, MetaSpec]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a mapping {{callable: kind}}, got {type(value).__name__}")
    return {k: MetaSpec.coerce(v) for k, v in value.items()}


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of :func:`orthofx.graph.analyze`.

    Attributes:
        leaf_modules: qualified names (``"backbone.block"``) or class names
            (``"MyBlock"``, or ``"pkg.mod.MyBlock"``) of modules traced as opaque leaves.
            A name that matches no module raises :class:`ConfigError`.
        meta_functions: ``{function: kind | MetaSpec}``: extra meta-layer functions. They are
            kept as single graph nodes (fx leaves) while tracing.
        meta_modules: ``{module class | qualified name: kind | MetaSpec}``: extra meta-layer
            modules (traced as leaves).
        meta_autograd_functions: ``{torch.autograd.Function subclass: kind | MetaSpec}``.
            Without an entry, a Function is still a meta-layer when its forward, traced on
            its own, contains one.
        covariance_functions: extra functions ``f(X) -> X Xᵀ``-like covariance (first arg X).
        transparent_functions / transparent_methods / transparent_modules: extra ops that act
            per channel or only reshape; the walk crosses them (first tensor argument).
        leaf_functions: extra functions kept as single graph nodes while tracing (fx wrap).
        auto_leaf: when a submodule cannot be traced, retry with the innermost failing
            submodule as a leaf (recorded in ``report.auto_leaves``). When the root itself
            fails, :func:`analyze` analyses the traceable submodules on their own.
        max_auto_leaves: how many modules ``auto_leaf`` may turn into leaves (None: no limit).
        trace_autograd_functions: trace a Function's forward separately to find a
            meta-layer inside it.
        strict: raise instead of degrading: no automatic leaves or per-submodule fallback
            (:class:`TraceFailure` with the hint), and any meta-layer whose producer cannot
            be determined raises :class:`TraceFailure`.
        shapes: with ``example_inputs``, record tensor shapes along each chain (runs the
            graph once on fake tensors; the model is not touched).
    """

    leaf_modules: tuple[str, ...] = ()
    meta_functions: Mapping[Callable[..., Any], Any] = field(default_factory=dict)
    meta_modules: Mapping[Any, Any] = field(default_factory=dict)
    meta_autograd_functions: Mapping[type, Any] = field(default_factory=dict)
    covariance_functions: tuple[Callable[..., Any], ...] = ()
    transparent_functions: tuple[Callable[..., Any], ...] = ()
    transparent_methods: tuple[str, ...] = ()
    transparent_modules: tuple[type, ...] = ()
    leaf_functions: tuple[Callable[..., Any], ...] = ()
    auto_leaf: bool = True
    max_auto_leaves: int | None = None
    trace_autograd_functions: bool = True
    strict: bool = False
    shapes: bool = True

    def __post_init__(self) -> None:
        for name in ("leaf_modules", "covariance_functions", "transparent_functions",
                     "transparent_methods", "transparent_modules", "leaf_functions"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"AnalysisConfig.{name} must be a tuple, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("leaf_modules", "transparent_methods"):
            for item in getattr(self, name):
                if not isinstance(item, str) or not item:
                    raise ConfigError(f"AnalysisConfig.{name} holds names, got {item!r}")
        for name in ("covariance_functions", "transparent_functions", "leaf_functions"):
            for item in getattr(self, name):
                if not callable(item):
                    raise ConfigError(f"AnalysisConfig.{name} holds callables, got {item!r}")
        for item in self.transparent_modules:
            if not isinstance(item, type):
                raise ConfigError(f"AnalysisConfig.transparent_modules holds classes, got {item!r}")
        object.__setattr__(self, "meta_functions", _spec_map(self.meta_functions, "meta_functions"))
        object.__setattr__(self, "meta_modules", _spec_map(self.meta_modules, "meta_modules"))
        object.__setattr__(
            self, "meta_autograd_functions",
            _spec_map(self.meta_autograd_functions, "meta_autograd_functions"),
        )
        for fn in self.meta_functions:
            if not callable(fn):
                raise ConfigError(f"meta_functions keys must be callables, got {fn!r}")
        for key in self.meta_modules:
            if not (isinstance(key, str) or isinstance(key, type)):
                raise ConfigError(f"meta_modules keys must be classes or qualified names, got {key!r}")
        for cls in self.meta_autograd_functions:
            import torch

            if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
                raise ConfigError(
                    f"meta_autograd_functions keys must be torch.autograd.Function subclasses, got {cls!r}"
                )
        if self.max_auto_leaves is not None and (isinstance(self.max_auto_leaves, bool) or not isinstance(
                self.max_auto_leaves, int) or self.max_auto_leaves < 0):
            raise ConfigError(f"AnalysisConfig.max_auto_leaves must be None (no limit) or an int >= 0, "
                              f"got {self.max_auto_leaves!r}")

    def __hash__(self) -> int:  # the mapping fields are not hashable themselves
        import json

        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def replace(self, **changes: Any) -> "AnalysisConfig":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; callables and classes become ``"module:qualname"``."""

        def spec(s: MetaSpec) -> dict[str, str]:
            return {"kind": s.kind, "input": s.input}

        return {
            "leaf_modules": list(self.leaf_modules),
            "meta_functions": {callable_name(k): spec(v) for k, v in self.meta_functions.items()},
            "meta_modules": {callable_name(k): spec(v) for k, v in self.meta_modules.items()},
            "meta_autograd_functions": {
                callable_name(k): spec(v) for k, v in self.meta_autograd_functions.items()
            },
            "covariance_functions": [callable_name(f) for f in self.covariance_functions],
            "transparent_functions": [callable_name(f) for f in self.transparent_functions],
            "transparent_methods": list(self.transparent_methods),
            "transparent_modules": [callable_name(c) for c in self.transparent_modules],
            "leaf_functions": [callable_name(f) for f in self.leaf_functions],
            "auto_leaf": self.auto_leaf,
            "max_auto_leaves": self.max_auto_leaves,
            "trace_autograd_functions": self.trace_autograd_functions,
            "strict": self.strict,
            "shapes": self.shapes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AnalysisConfig":
        """Inverse of :meth:`to_dict` (imports the named callables)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown AnalysisConfig keys: {sorted(unknown)}")
        kw: dict[str, Any] = dict(d)

        def obj(name: Any) -> Any:
            return resolve_callable_name(name) if isinstance(name, str) else name

        for key in ("meta_functions", "meta_autograd_functions"):
            if key in kw:
                kw[key] = {obj(k): v for k, v in kw[key].items()}
        if "meta_modules" in kw:
            # qualified module names (no ':') stay names; "module:Class" becomes the class
            kw["meta_modules"] = {
                (resolve_callable_name(k) if isinstance(k, str) and ":" in k else k): v
                for k, v in kw["meta_modules"].items()
            }
        for key in ("covariance_functions", "transparent_functions", "transparent_modules",
                    "leaf_functions"):
            if key in kw:
                kw[key] = tuple(obj(x) for x in kw[key])
        for key in ("leaf_modules", "transparent_methods"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def resolve_analysis_config(config: Any) -> AnalysisConfig:
    """``None`` → defaults; an ``AnalysisConfig`` as is; an object with ``.analysis``
    (e.g. ``OrthoConfig``) → its analysis config (or the defaults when that is None);
    a mapping → :meth:`AnalysisConfig.from_dict`."""
    if config is None:
        return AnalysisConfig()
    if isinstance(config, AnalysisConfig):
        return config
    if isinstance(config, Mapping):
        return AnalysisConfig.from_dict(config)
    if hasattr(config, "analysis"):
        inner = config.analysis
        if inner is None:
            return AnalysisConfig()
        if isinstance(inner, AnalysisConfig):
            return inner
        if isinstance(inner, Mapping):
            return AnalysisConfig.from_dict(inner)
        raise ConfigError(
            f"config.analysis must be an AnalysisConfig or None, got {type(inner).__name__}"
        )
    raise ConfigError(
        f"config must be an AnalysisConfig, None, or an object with an .analysis attribute; "
        f"got {type(config).__name__}"
    )
