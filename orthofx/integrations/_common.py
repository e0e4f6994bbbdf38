"""What the framework callbacks share: transform a model attribute, attach to the optimizers,
collect metrics, store and replay the plan. No framework is imported here.

The ordering rules every integration follows (docs/integrations.md):

1. transform the model before the optimizer is built (the optimizer must hold the
   transformed parameters, e.g. ``conv.parametrizations.weight.original`` under OW);
2. attach NOG/OLR after the optimizer exists and before its state is loaded on resume
   (OLR moves each producer into a param group of its own, and the saved optimizer state
   has that layout);
3. wrap for DDP/FSDP after the transform.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from orthofx._log import logger as _root_logger
from orthofx.config import check_int
from orthofx.errors import AttachError, ConfigError
from orthofx.export import checkpoint as _checkpoint
from orthofx.monitor import ConditioningMonitor, MonitorWarning, record_metrics
from orthofx.pipeline import TransformReport, attach, plan_of, replay, transform
from orthofx.rewrite import Plan

log = _root_logger.getChild("integrations")

#: key of the orthofx entry in a framework checkpoint
CHECKPOINT_KEY = "orthofx"
#: layout version of that entry
ENTRY_VERSION = 1

InputsSpec = Any  # a tensor, a tuple of positional inputs, or None


def get_target(owner: nn.Module, attr: str | None) -> nn.Module:
    """``owner`` itself (``attr=None``) or its submodule at the dotted path ``attr``."""
    if attr is None:
        return owner
    try:
        target = owner.get_submodule(attr)
    except AttributeError:
        raise ConfigError(
            f"{type(owner).__name__} has no submodule {attr!r}: orthofx transforms the network held in "
            f"that attribute (write `self.{attr} = <network>` in __init__, or pass model_attr=)"
        ) from None
    return target


def set_target(owner: nn.Module, attr: str, module: nn.Module) -> None:
    parent_name, _, leaf = attr.rpartition(".")
    parent = owner.get_submodule(parent_name) if parent_name else owner
    setattr(parent, leaf, module)


def _as_inputs(x: Any) -> tuple[Any, ...] | None:
    if x is None:
        return None
    if isinstance(x, Mapping):
        raise ConfigError("example inputs given as a dict are not supported; pass a tensor or a tuple of positional inputs")
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _to_device(inputs: tuple[Any, ...], module: nn.Module) -> tuple[Any, ...]:
    p = next(module.parameters(), None)
    if p is None:
        return inputs
    return tuple(x.to(p.device) if isinstance(x, torch.Tensor) else x for x in inputs)


def resolve_inputs(
    owner: nn.Module, example_inputs: InputsSpec, example_input_fn: Callable[[nn.Module], Any] | None,
    fallback_attr: str | None = None,
) -> tuple[Any, ...] | None:
    """The example inputs: ``example_inputs``, else ``example_input_fn(owner)``, else
    ``owner.<fallback_attr>`` (Lightning's ``example_input_array``), else None (symbolic)."""
    if example_inputs is not None and example_input_fn is not None:
        raise ConfigError("pass example_inputs or example_input_fn, not both")
    x = example_inputs
    if x is None and example_input_fn is not None:
        x = example_input_fn(owner)
    if x is None and fallback_attr is not None:
        x = getattr(owner, fallback_attr, None)
    return _as_inputs(x)


def transform_attr(
    owner: nn.Module, attr: str | None, config: Any, inputs: tuple[Any, ...] | None, *, verify: bool = True
) -> TransformReport | None:
    """Transform ``owner.<attr>`` (``attr=None``: ``owner`` itself, in place) and put the
    result back. Returns the report, or None when it was already transformed."""
    target = get_target(owner, attr)
    if plan_of(target) is not None:
        return None
    if inputs is None:
        warnings.warn(
            "orthofx: no example inputs (example_inputs=, example_input_fn= or the module's "
            "example_input_array); the analysis falls back to symbolic fx tracing", stacklevel=3)
    else:
        inputs = _to_device(inputs, target)
    if attr is None:
        from orthofx.config import resolve_config

        cfg = resolve_config(config).replace(inplace=True)
        root, report = transform(owner, inputs, cfg, verify=verify)
        if root is not owner:
            raise ConfigError(
                f"orthofx would rewrite {type(owner).__name__}'s graph (raw torch.linalg meta-layers swapped for "
                "stable ones), which cannot replace the framework's module in place. Hold the network in an "
                "attribute (`self.model = ...`) and pass model_attr='model', or use stabilize=False")
    else:
        root, report = transform(target, inputs, config, verify=verify)
        set_target(owner, attr, root)
    log.info("%s", transform_summary(report, attr or type(owner).__name__))
    return report


def transform_summary(report: TransformReport, what: str) -> str:
    """One line for the framework's log: the config and the Pre-SVD layers it treated."""
    producers = ", ".join(p.param for p in report.plan.producers) or "no Pre-SVD layer found"
    return f"orthofx: transformed {what} with {report.plan.config.name!r}: {producers}"


class _ClosureFirst:
    """A step pre-hook that evaluates ``step(closure)``'s closure (forward + backward) and lets
    the step go on without it, so the hooks registered after it (orthofx's NOG/OLR) see the
    fresh gradient. Equivalent for optimizers that evaluate the closure once per step (SGD,
    Adam, ...); Lightning's automatic optimization passes such a closure."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise AttachError("orthofx's NOG/OLR cannot act inside LBFGS's repeated closure evaluations")
        self.handle = optimizer.register_step_pre_hook(self)

    def __call__(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        closure = kwargs.get("closure")
        if closure is None and len(args) > 1 and callable(args[1]):
            closure = args[1]
        if closure is None:
            return None
        with torch.enable_grad():
            closure()
        return tuple(a for a in args if a is not closure), {k: v for k, v in kwargs.items() if k != "closure"}

    def remove(self) -> None:
        self.handle.remove()


def attach_all(
    optimizers: Sequence[torch.optim.Optimizer], model: nn.Module, options: Mapping[str, Any], *,
    closure_first: bool = False,
) -> list[Any]:
    """``orthofx.attach`` on every optimizer that holds the producer parameters. Raises the
    AttachError of the last one when none does (with a single optimizer: its error).
    ``closure_first``: also evaluate a ``step(closure)`` closure before the treatments
    (:class:`_ClosureFirst`); its handles come first in the returned list (``remove()`` only)."""
    handles: list[Any] = []
    errors: list[AttachError] = []
    for opt in optimizers:
        first = _ClosureFirst(opt) if closure_first else None
        try:
            h = attach(opt, model, **dict(options))
        except AttachError as e:
            errors.append(e)
            if first is not None:
                first.remove()
            continue
        if not h.active:  # nothing to install (no NOG/OLR): keep no handle
            if first is not None:
                first.remove()
            continue
        handles.append(h)
        if first is not None:
            h._orthofx_closure_first = first  # removed with the handle (see detach_all)
    if errors and not handles and len(errors) == len(optimizers):
        raise errors[-1]
    return handles


def detach_all(handles: Iterable[Any]) -> None:
    """Remove what :func:`attach_all` installed."""
    for h in handles:
        first = getattr(h, "_orthofx_closure_first", None)
        if first is not None:
            first.remove()
        h.remove()


def plan_entry(model: nn.Module) -> dict[str, Any]:
    """The plan of a transformed model as plain data (``torch.load(weights_only=True)`` reads it)."""
    return {"version": ENTRY_VERSION, "plan": _checkpoint(model)["orthofx_plan"]}


def restore_plan(owner: nn.Module, attr: str | None, entry: Any) -> bool:
    """Make ``owner.<attr>`` carry the plan saved in ``entry`` (from :func:`plan_entry`), so that
    the checkpoint's state dict loads into it. Returns True when the saved plan was replayed
    (it differed from the live one), False when the live model already has it."""
    if not isinstance(entry, Mapping) or entry.get("version") != ENTRY_VERSION or "plan" not in entry:
        raise ConfigError(f"the checkpoint's {CHECKPOINT_KEY!r} entry is not an orthofx plan entry")
    current = get_target(owner, attr)
    if plan_of(current) is not None and plan_entry(current)["plan"] == entry["plan"]:
        return False
    try:
        saved = Plan.from_dict(dict(entry["plan"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"the checkpoint's orthofx plan is malformed: {type(e).__name__}: {e}") from None
    if attr is None:
        raise ConfigError(
            f"the checkpoint was saved with the plan {saved.config.name!r} on other producers than this "
            f"{type(owner).__name__} was transformed with; hold the network in an attribute (model_attr=) "
            "so that the saved plan can be replayed")
    warnings.warn(
        f"orthofx: the checkpoint's plan ({saved.config.name!r}: "
        f"{', '.join(p.param for p in saved.producers) or 'no producer'}) differs from the one built at setup; "
        "replaying the checkpoint's plan", stacklevel=3)
    if plan_of(current) is not None:
        from orthofx.export import strip

        current = strip(current)
    set_target(owner, attr, replay(current, saved))
    return True


def training_metrics(monitor: ConditioningMonitor | None, handles: Iterable[Any], prefix: str) -> dict[str, float]:
    """Flush the monitor (one host sync) and read the attach handles' counters: κ and the
    producer-weight statistics per layer (:func:`orthofx.monitor.record_metrics`), solver
    failures, NOG's zero/non-finite gradient counts and OLR's last η*/lr per producer."""
    out: dict[str, float] = {}
    if monitor is not None:
        latest: dict[str, dict[str, Any]] = {}
        for rec in monitor.flush():
            key = f"{rec['kind']}:{rec['layer']}"
            if key not in latest or rec["step"] >= latest[key]["step"]:
                latest[key] = rec
        for rec in latest.values():
            out.update({prefix + k: v for k, v in record_metrics(rec).items()})
    for i, h in enumerate(handles):
        tag = "" if i == 0 else f"{i}/"
        st = h.stats()
        for key in ("zero_grads", "nonfinite_grads"):
            if key in st:
                out[f"{prefix}{tag}nog/{key}"] = float(st[key])
        for key in ("eta", "lr"):
            for name, v in st.get(f"last_{key}", {}).items():
                out[f"{prefix}{tag}olr/{key}/{name}"] = float(v)
    return out


class CallbackOptions:
    """The options the framework callbacks share (Lightning's ``OrthofxCallback``, the Hugging
    Face ``OrthofxTrainerCallback``): which config, how to get example inputs, the monitor and
    its sinks, how often to log, the metric prefix, :func:`orthofx.attach`'s options and
    :func:`orthofx.transform`'s ``verify``; checked here, once for both."""

    def _init_options(
        self,
        config: Any,
        example_inputs: Any,
        example_input_fn: Callable[[nn.Module], Any] | None,
        monitor: bool | ConditioningMonitor | None,
        sinks: Sequence[Any],
        every: int | None,
        prefix: str,
        attach_options: Mapping[str, Any] | None,
        verify: bool,
    ) -> None:
        if example_inputs is not None and example_input_fn is not None:
            raise ConfigError("pass example_inputs or example_input_fn, not both")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string, got {type(prefix).__name__}")
        if attach_options is not None and not isinstance(attach_options, Mapping):
            raise ConfigError(f"attach_options must be a mapping of orthofx.attach keywords, got "
                              f"{type(attach_options).__name__}")
        self.config = config
        self.example_inputs = example_inputs
        self.example_input_fn = example_input_fn
        self._monitor_opt = monitor
        self.sinks = list(sinks)
        self.every = None if every is None else check_int(every, "every", min=1)
        self.prefix = prefix
        self.attach_options = dict(attach_options or {})
        self.verify = verify
        self.report: TransformReport | None = None
        self.handles: list[Any] = []
        self.monitor: ConditioningMonitor | None = None

    def _make_monitor(self, net: nn.Module, every: int) -> ConditioningMonitor | None:
        """The user's monitor, a new one on ``net`` (with the callback's sinks), or None (no
        monitor wanted, or it cannot be built: a warning). The monitor finds every meta-layer at
        the first training forward (orthofx modules and the user's own) and warns
        itself (:class:`~orthofx.monitor.MonitorWarning`) when there is nothing to monitor."""
        mon = self._monitor_opt
        if isinstance(mon, ConditioningMonitor):
            return mon
        if not mon:
            return None
        plan = plan_of(net)
        try:
            return ConditioningMonitor(net, every=every, run=plan.config.name if plan else "run", sinks=self.sinks)
        except ConfigError as e:  # a visible warning, not a log line nobody sees
            warnings.warn(f"orthofx: no conditioning monitor: {e}", MonitorWarning, stacklevel=3)
            return None
