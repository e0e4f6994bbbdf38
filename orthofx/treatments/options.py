"""What :func:`orthofx.treatments.attach` is given: producer specs and treatment options.

* :func:`resolve_producers` — tensors, ``(module, "weight")`` pairs, ``(name, tensor)`` pairs
  or a ``{name: spec}`` map → ``[(name, parameter)]``;
* :func:`parse_options` — a config (any object with attributes ``nog``, ``olr``,
  ``nog_method``, ``nog_scale``, ``nog_deficient``, ``ow_target``, e.g. an ``OrthoConfig``, or a mapping with those keys) and
  the explicit keywords → :class:`AttachOptions` (plain values; this module imports no config
  class);
* :func:`ow_producers` — which producers carry OW, and with which parametrization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import Tensor, nn
from torch.nn.utils import parametrize

from orthofx.errors import AttachError, ConfigError, TreatmentError
from orthofx.treatments._common import POLAR_METHODS
from orthofx.treatments.gradient import GradientTransformation, choice, default_chain
from orthofx.treatments.lr import LR_MODES
from orthofx.vocab import NOG_DEFICIENT, NOG_SCALES
from orthofx.treatments.ow_target import DEFAULT_TARGET, OW_TARGETS, is_soc, ow_parametrization

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
    """The resolved options of one attach. ``chain`` is the user's chain, or None for the
    default chain built from ``nog``/``olr``/``nog_method``/``nog_scale``/``nog_deficient``
    (:meth:`transform`)."""

    nog: bool
    olr: bool
    nog_method: str
    lr_mode: str
    history: bool = True
    max_history: int | None = None
    chain: GradientTransformation | None = None
    ow_target: str | None = None
    nog_scale: str = "unit"
    nog_deficient: str = "partial"

    def target(self) -> str:
        """What NOG/OLR act on for OW producers: the explicit ``ow_target``, else
        ``"generator"`` (:data:`~orthofx.treatments.ow_target.DEFAULT_TARGET`, as the authors' code)."""
        return self.ow_target if self.ow_target is not None else DEFAULT_TARGET

    @property
    def custom(self) -> bool:
        return self.chain is not None

    @property
    def sets_lr(self) -> bool:
        """Whether the chain may set a per-producer lr (producers then get their own groups)."""
        return self.chain.sets_lr if self.chain is not None else self.olr

    def transform(self) -> GradientTransformation:
        if self.chain is not None:
            return self.chain
        return default_chain(
            nog=self.nog, olr=self.olr, nog_method=self.nog_method,
            history=self.history, max_history=self.max_history,
            nog_scale=self.nog_scale, nog_deficient=self.nog_deficient,
        )


def read_option(config: Any, key: str, explicit: Any, default: Any) -> Any:
    """``explicit`` if given, else ``config[key]`` / ``config.key``, else ``default``."""
    if explicit is not None:
        return explicit
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def parse_options(
    config: Any = None,
    *,
    nog: bool | None = None,
    olr: bool | None = None,
    nog_method: str | None = None,
    lr_mode: str = "auto",
    history: bool = True,
    max_history: int | None = None,
    chain: GradientTransformation | None = None,
    ow_target: str | None = None,
    nog_scale: str | None = None,
    nog_deficient: str | None = None,
) -> AttachOptions:
    """Validate and combine ``config`` with the explicit keywords (which win).

    ``config`` is a plain-value source: ``None``, a mapping, or an object with attributes
    (``OrthoConfig``). A preset *name* is not resolved here (that would tie the treatments to
    the top-level config module): pass ``orthofx.config.resolve_config(name)``. With
    ``chain=`` the config's ``nog``/``olr``/``nog_method``/``nog_scale``/``nog_deficient`` are
    not used, and passing them explicitly as well is an error. ``nog_scale`` and
    ``nog_deficient`` are checked here (ConfigError naming the field), with NOG on also
    against ``nog_method`` (``"full"`` needs "svd" or "auto")."""
    if isinstance(config, str):
        raise ConfigError(
            f"attach: config={config!r} is a preset name; pass the config itself "
            f"(orthofx.config.resolve_config({config!r})), a mapping, or nog=/olr= keywords"
        )
    if chain is not None:
        if not isinstance(chain, GradientTransformation):
            raise ConfigError(f"attach: chain= must be a GradientTransformation, got {type(chain).__name__}")
        given = [k for k, v in (("nog", nog), ("olr", olr), ("nog_method", nog_method), ("nog_scale", nog_scale),
                                ("nog_deficient", nog_deficient)) if v is not None]
        if given:
            raise ConfigError(
                f"attach: pass either chain= or {'/'.join(given)}= (the chain replaces the default "
                "NOG/OLR chain); build the chain with orthofx.treatments.default_chain(...) pieces instead"
            )
        _check_lr_mode(lr_mode)
        return AttachOptions(nog=False, olr=chain.sets_lr, nog_method="auto", lr_mode=lr_mode,
                             history=history, max_history=max_history, chain=chain,
                             ow_target=_check_target(ow_target))
    use_nog = bool(read_option(config, "nog", nog, False))
    use_olr = bool(read_option(config, "olr", olr, False))
    method = read_option(config, "nog_method", nog_method, "auto")
    if use_nog and method not in POLAR_METHODS:
        raise ConfigError(f"nog_method={method!r}; use one of {POLAR_METHODS}")
    scale = _check_choice(read_option(config, "nog_scale", nog_scale, "unit"), "nog_scale", NOG_SCALES)
    deficient = _check_choice(read_option(config, "nog_deficient", nog_deficient, "partial"), "nog_deficient",
                              NOG_DEFICIENT)
    if use_nog and deficient == "full" and method not in ("auto", "svd"):
        raise ConfigError(
            f"nog_deficient='full' with nog_method={method!r}: only an SVD returns the null-space basis the "
            "lift needs; use nog_method='svd' or 'auto' (runs the SVD: one host sync per step on CUDA), "
            "or nog_deficient='partial'"
        )
    _check_lr_mode(lr_mode)
    target = _check_target(read_option(config, "ow_target", ow_target, None))
    return AttachOptions(nog=use_nog, olr=use_olr, nog_method=method, lr_mode=lr_mode,
                         history=history, max_history=max_history, ow_target=target,
                         nog_scale=scale, nog_deficient=deficient)


def _check_choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    return choice(value, field, allowed)


def _check_target(target: Any) -> str | None:
    if target is None:
        return None
    if hasattr(target, "value") and not isinstance(target, str):  # an Enum member
        target = target.value
    if target not in OW_TARGETS:
        raise ConfigError(f"ow_target={target!r}; use one of {OW_TARGETS}")
    return str(target)


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
