"""``OrthoConfig``: which treatments the pass applies, and the paper's named presets.

``OrthoConfig`` = a :class:`WeightSpec` (OW / SN / OL and their parameters) + a
:class:`GradientSpec` (the NOG / OLR chain) + an ``AnalysisConfig``. A preset is the short
form, named after the rows of the paper's tables: ``"svd"`` (nothing), ``"sn"``, ``"ol"``,
``"ow"``, ``"nog"``, ``"olr"`` and their ``+`` combinations such as ``"nog+ow+olr"``. At most
one *weight* treatment (OW, SN or OL) can be active. :func:`resolve_config` is the one place a
str / dict / config / None becomes an ``OrthoConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from orthofx._deprecation import warn_deprecated
from orthofx.checks import check_bool, check_choice, check_float, check_int, check_loss_weight  # noqa: F401
from orthofx.errors import ConfigError, OptionError
from orthofx.specs import GradientSpec, WeightSpec
from orthofx.vocab import WEIGHT_TREATMENTS

if TYPE_CHECKING:
    from orthofx.graph.config import AnalysisConfig

__all__ = ["OrthoConfig", "WeightSpec", "GradientSpec", "PRESETS", "DEFAULT_PRESET", "resolve_config",
           "CONFIG_KEYS", "check_bool", "check_float", "check_int", "check_choice", "check_loss_weight"]

#: The paper's table rows, in the order they appear there.
PRESETS: tuple[str, ...] = (
    "svd",
    "sn",
    "ol",
    "ow",
    "nog",
    "olr",
    "nog+sn",
    "nog+ol",
    "nog+ow",
    "nog+olr",
    "ow+olr",
    "nog+ow+olr",
)

#: The preset the integrations' callbacks use when none is given, and the one the docs start
#: from: ``"svd"`` — the stable exact gradient of raw meta-layers, the report and the κ monitor,
#: no change to any weight. Chosen by the evidence (docs/results.md, ``orthofx study``: paired
#: seeds, 95 % CIs): no treatment row has improved test error over SVD by more than the
#: study's resolution, and the NOG+OW rows were worse; the treatments stay one word away
#: (``"ow"`` for conditioning, see the README's preset advice).
DEFAULT_PRESET = "svd"

_WEIGHT_TOKENS = WEIGHT_TREATMENTS
_TOKENS = ("svd", "nog", "olr") + _WEIGHT_TOKENS


# The validators live in orthofx.checks and the two sections in orthofx.specs; both are
# re-exported here, where the experiment config, the CLI and older code import them from.


def _flat_name(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    return f.metadata.get("flat", f.name)


_SECTIONS: dict[str, type] = {"weights": WeightSpec, "gradients": GradientSpec}
#: flat keyword / dict name -> (section, field of that section), derived from the spec fields
_FLAT: dict[str, tuple[str, str]] = {
    _flat_name(f): (section, f.name) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}


def _put(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


class _Unset:
    """The default of :class:`OrthoConfig`'s flat keywords: not given, so the preset's value
    applies. One instance (``_UNSET``); its repr is what ``help()`` and IDEs show."""

    _instance: "_Unset | None" = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "unset (the preset's value)"

    def __reduce__(self) -> str:
        return "_UNSET"  # pickles as the module's singleton


_UNSET: Any = _Unset()


class LayerConfigs(Mapping[str, "OrthoConfig"]):
    """An immutable, hashable ``{name or glob pattern: OrthoConfig}`` (insertion order kept):
    :attr:`OrthoConfig.layer_configs`."""

    __slots__ = ("_items",)

    def __init__(self, items: "Mapping[str, OrthoConfig] | None" = None) -> None:
        self._items: dict[str, OrthoConfig] = dict(items or {})

    def __getitem__(self, key: str) -> "OrthoConfig":
        return self._items[key]

    def __iter__(self) -> Any:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v.name!r}' for k, v in self._items.items())}}}"


def _ignored_scope(value: Any) -> tuple[str, ...]:
    """A list/tuple of non-empty names or glob patterns (a single string is one entry)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise OptionError("ignored_scope", value, "must be a list of module names or glob patterns (strings)")
    return tuple(dict.fromkeys(v.strip() for v in value))


def _layer_configs(value: Any) -> LayerConfigs:
    """``{name or pattern: preset name | OrthoConfig | dict}`` → :class:`LayerConfigs`; a layer's
    config may not carry its own ``ignored_scope``/``layer_configs``."""
    if value is None:
        return LayerConfigs()
    if not isinstance(value, Mapping):
        raise OptionError("layer_configs", value, "must be a mapping {module name or glob pattern: preset or OrthoConfig}")
    out: dict[str, OrthoConfig] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k.strip():
            raise OptionError("layer_configs", k, "keys must be module names or glob patterns (non-empty strings)")
        try:
            cfg = resolve_config(v)
        except ConfigError as exc:
            raise ConfigError(f"layer_configs[{k!r}]: {exc}") from None
        if cfg.ignored_scope or cfg.layer_configs:
            raise ConfigError(f"layer_configs[{k!r}] has its own ignored_scope/layer_configs; a layer's config "
                              f"holds treatments only")
        out[k.strip()] = cfg
    return LayerConfigs(out)


