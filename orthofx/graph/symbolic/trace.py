"""Symbolic tracing for the analysis: leaf rules, module scopes, autograd.Functions, errors.

:func:`trace` turns a model into a ``torch.fx.GraphModule`` without touching the model:

* **Leaves.** torch's standard leaves, every orthofx meta-layer module (duck-typed on the
  class attribute ``orthofx_meta``), modules registered in ``AnalysisConfig.meta_modules``
  and ``AnalysisConfig.leaf_modules`` (qualified names or class names) stay single
  ``call_module`` nodes. orthofx.linalg functions and the config's meta/leaf functions stay
  single ``call_function`` nodes (fx autowrap, also when called as ``orthofx.linalg.eigh``).
* **Scopes.** Every node records the qualified name and class of the module whose forward
  created it: ``node.meta["orthofx_scope"]`` / ``node.meta["orthofx_scope_type"]``.
* **autograd.Functions.** FX would inline ``MyFunction.apply`` and silently drop the custom
  backward. While tracing, ``torch.autograd.Function.apply`` is patched so that a call with
  Proxy arguments becomes ONE ``call_function`` node. Its target is
  :func:`function_leaf` ``(MyFunction)``: a named, cached Python callable that calls
  ``MyFunction.apply`` (``Function.apply`` itself is a C builtin that FX code generation
  cannot name). The GraphModule therefore runs the custom backward. The class is in
  ``node.meta["orthofx_autograd_function"]`` and in ``function_of(node.target)``.
* **Failures.** A submodule that cannot be traced (data-dependent control flow, ...) is
  located (the innermost failing module). With ``auto_leaf`` the trace is retried with it
  as a leaf and the choice is recorded (``TraceInfo.auto_leaves``); otherwise a
  :class:`~orthofx.errors.TraceFailure` names the module and the config option that fixes it.
  No bare ``TraceError`` escapes.
"""

from __future__ import annotations

import difflib
import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.proxy import Proxy
from torch.nn.utils import parametrize

from orthofx.errors import ConfigError, InputError, TraceFailure
from orthofx.graph.config import AnalysisConfig, resolve_analysis_config
from orthofx.graph.symbolic.patterns import Patterns
from orthofx.graph.state import kept_state, traces_one_at_a_time
from orthofx.vocab import is_meta_layer

__all__ = ["trace", "function_leaf", "function_of"]

SCOPE_KEY = "orthofx_scope"
SCOPE_TYPE_KEY = "orthofx_scope_type"
FUNCTION_KEY = "orthofx_autograd_function"
TRACE_META_KEY = "orthofx_trace"


# --------------------------------------------------------------------------- autograd.Function leaves
_FUNCTION_LEAVES: "weakref.WeakKeyDictionary[type, Callable[..., Any]]" = weakref.WeakKeyDictionary()


def function_leaf(cls: type) -> Callable[..., Any]:
    """The callable that stands for ``cls.apply`` in a traced graph (one per class).

    Calling it calls ``cls.apply`` (so the custom backward runs). ``function_of`` maps it back.
    """
    leaf = _FUNCTION_LEAVES.get(cls)
    if leaf is None:
        # refer to the class weakly-ish through a closure; classes outlive graphs in practice
        def apply(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)

        apply.__name__ = f"{cls.__name__}_apply"
        apply.__qualname__ = f"{cls.__qualname__}.apply"
        # never "torch...": fx code generation would then print a dotted torch path for it
        apply.__module__ = __name__
        apply.__doc__ = f"Leaf stand-in for {cls.__module__}.{cls.__qualname__}.apply."
        apply.__orthofx_function__ = cls  # type: ignore[attr-defined]
        apply.__wrapped__ = cls.apply  # type: ignore[attr-defined]
        _FUNCTION_LEAVES[cls] = apply
        leaf = apply
    return leaf


def function_of(target: Any) -> type | None:
    """The ``torch.autograd.Function`` subclass behind a :func:`function_leaf` target, else None."""
    return getattr(target, "__orthofx_function__", None) if callable(target) else None


def _has_proxy(args: Any, kwargs: Any) -> Proxy | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, Proxy):
            return leaf
    return None


class _FunctionApplyPatch:
    """Context manager: ``torch.autograd.Function.apply`` emits a leaf node for Proxy args."""

    def __enter__(self) -> "_FunctionApplyPatch":
        base = torch.autograd.Function
        self._saved = base.__dict__["apply"]
        saved = self._saved

        def original(cls: type) -> Callable[..., Any]:
            return saved.__get__(None, cls)

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            proxy = _has_proxy(args, kwargs)
            if proxy is None:
                return original(cls)(*args, **kwargs)
            out = proxy.tracer.create_proxy("call_function", function_leaf(cls), args, kwargs)
            out.node.meta[FUNCTION_KEY] = cls
            return out

        base.apply = classmethod(apply)  # type: ignore[assignment,method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.autograd.Function.apply = self._saved  # type: ignore[method-assign]


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class AutoLeafRecord:
    """A submodule made a leaf automatically because it could not be traced."""

    name: str
    type: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "error": self.error}


