r"""The mutating ``update`` form of orthofx 0.1 — deprecated, removed in 0.3.0. This module is
the one place that recognises it; delete it (and its three call sites) then.

The form: ``grads = t.update(grads, params, state, **ctx)`` — the state in the *third*
position, updated in place, only the gradients returned. The form that replaces it:
``updates, new_state = t.update(updates, state, params, ctx)``
(:class:`~orthofx.treatments.gradient.GradientTransformation`).

It reaches orthofx in two ways, each answered with a :class:`DeprecationWarning` that names
the new form:

* **calling** a built-in transform or chain the old way —
  :func:`is_legacy_call`: an instance of the transform's own state type in the third
  position and none in the second. :func:`~orthofx.treatments.gradient.base.pure_update`
  then runs the pure update, writes the new state back into the old one
  (:func:`write_back`) and returns the gradient list;
* **writing** a transform the old way and handing it to
  :func:`~orthofx.treatments.gradient.named_chain` / ``chain`` or ``attach(chain=)`` —
  :func:`is_legacy_transform`: its ``update`` takes fewer than four positional arguments,
  or its second and third are named ``params`` and ``state``. :func:`adapt` wraps it in the
  new form (the wrapper returns the mutated state object as the new state).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any, Mapping

from orthofx._deprecation import REMOVED_IN
from orthofx.errors import TreatmentError

__all__ = ["REMOVED_IN", "NEW_FORM", "is_legacy_call", "write_back", "is_legacy_transform", "adapt"]

#: the call form to write instead
NEW_FORM = "updates, new_state = t.update(updates, state, params, ctx)"
_OLD_FORM = "grads = t.update(grads, params, state, **ctx)"


def _warn(what: str, stacklevel: int) -> None:
    warnings.warn(
        f"{what}: the mutating form `{_OLD_FORM}` is deprecated and will be removed in orthofx "
        f"{REMOVED_IN}; use `{NEW_FORM}` (update returns the new state and never mutates the old one)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def is_legacy_call(state: Any, params: Any, state_types: type | tuple[type, ...]) -> bool:
    """Whether ``update(x, state, params, ...)`` was called the old way: the state (an instance
    of ``state_types``) came in ``params``' position and not in ``state``'s. Warns when so
    (``stacklevel=3``: the caller of the transform's ``update``)."""
    if isinstance(params, state_types) and not isinstance(state, state_types):
        _warn("gradient transform update", stacklevel=3)
        return True
    return False


def write_back(old: Any, new: Any) -> None:
    """Write the new state ``new`` into ``old`` in place (what the mutating form promised): a
    dataclass field by field, a :class:`~orthofx.treatments.gradient.ChainState` member by
    member; any other state type raises :class:`~orthofx.errors.TreatmentError`."""
    if old is new:
        return
    if isinstance(old, tuple) and hasattr(old, "names") and type(old) is type(new):  # a ChainState: per member
        for a, b in zip(old, new):
            write_back(a, b)
    elif dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            setattr(old, f.name, getattr(new, f.name))
    else:
        raise TreatmentError(
            f"update(grads, params, state): a state of type {type(old).__name__} cannot be updated in "
            f"place; use the pure form `{NEW_FORM}`"
        )


def is_legacy_transform(t: Any) -> bool:
    """Whether the transform ``t`` was written the old way (see the module): fewer than four
    positional parameters of ``t.update``, or ``(_, params, state, ...)``. An ``update`` taking
    ``*args``, or one whose signature cannot be read, counts as the new form."""
    try:
        sig = inspect.signature(t.update)
    except (TypeError, ValueError):
        return False
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return False
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(positional) < 4 or positional[1:3] == ["params", "state"]


def adapt(t: Any, where: str, *, stacklevel: int = 2) -> Any:
    """``t`` itself when written in the new form; else, with a DeprecationWarning (at the
    ``stacklevel``-th caller of ``adapt``), the transform that runs ``t.update(grads, params,
    state, **ctx)`` and returns ``(Updates(grads, lr so far), state)``."""
    if not is_legacy_transform(t):
        return t
    from orthofx.treatments.gradient.base import GradientTransformation, Updates, as_updates

    _warn(f"{where}: a gradient transform written as update(grads, params, state, **ctx)", stacklevel + 1)
    old_update = t.update

    def update(updates: Any, state: Any, params: Any = None, ctx: Mapping[str, Any] | None = None) -> Any:
        ups = as_updates(updates)
        grads = old_update(list(ups.grads), params, state, **dict(ctx or {}))
        return Updates(list(grads), ups.lr), state

    return GradientTransformation(t.init, update, t.sets_lr)
