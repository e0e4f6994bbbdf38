r"""The protocol of a gradient transformation (as ``optax``'s ``base``): :class:`Updates`,
:class:`GradientTransformation` and the call forms every transform of
:mod:`orthofx.treatments.gradient` accepts.

* ``state = t.init(params)`` — ``params`` is the list of producer parameters;
* ``updates, new_state = t.update(updates, state, params, ctx)`` — ``updates`` an
  :class:`Updates` ``(grads, lr)`` (a plain list of gradients is read as ``Updates(grads)``),
  ``ctx`` a mapping of context (``{"lrs": [...]}``);
* ``t.sets_lr`` — whether ``update`` may return a per-producer ``Updates.lr``.

:func:`pure_update` wraps a transform's pure ``update`` so that it also accepts context as
keywords and (deprecated, until 0.3.0: :mod:`~orthofx.treatments.gradient.legacy`) the
mutating form ``grads = t.update(grads, params, state, **ctx)`` of orthofx 0.1.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from orthofx.errors import TreatmentError
from orthofx.treatments.gradient.legacy import is_legacy_call, write_back

__all__ = ["GradientTransformation", "Updates", "as_updates", "pure_update", "Grads"]

Grads = list["Tensor | None"]


class Updates(NamedTuple):
    """What a transform returns (and the chain passes along): the gradients and, optionally,
    the learning rate of each producer (a (P,) tensor on the producers' device; ``None``
    keeps the optimizer's scheduled lr)."""

    grads: Grads
    lr: Tensor | None = None


def as_updates(x: "Updates | Sequence[Tensor | None]") -> Updates:
    """``x`` as :class:`Updates` (a plain gradient list gets ``lr=None``)."""
    if isinstance(x, Updates):
        return x
    if isinstance(x, Tensor):
        raise TreatmentError("gradient transforms act on a list of gradients, got a single tensor")
    return Updates(list(x), None)


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params, ctx) -> (updates, state)``.

    ``sets_lr``: the transform may return a per-producer lr (``Updates.lr``)."""

    init: Callable[[Sequence[Tensor]], Any]
    update: Callable[..., Any]
    sets_lr: bool = False


def counter_device(params: Sequence[Tensor]) -> torch.device:
    """Where a transform keeps its device counters: the first producer's device (CPU for none)."""
    return params[0].device if len(params) else torch.device("cpu")


def check_grad(g: Tensor, i: int, what: str) -> None:
    """Raise TreatmentError for a sparse or non-floating-point gradient #``i`` (``what`` names the transform)."""
    if g.is_sparse or g.layout != torch.strided:
        raise TreatmentError(f"{what}: gradient #{i} is sparse; only dense gradients are supported")
    if not g.is_floating_point():
        raise TreatmentError(f"{what}: gradient #{i} has dtype {g.dtype}; a floating-point gradient is needed")


def _ctx(ctx: Mapping[str, Any] | None, kw: dict[str, Any]) -> dict[str, Any]:
    if ctx is not None and not isinstance(ctx, Mapping):
        raise TreatmentError(f"update: ctx must be a mapping, got {type(ctx).__name__}")
    return {**(ctx or {}), **kw}


def pure_update(state_types: type | tuple[type, ...]) -> Callable[[Callable[..., tuple[Updates, Any]]], Callable[..., Any]]:
    """Wrap a pure ``update(updates, state, params, ctx) -> (Updates, state)``: also accept
    context as keywords and, with a DeprecationWarning, the mutating form
    ``update(grads, params, state, **ctx) -> grads`` (recognised by an instance of
    ``state_types`` in the third position: :func:`~orthofx.treatments.gradient.legacy.is_legacy_call`)."""

    def wrap(fn: Callable[..., tuple[Updates, Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def update(updates: Any, state: Any, params: Any = None, ctx: Mapping[str, Any] | None = None, **kw: Any) -> Any:
            if is_legacy_call(state, params, state_types):  # deprecated; removed in 0.3.0
                out, new = fn(as_updates(updates), params, state, _ctx(ctx, kw))
                write_back(params, new)
                return out.grads
            return fn(as_updates(updates), state, params, _ctx(ctx, kw))

        return update

    return wrap