@dataclass
class TraceInfo:
    """What :func:`trace` decided; stored in ``gm.meta["orthofx_trace"]``.

    Attributes:
        leaf_modules: qualified names of the modules traced as leaves because of the config
            or ``auto_leaf`` (standard torch leaves are not listed).
        auto_leaves: the modules made leaves automatically, with the error that caused it.
        module_types: ``{qualified name: class name}`` of every module of the traced model
            (the GraphModule only keeps the modules it calls).
        functions: the ``torch.autograd.Function`` classes kept as leaves.
        model_type: the traced model's class name.
    """

    leaf_modules: tuple[str, ...] = ()
    auto_leaves: tuple[AutoLeafRecord, ...] = ()
    module_types: dict[str, str] = field(default_factory=dict)
    functions: tuple[type, ...] = ()
    model_type: str = ""


def trace_info(gm: fx.GraphModule) -> TraceInfo:
    """The :class:`TraceInfo` of a GraphModule made by :func:`trace` (a fresh one otherwise)."""
    meta = getattr(gm, "meta", None)
    info = meta.get(TRACE_META_KEY) if isinstance(meta, dict) else None
    if isinstance(info, TraceInfo):
        return info
    types = {name: user_class(m).__name__ for name, m in gm.named_modules()}
    return TraceInfo(module_types=types, model_type=type(gm).__name__)


