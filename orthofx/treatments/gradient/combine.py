"""Composing gradient transformations (as ``optax``'s ``combine``): :func:`named_chain`,
:func:`chain`, their state :class:`ChainState` (read by name or position), and
:func:`default_chain`, the chain a :class:`~orthofx.specs.GradientSpec` asks for."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from torch import Tensor

from orthofx.errors import ConfigError, TreatmentError
from orthofx.specs import GradientSpec
from orthofx.treatments.gradient import legacy
from orthofx.treatments.gradient.base import GradientTransformation, Updates, pure_update
from orthofx.treatments.gradient.transforms import guard, nog_transform, olr

__all__ = ["ChainState", "named_chain", "chain", "default_chain"]


class ChainState(tuple):
    """The state of a :func:`named_chain`: a tuple of the member states that is also read by
    name (``state["olr"]``, ``"olr" in state``, ``state.get("olr")``, ``state.names``)."""

    names: tuple[str, ...]

    def __new__(cls, names: Sequence[str], states: Sequence[Any]) -> "ChainState":
        self = super().__new__(cls, tuple(states))
        self.names = tuple(names)
        if len(self.names) != len(self):
            raise ConfigError("ChainState: one name per state is needed")
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy / pickle
        return (self.names, tuple(self))

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self.names.index(key))
            except ValueError:
                raise KeyError(f"no transform named {key!r} in this chain ({', '.join(self.names)})") from None
        return tuple.__getitem__(self, key)

    def __contains__(self, key: Any) -> bool:  # type: ignore[override]
        return key in self.names if isinstance(key, str) else tuple.__contains__(self, key)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.names else default

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(zip(self.names, tuple(self)))

    def replace(self, **states: Any) -> "ChainState":
        """A new ChainState with the named members replaced."""
        for k in states:
            if k not in self.names:
                raise KeyError(f"no transform named {k!r} in this chain ({', '.join(self.names)})")
        return ChainState(self.names, [states.get(n, s) for n, s in self.items()])

    def __repr__(self) -> str:
        return "ChainState(" + ", ".join(f"{n}={s!r}" for n, s in self.items()) + ")"


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Apply ``(name, transform)`` pairs in order (like ``optax.named_chain``).

    The state is a :class:`ChainState`: ``state["name"]`` is that transform's state. Each
    transform gets the :class:`Updates` of the one before (gradients and lr so far), the
    parameters and the context; a transform built with ``sets_lr=False`` keeps the lr so far
    (it may return ``Updates(grads)`` or a plain gradient list; returning another lr raises
    TreatmentError). ``sets_lr`` is true when any member sets an lr. A member written in the
    mutating form of orthofx 0.1 is adapted with a DeprecationWarning (until 0.3.0:
    :mod:`~orthofx.treatments.gradient.legacy`)."""
    return _named_chain(named, stacklevel=3)


def _named_chain(named: Sequence[tuple[str, GradientTransformation]], *, stacklevel: int) -> GradientTransformation:
    names: list[str] = []
    transforms: list[GradientTransformation] = []
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"named_chain: expected (name, GradientTransformation) pairs, got {item!r}")
        name, t = item
        if not isinstance(t, GradientTransformation):
            raise ConfigError(f"chain: expected GradientTransformation objects, got {type(t).__name__}")
        if name in names:
            raise ConfigError(f"named_chain: the name {name!r} is used twice")
        names.append(name)
        transforms.append(legacy.adapt(t, f"named_chain member {name!r}", stacklevel=stacklevel))
    sets_lr = any(t.sets_lr for t in transforms)

    def init(params: Sequence[Tensor]) -> ChainState:
        return ChainState(names, [t.init(params) for t in transforms])

    @pure_update(ChainState)
    def update(
        updates: Updates, state: ChainState, params: Sequence[Tensor] | None, ctx: Mapping[str, Any]
    ) -> tuple[Updates, ChainState]:
        if not isinstance(state, ChainState) or state.names != tuple(names):
            raise TreatmentError(f"chain.update: the state is not this chain's ({', '.join(names)})")
        new_states = []
        for name, t, s in zip(names, transforms, state):
            out = t.update(updates, s, params, ctx)
            if not (isinstance(out, tuple) and len(out) == 2 and not isinstance(out, Updates)):
                raise TreatmentError(f"chain: transform {name!r} must return (updates, new_state)")
            res, ns = out
            if not isinstance(res, Updates):
                res = Updates(list(res), updates.lr)
            if not t.sets_lr and res.lr is None:  # a transform that sets no lr keeps the lr so far
                res = res._replace(lr=updates.lr)
            if res.lr is not updates.lr and not t.sets_lr:
                raise TreatmentError(
                    f"chain: transform {name!r} returned a learning rate but was built with sets_lr=False"
                )
            if len(res.grads) != len(updates.grads):
                raise TreatmentError(
                    f"chain: transform {name!r} returned {len(res.grads)} gradients for {len(updates.grads)}"
                )
            updates = res
            new_states.append(ns)
        return updates, ChainState(names, new_states)

    return GradientTransformation(init, update, sets_lr)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order: :func:`named_chain` with the names ``"0", "1", …`` (the
    state is read by position, ``state[1]``, or by those names)."""
    return _named_chain([(str(i), t) for i, t in enumerate(transforms)], stacklevel=3)


def default_chain(
    spec: GradientSpec | None = None, *, history: bool = True, max_history: int | None = None, **fields: Any
) -> GradientTransformation:
    """The chain :func:`orthofx.treatments.attach` builds from a :class:`~orthofx.specs.GradientSpec`
    (``spec`` with ``fields`` — its field names: ``nog=True, nog_method="svd", olr=True`` —
    replacing its values; checked by the spec):
    ``("nog", nog(nog_method, scale=nog_scale, deficient=nog_deficient))`` — or
    ``("guard", guard())`` without NOG, so that non-finite gradients never reach a weight —
    then ``("olr", olr(history=..., max_history=...))`` with OLR."""
    spec = GradientSpec.coerce(spec).replace(**fields)
    parts: list[tuple[str, GradientTransformation]] = [("nog", nog_transform(spec)) if spec.nog else ("guard", guard())]
    if spec.olr:
        parts.append(("olr", olr(history=history, max_history=max_history)))
    return named_chain(*parts)
