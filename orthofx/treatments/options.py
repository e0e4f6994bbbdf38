"""What :func:`orthofx.treatments.attach` is given: producer specs and treatment options.

* :func:`resolve_producers` — tensors, ``(module, "weight")`` pairs, ``(name, tensor)`` pairs
  or a ``{name: spec}`` map → ``[(name, parameter)]``;
* :func:`parse_options` — a :class:`~orthofx.specs.GradientSpec` and the explicit keywords
  (its field names) → :class:`AttachOptions` (the spec checks every value, once);
* :func:`ow_producers` — which producers carry OW, and with which parametrization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import Tensor, nn
from torch.nn.utils import parametrize

from orthofx.errors import AttachError, ConfigError, TreatmentError
from orthofx.specs import CHAIN_KEYS, GradientSpec
from orthofx.treatments.gradient import GradientTransformation, default_chain, legacy
from orthofx.treatments.lr import LR_MODES
from orthofx.treatments.ow_target import is_soc, ow_parametrization

__all__ = ["AttachOptions", "parse_options", "resolve_producers", "check_producers", "ow_producers"]


# --------------------------------------------------------------------------- producers
def _resolve_one(spec: Any, i: int) -> tuple[str, Tensor]:
    if isinstance(spec, Tensor):
        return f"producer[{i}]", spec
    if isinstance(spec, tuple) and len(spec) == 2:
        a, b = spec
        if isinstance(a, nn.Module) and isinstance(b, str):
            return f"{type(a).__name__}.{b}", _module_param(a, b)
        if isinstance(a, str) and isinstance(b, Tensor):
            return a, b
        if isinstance(a, str) and isinstance(b, tuple):
            return a, _resolve_one(b, i)[1]
    raise AttachError(
        f"producer #{i}: expected a parameter tensor, a (module, 'weight') pair or a "
        f"(name, parameter) pair, got {type(spec).__name__}"
    )


def _module_param(module: nn.Module, name: str) -> Tensor:
    if parametrize.is_parametrized(module, name):
        # a parametrized weight is optimized through its unconstrained tensor
        return module.parametrizations[name].original
    t = getattr(module, name, None)
    if not isinstance(t, Tensor):
        raise AttachError(f"{type(module).__name__} has no tensor named {name!r}")
    return t


def resolve_producers(
    producers: "Mapping[str, Any] | Iterable[Any]",
) -> list[tuple[str, Tensor]]:
    """Normalise producer specs to ``[(name, parameter)]`` (duplicates removed, order kept).

    Accepted: a mapping ``{name: spec}`` or an iterable of specs, where a spec is a parameter
    tensor, a ``(module, "weight")`` pair (a parametrized weight resolves to
    ``module.parametrizations.weight.original``, the tensor the optimizer updates) or a
    ``(name, spec)`` pair (e.g. from ``named_parameters()``)."""
    if isinstance(producers, (Tensor, nn.Module)):
        raise AttachError("producers must be a list or mapping of parameters, not a single object")
    if isinstance(producers, Mapping):
        items = [(str(k), _resolve_one(v, i)[1]) for i, (k, v) in enumerate(producers.items())]
    else:
        items = [_resolve_one(s, i) for i, s in enumerate(producers)]
    seen: set[int] = set()
    out: list[tuple[str, Tensor]] = []
    for name, p in items:
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _ow_one(spec: Any) -> tuple[Tensor, str, nn.Module | None] | None:
    """(parameter, kind, parametrization) of a ``(module, name)`` spec that carries OW:
    kind ``"flat"`` (a weight matrix: expm/cayley) or ``"soc"``; None otherwise."""
    if isinstance(spec, tuple) and len(spec) == 2:
        a, b = spec
        if isinstance(a, nn.Module) and isinstance(b, str):
            po = ow_parametrization(a, b)
            if po is not None:
                return _module_param(a, b), "flat", po
            if is_soc(a, b):
                return _module_param(a, b), "soc", None
            return None
        if isinstance(a, str) and isinstance(b, tuple):
            return _ow_one(b)
    return None


def ow_producers(producers: "Mapping[str, Any] | Iterable[Any]") -> dict[int, tuple[str, nn.Module | None]]:
    """``{id(parameter): (kind, parametrization)}`` for the producers given as ``(module,
    "weight")`` pairs that carry OW (kind ``"flat"`` with its ``FlatOrthogonal``, or ``"soc"``
    with None). A producer given as a bare tensor is not recognised (the tensor does not
    know its module): the chain then acts on it as it is, i.e. on the generator."""
    specs = list(producers.values()) if isinstance(producers, Mapping) else list(producers)
    out: dict[int, tuple[str, nn.Module | None]] = {}
    for spec in specs:
        found = _ow_one(spec)
        if found is not None:
            out[id(found[0])] = (found[1], found[2])
    return out


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class AttachOptions:
    """The options of one attach: the :class:`~orthofx.specs.GradientSpec` (checked and
    defaulted there), the user's ``chain`` (None: the spec's :func:`default_chain`) and how
    the chain's lrs reach the optimizer (``lr_mode``, ``history``, ``max_history``)."""

    spec: GradientSpec
    lr_mode: str = "auto"
    history: bool = True
    max_history: int | None = None
    chain: GradientTransformation | None = None

    @property
    def custom(self) -> bool:
        return self.chain is not None

    @property
    def nog(self) -> bool:
        """NOG of the default chain (False with a custom chain)."""
        return self.spec.nog and not self.custom

    @property
    def olr(self) -> bool:
        """OLR of the default chain (False with a custom chain)."""
        return self.spec.olr and not self.custom

    @property
    def sets_lr(self) -> bool:
        """Whether the chain may set a per-producer lr (producers then get their own groups)."""
        return self.chain.sets_lr if self.chain is not None else self.spec.olr

    def transform(self) -> GradientTransformation:
        if self.chain is not None:
            return self.chain
        return default_chain(self.spec, history=self.history, max_history=self.max_history)