# --------------------------------------------------------------------------- tracer
class OrthoTracer(fx.Tracer):
    """``fx.Tracer`` with orthofx's leaf rules, scope records and Function leaves.

    Args:
        patterns: registries (gives the leaf functions and the config's meta modules).
        leaf_names: qualified module names traced as leaves.
        leaf_classes: class names (``__name__``, ``__qualname__`` or ``module.qualname``)
            traced as leaves.
    """

    def __init__(
        self,
        patterns: Patterns | None = None,
        leaf_names: Iterable[str] = (),
        leaf_classes: Iterable[str] = (),
    ) -> None:
        self.patterns = patterns or Patterns()
        super().__init__(
            autowrap_modules=(math,),
            autowrap_functions=tuple(self.patterns.leaf_functions),
        )
        # also patch attribute-style calls such as ``orthofx.linalg.eigh(x)`` or
        # ``mylib.my_sqrtm(x)``: search the modules that define the leaf functions
        for fn in self.patterns.leaf_functions:
            mod = sys.modules.get(getattr(fn, "__module__", None) or "")
            if mod is not None and getattr(mod, getattr(fn, "__name__", ""), None) is fn \
                    and mod not in self._autowrap_search:
                self._autowrap_search.append(mod)
        if self.patterns.linalg:
            import orthofx.linalg as _linalg

            if _linalg not in self._autowrap_search:
                self._autowrap_search.append(_linalg)
        self.leaf_names = frozenset(leaf_names)
        self.leaf_classes = frozenset(leaf_classes)
        self._scope: tuple[str, str] = ("", "")
        #: (qualified name, class name, exception) of the innermost module that raised
        self.failure: tuple[str, str, BaseException] | None = None
        self.functions: dict[type, None] = {}
        #: qualified names of the modules made leaves by name or class (config / auto_leaf)
        self.config_leaves: dict[str, None] = {}

    # -- leaves ---------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_meta_layer(m):
            return True
        if module_qualified_name in self.leaf_names or _class_keys(type(m)) & self.leaf_classes:
            self.config_leaves[module_qualified_name] = None
            return True
        if self.patterns.config.meta_modules and self.patterns.is_config_meta_module(
            m, module_qualified_name
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # -- scopes and failure location ---------------------------------------------
    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError as exc:
            raise TraceFailure(
                f"a {type(m).__name__} is called in forward but is not a registered submodule "
                f"(created inside forward, or held in a plain list/dict); fx cannot name it",
                module=_scope_name(self._scope[0]),
                hint="register it as a submodule (nn.ModuleList / nn.ModuleDict / attribute)",
            ) from exc
        saved = self._scope
        self._scope = (name, type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if self.failure is None:
                self.failure = (name, type(m).__name__, exc)
            raise
        finally:
            self._scope = saved

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any,
                    name: str | None = None, type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[SCOPE_KEY], node.meta[SCOPE_TYPE_KEY] = self._scope
        if kind == "call_function":
            cls = function_of(target)
            if cls is not None:
                self.functions[cls] = None
        return node

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:  # type: ignore[override]
        if isinstance(root, nn.Module):
            self._scope = ("", type(root).__name__)
        self.failure = None
        with _FunctionApplyPatch():
            return super().trace(root, concrete_args)


def user_class(m: nn.Module) -> type:
    """The class the user wrote: a parametrized module's class is a generated subclass."""
    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__name__.startswith("Parametrized"):
        return cls.__bases__[0]
    return cls


def _class_keys(cls: type) -> frozenset[str]:
    return frozenset({cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"})


def _scope_name(name: str) -> str:
    return name or "<root>"


# --------------------------------------------------------------------------- trace()
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _caused_by(exc: BaseException, inner: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if cur is inner:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _resolve_leaf_names(model: nn.Module, names: Iterable[str]) -> tuple[set[str], set[str]]:
    """Split config leaf names into qualified names and class names; unknown names raise."""
    modules = dict(model.named_modules())
    class_keys: set[str] = set()
    for m in modules.values():
        class_keys |= _class_keys(type(m))
    qual, classes = set(), set()
    for name in names:
        if name in modules and name != "":
            qual.add(name)
        elif name in class_keys:
            classes.add(name)
        else:
            close = difflib.get_close_matches(name, [n for n in modules if n] + sorted(class_keys), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"leaf_modules entry {name!r} matches no submodule name or class of "
                f"{type(model).__name__}.{hint}"
            )
    return qual, classes


@traces_one_at_a_time
def trace(
    model: nn.Module,
    config: Any = None,
    *,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` for the analysis; the model itself is not modified.

    Args:
        model: the module to trace.
        config: an :class:`AnalysisConfig`, ``None``, or an object with ``.analysis``.
        concrete_args: forwarded to ``fx.Tracer.trace`` (specialise non-tensor arguments).

    Returns:
        A GraphModule sharing ``model``'s submodules and parameters, with
        ``gm.meta["orthofx_trace"]`` a :class:`TraceInfo`.

    Raises:
        TraceFailure: the model (or a submodule, when ``auto_leaf`` is off or exhausted)
            cannot be traced; ``.module`` names it and ``.hint`` gives the fix.
        ConfigError: a ``leaf_modules`` entry matches nothing.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"trace expects an nn.Module, got {type(model).__name__}")
    cfg = resolve_analysis_config(config)
    patterns = Patterns(cfg)
    leaf_names, leaf_classes = _resolve_leaf_names(model, cfg.leaf_modules)
    auto: list[AutoLeafRecord] = []
    while True:
        tracer = OrthoTracer(patterns, leaf_names, leaf_classes)
        try:
            # a forward that reassigns buffers or attributes would leave fx Proxies in the
            # model, whether the trace succeeds or not: its state is restored either way
            with kept_state(model, keep_new="_tensor_constant", values=True):
                graph = tracer.trace(model, concrete_args)
            break
        except TraceFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every tracing error becomes a TraceFailure
            failure = tracer.failure
            if failure is not None and not _caused_by(exc, failure[2]):
                failure = None
            name, tname = (failure[0], failure[1]) if failure else ("", type(model).__name__)
            reason = _first_line(exc)
            can_retry = (
                name != ""
                and name not in leaf_names
                and cfg.auto_leaf
                and not cfg.strict
                and (cfg.max_auto_leaves is None or len(auto) < cfg.max_auto_leaves)
            )
            if can_retry:
                leaf_names.add(name)
                auto.append(AutoLeafRecord(name, tname, reason))
                continue
            raise _failure(model, name, tname, reason, cfg, already_leaf=name in leaf_names) from exc
    try:
        gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    except (TypeError, AttributeError, RuntimeError) as exc:
        clash = sorted(set(dict(model.named_children())) & _GRAPH_MODULE_ATTRS)
        if clash:
            raise TraceFailure(
                f"{type(model).__name__} has a submodule named {clash[0]!r}, which collides with "
                f"the torch.fx.GraphModule attribute of that name; rename the submodule",
                module=clash[0], hint=f"rename the submodule {clash[0]!r}",
            ) from exc
        raise TraceFailure(f"torch.fx could not build a GraphModule for "
                           f"{type(model).__name__}: {_first_line(exc)}") from exc
    _constants_out_of_state(gm, model)
    gm.meta[TRACE_META_KEY] = TraceInfo(
        leaf_modules=tuple(sorted(set(leaf_names) | set(tracer.config_leaves))),
        auto_leaves=tuple(auto),
        module_types={n: user_class(m).__name__ for n, m in model.named_modules()},
        functions=tuple(tracer.functions),
        model_type=type(model).__name__,
    )
    return gm


def _constants_out_of_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Keep the tensors that a forward creates from constants (``torch.eye(n)``, ``torch.ones(k)``:
    fx stores them on the root as ``_tensor_constant<i>``) out of the state_dict.

    fx registers them as persistent buffers, so a traced model would gain state_dict keys the
    user's model never had (and a checkpoint of one would not load into the other). They are
    re-registered as non-persistent buffers: the same values in ``forward``, moved by ``.to()``,
    absent from ``state_dict``."""
    persistent_before = set(model.state_dict(keep_vars=True))
    for name in list(gm._buffers):
        if name.startswith("_tensor_constant") and name not in persistent_before:
            gm.register_buffer(name, gm.get_buffer(name), persistent=False)


#: attributes of fx.GraphModule that a root submodule must not shadow
_GRAPH_MODULE_ATTRS = frozenset({"meta", "graph", "code", "forward", "recompile"})


def _failure(model: nn.Module, name: str, tname: str, reason: str,
             cfg: AnalysisConfig, already_leaf: bool = False) -> TraceFailure:
    if name:
        hint = f"AnalysisConfig(leaf_modules=({name!r},))"
        why = (
            "it already is a leaf (the call itself fails)" if already_leaf
            else "auto_leaf is off" if not cfg.auto_leaf or cfg.strict
            else f"the automatic-leaf limit (max_auto_leaves={cfg.max_auto_leaves}) was reached"
        )
        return TraceFailure(
            f"torch.fx cannot trace submodule {name!r} ({tname}) of {type(model).__name__}: "
            f"{reason}. Trace it as an opaque leaf with {hint} "
            f"(OrthoConfig(analysis=...)); not retried automatically because {why}.",
            module=name,
            hint=hint,
        )
    hint = "concrete_args={...} for non-tensor arguments, or make the control flow static"
    return TraceFailure(
        f"torch.fx cannot trace the forward of {type(model).__name__} itself: {reason}. "
        f"A leaf cannot help because the failing code is in the root forward; "
        f"{hint}, or analyse the traceable submodules on their own "
        f"(orthofx.graph.analyze does that unless strict=True).",
        module="",
        hint=hint,
    )


# --------------------------------------------------------------------------- Function forward
class _TraceCtx:
    """A stand-in ``ctx`` for tracing an autograd.Function's forward on its own."""

    def __init__(self, n: int) -> None:
        self.needs_input_grad = (True,) * n
        self.saved_tensors: tuple[Any, ...] = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *args: Any) -> None:
        pass

    def mark_non_differentiable(self, *args: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value


def _uses_setup_context(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass is torch.autograd.Function:
            return False
        if "setup_context" in klass.__dict__:
            return True
    return False


def trace_function_forward(
    cls: type, node: fx.Node, patterns: Patterns | None = None
) -> tuple[fx.GraphModule, list[Any]]:
    """Trace ``cls.forward`` on its own, with the arguments of the leaf ``node``.

    Graph arguments of ``node`` become placeholders (in order); constants are baked in.

    Returns:
        ``(gm, keys)``: the forward's GraphModule and, per placeholder, the position
        (int) or keyword (str) of the outer argument it stands for.

    Raises:
        TraceFailure: the forward cannot be traced.
    """
    args = list(node.args)
    kwargs = dict(node.kwargs)
    keys: list[Any] = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]
    keys += [k for k, v in kwargs.items() if isinstance(v, fx.Node)]
    setup_style = _uses_setup_context(cls)
    n_in = len(args)

    def call(*proxies: Any) -> Any:
        a, kw = list(args), dict(kwargs)
        for key, p in zip(keys, proxies):
            if isinstance(key, int):
                a[key] = p
            else:
                kw[key] = p
        if setup_style:
            return cls.forward(*a, **kw)
        return cls.forward(_TraceCtx(n_in), *a, **kw)

    names = [f"arg{k}" if isinstance(k, int) else str(k) for k in keys]
    src = f"def forward({', '.join(names)}):\n    return _orthofx_call({', '.join(names)})\n"
    namespace: dict[str, Any] = {"_orthofx_call": call}
    exec(compile(src, f"<orthofx {cls.__qualname__}.forward>", "exec"), namespace)  # noqa: S102
    fn = namespace["forward"]
    tracer = OrthoTracer(patterns)
    try:
        graph = tracer.trace(fn)
    except TraceFailure:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TraceFailure(
            f"the forward of autograd.Function {cls.__qualname__} cannot be traced on its own: "
            f"{_first_line(exc)}",
            module=str(node.meta.get(SCOPE_KEY, "")),
            hint=f"AnalysisConfig(meta_autograd_functions={{{cls.__name__}: '<kind>'}})",
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, class_name=f"{cls.__name__}Forward")
    gm.meta[TRACE_META_KEY] = TraceInfo(model_type=f"{cls.__qualname__}.forward",
                                        functions=tuple(tracer.functions))
    return gm, keys