def _analysis(value: Any) -> "AnalysisConfig | None":
    """None, an AnalysisConfig, or its dict form (``AnalysisConfig.to_dict()``)."""
    if value is None:
        return None
    from orthofx.graph.config import AnalysisConfig  # local: the graph package is heavier

    if isinstance(value, AnalysisConfig):
        return value
    if isinstance(value, Mapping):
        return AnalysisConfig.from_dict(value)
    raise OptionError("analysis", value, "must be an orthofx.graph.AnalysisConfig, its dict form, or None")


@dataclass(frozen=True, init=False)
class OrthoConfig:
    """What ``orthofx.transform`` does to each Pre-SVD layer it finds: a weight treatment
    (:class:`WeightSpec`) + a gradient chain (:class:`GradientSpec`) + the analysis options
    (:class:`orthofx.graph.AnalysisConfig`).

    Three equivalent ways to write one::

        OrthoConfig.from_preset("nog+ow+olr", ow_method="cayley")          # the short form
        OrthoConfig(weight="ow", ow_method="cayley", nog=True, olr=True)   # flat keywords
        OrthoConfig(weights=WeightSpec("ow", ow_method="cayley"),
                    gradients=GradientSpec(nog=True, olr=True))            # composed

    The flat keywords are the fields of the two specs (``WeightSpec.kind`` is written
    ``weight``), each defined, defaulted and checked once there; this signature, the
    accepted dict keys (:data:`CONFIG_KEYS`) and the read-only flat properties (``cfg.weight``
    = ``cfg.weights.kind``, ``cfg.ow_method``, ``cfg.nog``, ``cfg.ow_target``, ...) are derived
    from those fields. Flat keywords given together with their section override its fields
    (so ``dataclasses.replace(cfg, nog=True)`` works as before).

    Attributes:
        weights: the weight treatment and its parameters.
        gradients: the gradient chain (NOG, OLR) and its parameters.
        analysis: options of the graph analysis (leaf modules, extra meta-layers, ...), or
            ``None`` for the defaults; a dict is read with ``AnalysisConfig.from_dict``.
        stabilize: swap raw ``torch.linalg.eigh``/``svd`` meta-layers that decompose a
            covariance for orthofx's stable-gradient versions.
        inplace: rewrite the model itself instead of a deep copy.
        preset: the preset name this config was built from, if any (informational, not
            compared).
        ignored_scope: Pre-SVD layers left untreated: module names (``"features.0"``), their
            parameter names (``"features.0.weight"``), prefixes (``"layer1"`` covers
            ``"layer1.0.conv"``) or ``fnmatch`` glob patterns (``"layer*.conv1"``). An entry
            that matches no Pre-SVD layer found in the model raises :class:`ConfigError`.
        layer_configs: ``{name or pattern: preset | OrthoConfig | dict}``: the treatments
            (weights and gradients) of the matching Pre-SVD layers, instead of this config's
            (matched as ``ignored_scope``; an exact name wins over patterns, two patterns
            matching one layer or a layer both ignored and configured raise
            :class:`ConfigError`, as does an entry matching nothing). The analysis options and
            ``stabilize`` stay global. ``orthofx.attach`` installs NOG/OLR on the layers whose
            config has them (their gradient options must agree).
    """

    weights: WeightSpec
    gradients: GradientSpec
    analysis: "AnalysisConfig | None"
    stabilize: bool
    inplace: bool
    preset: str | None = field(compare=False)
    ignored_scope: tuple[str, ...]
    layer_configs: LayerConfigs

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the signature (help(), IDEs, errors for unknown or repeated names) is
        # _SIGNATURE, derived from the spec fields and _own_keywords (see below)
        given = _SIGNATURE.bind(*args, **kwargs).arguments
        own = {k: given.get(k, p.default) for k, p in _OWN_PARAMS.items()}
        for section, cls in _SECTIONS.items():
            mine = {_FLAT[k][1]: v for k, v in given.items() if k in _FLAT and _FLAT[k][0] == section}
            spec = own[section]
            if spec is None:
                spec = cls(**mine)
            else:  # flat fields given with their section refine it (so dataclasses.replace works)
                spec = _section(section, spec).replace(**mine)
            _put(self, section, spec)
        _put(self, "analysis", _analysis(own["analysis"]))
        _put(self, "stabilize", check_bool(own["stabilize"], "stabilize"))
        _put(self, "inplace", check_bool(own["inplace"], "inplace"))
        if own["preset"] is not None and not isinstance(own["preset"], str):
            raise OptionError("preset", own["preset"], "must be a preset name or None")
        _put(self, "preset", own["preset"])
        _put(self, "ignored_scope", _ignored_scope(own["ignored_scope"]))
        _put(self, "layer_configs", _layer_configs(own["layer_configs"]))

    # The flat read-only views (cfg.weight = cfg.weights.kind, cfg.nog = cfg.gradients.nog, ...)
    # are properties derived from the spec fields after the class (_add_flat_properties).

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "OrthoConfig":
        """Build the config of a paper row, e.g. ``OrthoConfig.from_preset("nog+ow+olr")``.

        Tokens joined by ``+`` in any order are accepted (``"olr+nog"`` == ``"nog+olr"``);
        unknown tokens raise :class:`ConfigError` listing the presets. ``overrides`` are flat
        fields (``ow_method="cayley"``) or sections, and win over the preset's choices.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"a preset name must be a non-empty string, got {name!r}")
        tokens = [t.strip().lower() for t in name.split("+")]
        unknown = [t for t in tokens if t not in _TOKENS]
        if unknown:
            close = difflib.get_close_matches(name.lower(), PRESETS, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"unknown preset {name!r} (unknown part(s): {', '.join(map(repr, unknown))}). "
                f"Presets: {', '.join(PRESETS)}.{hint}"
            )
        weights = [t for t in tokens if t in _WEIGHT_TOKENS]
        if len(weights) > 1:
            raise ConfigError(
                f"preset {name!r} combines weight treatments {weights}; at most one of OW, SN, OL applies"
            )
        if "svd" in tokens and len(set(tokens)) > 1:
            raise ConfigError(f"preset {name!r}: 'svd' means no treatment and cannot be combined")
        canonical = "+".join(t for t in ("nog", "sn", "ol", "ow", "olr") if t in tokens) or "svd"
        _check_names(overrides, "from_preset override")
        kwargs: dict[str, Any] = {"preset": canonical}
        if "weights" not in overrides:
            kwargs["weight"] = weights[0] if weights else None
        if "gradients" not in overrides:
            kwargs.update(nog="nog" in tokens, olr="olr" in tokens)
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------ views
    @property
    def treatments(self) -> tuple[str, ...]:
        """Active treatments as paper tokens, e.g. ``("nog", "ow", "olr")``."""
        out = []
        if self.nog:
            out.append("nog")
        if self.weight:
            out.append(self.weight)
        if self.olr:
            out.append("olr")
        return tuple(out)

    @property
    def name(self) -> str:
        """The canonical preset-style name of this config (``"svd"`` when nothing is on)."""
        return "+".join(self.treatments) or "svd"

    def replace(self, **changes: Any) -> "OrthoConfig":
        """A copy with ``changes`` (flat fields or sections) applied; unknown names raise
        :class:`ConfigError`."""
        _check_names(changes, "replace()")
        kw = {k: getattr(self, k) for k in _OWN_PARAMS if k not in changes}
        kw.update(changes)  # flat fields refine their section (the constructor's rule)
        return type(self)(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable composed form: ``{"weights": {...}, "gradients": {...},
        "analysis": AnalysisConfig.to_dict() | None, "stabilize", "inplace", "preset"}``, plus
        ``"ignored_scope": [...]`` and ``"layer_configs": {name: to_dict()}`` when they are set
        (omitted when empty, so configs without per-layer choices keep the older form)."""
        out = {
            "weights": dataclasses.asdict(self.weights),
            "gradients": dataclasses.asdict(self.gradients),
            "analysis": self.analysis.to_dict() if self.analysis is not None else None,
            "stabilize": self.stabilize,
            "inplace": self.inplace,
            "preset": self.preset,
        }
        if self.ignored_scope:
            out["ignored_scope"] = list(self.ignored_scope)
        if self.layer_configs:
            out["layer_configs"] = {k: v.to_dict() for k, v in self.layer_configs.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OrthoConfig":
        """Inverse of :meth:`to_dict`; the flat form (``{"weight": "ow", "nog": true}``) is read
        as well. Strict: an unknown key (top level or inside a section) raises
        :class:`ConfigError` naming it and the allowed keys; values are checked like the
        constructor's (booleans accept ``"true"``/``"false"``, numbers must be numbers)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"an OrthoConfig dict must be a mapping, got {type(d).__name__}")
        _check_names(d, "OrthoConfig.from_dict")
        return cls(**{str(k): v for k, v in d.items()})


def _own_keywords(
    stabilize: bool = True,
    inplace: bool = False,
    analysis: AnalysisConfig | Mapping[str, Any] | None = None,
    preset: str | None = None,
    *,
    weights: WeightSpec | Mapping[str, Any] | None = None,
    gradients: GradientSpec | Mapping[str, Any] | None = None,
    ignored_scope: list[str] | tuple[str, ...] | None = None,
    layer_configs: Mapping[str, OrthoConfig | str | Mapping[str, Any]] | None = None,
) -> None:
    """The keywords of :class:`OrthoConfig` that are not section fields, with what they accept
    and their defaults (the flat keywords are the fields of WeightSpec and GradientSpec)."""


_OWN_PARAMS: dict[str, inspect.Parameter] = dict(inspect.signature(_own_keywords).parameters)
#: the keywords that may also be given by position, in the order of orthofx 0.1's signature
_POSITIONAL = ("weight", "ow_method", "ol_weight", "sn_method", "sn_power_iterations", "nog", "nog_method", "olr",
               "stabilize", "inplace", "analysis", "preset")


def _flat_parameter(name: str, kind: Any) -> inspect.Parameter:
    section, fname = _FLAT[name]
    return inspect.Parameter(name, kind, default=_UNSET, annotation=_SECTIONS[section].__dataclass_fields__[fname].type)


def _signature() -> inspect.Signature:
    """OrthoConfig's signature: the flat keywords (one per spec field, default: unset, i.e. the
    preset's value) and the own keywords; the first twelve also positional."""
    pos, kw = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    params = [_flat_parameter(n, pos) if n in _FLAT else _OWN_PARAMS[n].replace(kind=pos) for n in _POSITIONAL]
    params += [_flat_parameter(n, kw) for n in _FLAT if n not in _POSITIONAL]
    params += [p.replace(kind=kw) for n, p in _OWN_PARAMS.items() if n not in _POSITIONAL]
    return inspect.Signature(params, return_annotation=None)


_SIGNATURE = _signature()
OrthoConfig.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
#: every name the constructor, from_preset overrides, replace() and from_dict accept
CONFIG_KEYS: tuple[str, ...] = tuple(_FLAT) + tuple(_OWN_PARAMS)


def _add_flat_properties() -> None:
    """``cfg.<flat name>``: the read-only view of its section's field (``cfg.weight`` is
    ``cfg.weights.kind``, ``cfg.nog`` is ``cfg.gradients.nog``), one per spec field."""
    for flat, (section, fname) in _FLAT.items():
        doc = f"{_SECTIONS[section].__name__}.{fname} (read-only; set it with replace())."
        setattr(OrthoConfig, flat, property(lambda self, s=section, f=fname: getattr(getattr(self, s), f), doc=doc))


_add_flat_properties()


def _section(name: str, value: Any) -> Any:
    """A section given as its spec or as a mapping of its fields (strict keys)."""
    cls = _SECTIONS[name]
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in OrthoConfig {name!r}; allowed keys: {', '.join(allowed)}")
        return cls(**value)
    raise OptionError(name, value, f"must be a {cls.__name__} or a mapping of its fields")


def _check_names(kwargs: Mapping[str, Any], what: str) -> None:
    unknown = sorted(str(k) for k in kwargs if k not in CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{what}: unknown OrthoConfig key {unknown[0]!r}"
                          + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
                          + f"; allowed keys: {', '.join(CONFIG_KEYS)}")


def resolve_config(config: "OrthoConfig | str | Mapping[str, Any] | None") -> OrthoConfig:
    """The one place a user's ``config`` becomes an :class:`OrthoConfig`: None → the
    ``"svd"`` defaults, a preset name (:meth:`OrthoConfig.from_preset`), a dict
    (:meth:`OrthoConfig.from_dict`, strict) or an ``OrthoConfig`` as it is; anything else
    raises :class:`ConfigError`."""
    if config is None:
        return OrthoConfig(preset="svd")
    if isinstance(config, OrthoConfig):
        return config
    if isinstance(config, str):
        return OrthoConfig.from_preset(config)
    if isinstance(config, Mapping):
        return OrthoConfig.from_dict(config)
    raise ConfigError(
        f"config must be an OrthoConfig, a preset name or a dict, got {type(config).__name__}"
    )


#: earlier names of this module -> their new name (each still resolves, with a DeprecationWarning)
_DEPRECATED = {"check_weight": "check_loss_weight"}


def __getattr__(name: str) -> Any:
    new = _DEPRECATED.get(name)
    if new is None:
        raise AttributeError(f"module 'orthofx.config' has no attribute {name!r}")
    warn_deprecated(f"orthofx.config.{name}", f"orthofx.config.{new} (a loss multiplier check; a weight tensor is "
                    f"checked by orthofx.treatments._common.check_weight)", stacklevel=2)
    return globals()[new]