def parse_options(
    spec: "GradientSpec | Mapping[str, Any] | None" = None,
    *,
    lr_mode: str = "auto",
    history: bool = True,
    max_history: int | None = None,
    chain: GradientTransformation | None = None,
    **fields: Any,
) -> AttachOptions:
    """``spec`` with the explicit ``fields`` (:class:`~orthofx.specs.GradientSpec` field names,
    ``None`` = not given) applied: the one place attach's keywords meet a spec, which checks
    them. ``spec``: a GradientSpec, a mapping of its fields, an object carrying one as
    ``.gradients`` (``OrthoConfig``) or None (the defaults); a preset *name* is refused. With
    ``chain=`` the spec's NOG/OLR options are not used, and passing them as well is an error."""
    given = {k: v for k, v in fields.items() if v is not None}
    if chain is not None:
        if not isinstance(chain, GradientTransformation):
            raise ConfigError(f"attach: chain= must be a GradientTransformation, got {type(chain).__name__}")
        chain = legacy.adapt(chain, "attach(chain=)", stacklevel=3)  # the mutating form, until 0.3.0
        clash = [k for k in given if k in CHAIN_KEYS]
        if clash:
            raise ConfigError(
                f"attach: pass either chain= or {'/'.join(clash)}= (the chain replaces the default "
                "NOG/OLR chain); build the chain with orthofx.treatments.default_chain(...) pieces instead"
            )
    _check_lr_mode(lr_mode)
    try:
        base = GradientSpec.coerce(spec)
    except ConfigError as exc:
        raise ConfigError(f"attach: {exc}") from None
    return AttachOptions(spec=base.replace(**given), lr_mode=lr_mode, history=history,
                         max_history=max_history, chain=chain)


def _check_lr_mode(lr_mode: Any) -> None:
    if lr_mode not in LR_MODES:
        raise ConfigError(f"lr_mode={lr_mode!r}; use one of {LR_MODES}")


def check_producers(items: list[tuple[str, Tensor]], opts: AttachOptions) -> None:
    """Producers must be floating-point and require grad; NOG needs >= 2 dims."""
    if not items:
        raise AttachError("attach: no producer parameters were given")
    for name, p in items:
        if not p.is_floating_point():
            raise TreatmentError(
                f"producer {name!r} has dtype {p.dtype}; NOG/OLR need a floating-point weight"
            )
        if opts.nog and p.ndim < 2:
            raise TreatmentError(f"producer {name!r} has shape {tuple(p.shape)}; NOG needs a weight with >= 2 dims")
        if not p.requires_grad:
            raise AttachError(f"producer {name!r} does not require grad, so it is never updated")
