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
import math
import numbers
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping

from orthofx.errors import ConfigError, OptionError
from orthofx.vocab import (
    NOG_DEFICIENT, NOG_SCALES, OW_GENERATORS, OW_METHOD_NAMES, OW_TARGETS, POLAR_METHODS, SN_METHODS,
    WEIGHT_TREATMENTS,
)

if TYPE_CHECKING:
    from orthofx.graph.config import AnalysisConfig

__all__ = ["OrthoConfig", "WeightSpec", "GradientSpec", "PRESETS", "DEFAULT_PRESET", "resolve_config"]

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


# ---------------------------------------------------------------------------- validators
# Shared by OrthoConfig, the experiment config and the CLI: every failure is an OptionError
# (a ConfigError) naming the field and the value. Booleans accept bool and the strings
# "true"/"false" (any case); numbers accept int/float only (never bool, never strings: a
# quoted number in a JSON/TOML file is refused with the field named).


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: ``True``/``False`` or the strings ``"true"``/``"false"`` (any
    case, surrounding blanks ignored); anything else (``"yes"``, ``1``, ``"0"``, None)
    raises :class:`OptionError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise OptionError(name, value, "must be a boolean (true or false)")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    min_inclusive: bool = True,
    max: float | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float in ``[min, max]`` (``(min, max]`` when not
    ``min_inclusive``); ``None`` passes when ``optional``. Strings, bools, NaN and ±inf
    raise :class:`OptionError`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        raise OptionError(name, value, "must be a number, not a string (write it without quotes)")
    if not _is_number(value):
        raise OptionError(name, value, "must be a number")
    v = float(value)
    if not math.isfinite(v):
        raise OptionError(name, value, "must be finite")
    if min is not None and (v < min or (v == min and not min_inclusive)):
        raise OptionError(name, value, f"must be {'>=' if min_inclusive else '>'} {min:g}")
    if max is not None and v > max:
        raise OptionError(name, value, f"must be <= {max:g}")
    return v


def check_int(
    value: Any, name: str, *, min: int | None = None, max: int | None = None, optional: bool = False
) -> int | None:
    """``value`` as an int in ``[min, max]``; an integral float (``2.0``) is accepted,
    ``2.7``, bools, strings and non-finite values raise :class:`OptionError`. ``None`` passes
    when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        raise OptionError(name, value, "must be an integer, not a string (write it without quotes)")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = int(value)
    elif _is_number(value) and math.isfinite(float(value)) and float(value).is_integer():
        v = int(value)
    else:
        raise OptionError(name, value, "must be an integer")
    if min is not None and v < min:
        raise OptionError(name, value, f"must be >= {min}")
    if max is not None and v > max:
        raise OptionError(name, value, f"must be <= {max}")
    return v


def check_choice(value: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices`` (compared by equality, type included), else
    :class:`OptionError` listing them."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise OptionError(name, value, f"must be one of {', '.join(map(repr, choices))}")
    return value


def check_weight(value: Any, name: str = "weight") -> float:
    """A loss multiplier: a finite float >= 0 (``orthogonality_loss(gm, weight=...)``,
    ``ol_weight``); raises :class:`OptionError` otherwise."""
    return check_float(value, name, min=0.0)  # type: ignore[return-value]


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """A method/treatment name from :mod:`orthofx.vocab` (a str enum member is accepted and
    stored as its plain value)."""
    if isinstance(value, Enum) and isinstance(value.value, str):
        value = value.value
    return check_choice(value, name, choices)


def _put(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class WeightSpec:
    """The weight treatment of a config: at most one of OW, SN, OL, with its parameters.

    Attributes:
        kind: ``None``, ``"ow"`` (orthogonal weight W = exp(A − Aᵀ) on the flattened
            (out, in·k·k) weight), ``"sn"`` (W / σ_max(W)) or ``"ol"`` (loss ‖WWᵀ − I‖_F).
        ow_method: ``"expm"`` (the paper's matrix exponential), ``"cayley"``
            ((I − S/2)⁻¹(I + S/2), cheaper for wide weights) or ``"soc"`` (the authors' code:
            skew-orthogonal convolution, an orthogonal conv operator with a new random
            generator; only Conv2d producers with an odd square kernel, padding k//2,
            groups 1 and dilation 1 (any channels; stride by invertible downsampling) —
            any other producer raises TreatmentError; ``strip`` refuses it).
        ow_generator: for ``"expm"``/``"cayley"``: ``"free"`` (W = f(S) Y₀ with S = a Y₀ᵀ − Y₀ aᵀ
            unconstrained, a = 0 at registration) or ``"normalized"`` (W = f(ρ S/σ̂(S)) Y₀, the
            authors' SOC normalisation applied to the flat map: a random nonzero start, and W
            does not depend on ‖a‖). SOC is always normalised.
        ow_radius: ρ of the normalised generators (SOC, ``ow_generator="normalized"``):
            ‖M‖₂ = ρ; the authors' 0.7. A float in (0, 3].
        soc_terms: Taylor terms T of SOC's exp(M)x ≈ Σ_{j≤T} M^j x/j! in training (the
            authors' 5); ``soc_eval_terms`` in eval (their 10). The deviation from an
            orthogonal operator is ≤ 2ε + ε², ε = ρ^{T+1}/(T+1)! (3.3e-4 at ρ = 0.7, T = 5;
            1.0e-9 at T = 10).
        sn_method: ``"exact"`` (σ_max from ``svdvals`` every forward: σ_max(W) = 1 to
            rounding) or ``"power"`` (torch's power-iteration spectral norm).
        sn_power_iterations: power iterations per forward for ``sn_method="power"`` (int ≥ 1).
        ol_weight: λ of the orthogonality loss λ·Σ‖WWᵀ − I‖_F (finite float ≥ 0).

    Errors name the flat field (``weight``, ``ow_method``, ``ol_weight``, ...).
    """

    kind: str | None = None
    ow_method: str = "expm"
    ow_generator: str = "free"
    ow_radius: float = 0.7
    soc_terms: int = 5
    soc_eval_terms: int = 10
    sn_method: str = "exact"
    sn_power_iterations: int = 1
    ol_weight: float = 1e-2

    def __post_init__(self) -> None:
        kind = self.kind.value if isinstance(self.kind, Enum) else self.kind
        if kind is not None and not (isinstance(kind, str) and kind in WEIGHT_TREATMENTS):
            raise OptionError("weight", self.kind, f"not a weight treatment; use one of {WEIGHT_TREATMENTS} or None")
        _put(self, "kind", kind)
        _put(self, "ow_method", _choice(self.ow_method, "ow_method", OW_METHOD_NAMES))
        _put(self, "ow_generator", _choice(self.ow_generator, "ow_generator", OW_GENERATORS))
        _put(self, "ow_radius", check_float(self.ow_radius, "ow_radius", min=0.0, min_inclusive=False, max=3.0))
        _put(self, "soc_terms", check_int(self.soc_terms, "soc_terms", min=1, max=64))
        _put(self, "soc_eval_terms", check_int(self.soc_eval_terms, "soc_eval_terms", min=1, max=64))
        _put(self, "sn_method", _choice(self.sn_method, "sn_method", SN_METHODS))
        _put(self, "sn_power_iterations", check_int(self.sn_power_iterations, "sn_power_iterations", min=1))
        _put(self, "ol_weight", check_weight(self.ol_weight, "ol_weight"))


@dataclass(frozen=True)
class GradientSpec:
    """The gradient chain of a config (installed by :func:`orthofx.attach`).

    Attributes:
        nog: replace each producer's weight gradient G by the polar factor U Vᵀ of its
            flattened (out, in·k·k) gradient (nearest orthogonal gradient).
        nog_method: ``orthofx.linalg.polar`` method. ``"auto"`` (default): Polar Express
            + 5 polish steps on CUDA (no host sync; ≤ 2e-5 from U Vᵀ for σ_min ≥ 1.5e-4‖G‖_F),
            float64 Gram ``"eigh"`` on the CPU; ``"svd"`` is the paper's literal U Vᵀ
            (synchronises on CUDA).
        nog_scale: ``"unit"`` (default, the paper: U Vᵀ, every step of size √rank) or
            ``"frobenius"`` (U Vᵀ rescaled to ‖G‖_F: NOG's direction with SGD's step size).
        nog_deficient: a rank-deficient G: ``"partial"`` (default: the partial isometry
            U_r V_rᵀ, null directions stay 0) or ``"full"`` (the authors' ``s[:] = 1``: the full
            thin SVD's U Vᵀ, null directions lifted to 1 along the SVD's own basis).
        olr: per-step optimal learning rate η* = (wᵀw·lᵀw)/(wᵀw·lᵀl + 2(lᵀw)²), used when
            0 < η* < the scheduled lr.
        ow_target: what NOG/OLR act on when OW re-parametrizes the weight: ``"generator"``
            (the trained parameter of the OW map, as the authors' code does; the default) or
            ``"weight"`` (the orthogonal W the layer uses: a Riemannian step on W, pulled back
            to the generator exactly); ``None`` = the treatments' default (``"generator"``).
    """

    nog: bool = False
    nog_method: str = "auto"
    nog_scale: str = "unit"
    nog_deficient: str = "partial"
    olr: bool = False
    ow_target: str | None = None

    def __post_init__(self) -> None:
        _put(self, "nog", check_bool(self.nog, "nog"))
        _put(self, "olr", check_bool(self.olr, "olr"))
        _put(self, "nog_method", _choice(self.nog_method, "nog_method", POLAR_METHODS))
        _put(self, "nog_scale", _choice(self.nog_scale, "nog_scale", NOG_SCALES))
        _put(self, "nog_deficient", _choice(self.nog_deficient, "nog_deficient", NOG_DEFICIENT))
        if self.ow_target is not None:
            _put(self, "ow_target", _choice(self.ow_target, "ow_target", OW_TARGETS))


#: flat keyword / dict name -> (section, field of that section)
_FLAT: dict[str, tuple[str, str]] = {
    "weight": ("weights", "kind"),
    "ow_method": ("weights", "ow_method"),
    "ow_generator": ("weights", "ow_generator"),
    "ow_radius": ("weights", "ow_radius"),
    "soc_terms": ("weights", "soc_terms"),
    "soc_eval_terms": ("weights", "soc_eval_terms"),
    "ol_weight": ("weights", "ol_weight"),
    "sn_method": ("weights", "sn_method"),
    "sn_power_iterations": ("weights", "sn_power_iterations"),
    "nog": ("gradients", "nog"),
    "nog_method": ("gradients", "nog_method"),
    "nog_scale": ("gradients", "nog_scale"),
    "nog_deficient": ("gradients", "nog_deficient"),
    "olr": ("gradients", "olr"),
    "ow_target": ("gradients", "ow_target"),
}
_SECTIONS: dict[str, type] = {"weights": WeightSpec, "gradients": GradientSpec}
_OWN = ("stabilize", "inplace", "analysis", "preset", "ignored_scope", "layer_configs")
#: every name the constructor, from_preset overrides, replace() and from_dict accept
CONFIG_KEYS: tuple[str, ...] = tuple(_FLAT) + tuple(_SECTIONS) + _OWN


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

    Flat keywords given together with their section override its fields (so
    ``dataclasses.replace(cfg, nog=True)`` works as before). The flat names
    are read-only properties: ``cfg.weight`` (= ``cfg.weights.kind``), ``cfg.ow_method``,
    ``cfg.ol_weight``, ``cfg.sn_method``, ``cfg.sn_power_iterations``, ``cfg.nog``,
    ``cfg.nog_method``, ``cfg.olr``, ``cfg.ow_target`` (see the two specs for their meaning).

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

    def __init__(
        self,
        weight: str | None = _UNSET,
        ow_method: str = _UNSET,
        ol_weight: float = _UNSET,
        sn_method: str = _UNSET,
        sn_power_iterations: int = _UNSET,
        nog: bool = _UNSET,
        nog_method: str = _UNSET,
        olr: bool = _UNSET,
        stabilize: bool = True,
        inplace: bool = False,
        analysis: "AnalysisConfig | Mapping[str, Any] | None" = None,
        preset: str | None = None,
        *,
        ow_target: str | None = _UNSET,
        ow_generator: str = _UNSET,
        ow_radius: float = _UNSET,
        soc_terms: int = _UNSET,
        soc_eval_terms: int = _UNSET,
        nog_scale: str = _UNSET,
        nog_deficient: str = _UNSET,
        weights: WeightSpec | Mapping[str, Any] | None = None,
        gradients: GradientSpec | Mapping[str, Any] | None = None,
        ignored_scope: "list[str] | tuple[str, ...] | None" = None,
        layer_configs: "Mapping[str, OrthoConfig | str | Mapping[str, Any]] | None" = None,
    ) -> None:
        flat = {k: v for k, v in (("weight", weight), ("ow_method", ow_method), ("ol_weight", ol_weight),
                                  ("sn_method", sn_method), ("sn_power_iterations", sn_power_iterations),
                                  ("nog", nog), ("nog_method", nog_method), ("olr", olr),
                                  ("ow_target", ow_target), ("ow_generator", ow_generator),
                                  ("ow_radius", ow_radius), ("soc_terms", soc_terms),
                                  ("soc_eval_terms", soc_eval_terms), ("nog_scale", nog_scale),
                                  ("nog_deficient", nog_deficient)) if v is not _UNSET}
        given = {"weights": weights, "gradients": gradients}
        for section, cls in _SECTIONS.items():
            mine = {_FLAT[k][1]: v for k, v in flat.items() if _FLAT[k][0] == section}
            spec = given[section]
            if spec is None:
                spec = cls(**mine)
            else:  # flat fields given with their section refine it (so dataclasses.replace works)
                spec = _section(section, spec)
                if mine:
                    spec = dataclasses.replace(spec, **mine)
            _put(self, section, spec)
        _put(self, "analysis", _analysis(analysis))
        _put(self, "stabilize", check_bool(stabilize, "stabilize"))
        _put(self, "inplace", check_bool(inplace, "inplace"))
        if preset is not None and not isinstance(preset, str):
            raise OptionError("preset", preset, "must be a preset name or None")
        _put(self, "preset", preset)
        _put(self, "ignored_scope", _ignored_scope(ignored_scope))
        _put(self, "layer_configs", _layer_configs(layer_configs))

    # ------------------------------------------------------------------ flat, read-only views
    weight = property(lambda self: self.weights.kind, doc="The weight treatment: None, 'ow', 'sn' or 'ol'.")
    ow_method = property(lambda self: self.weights.ow_method, doc="WeightSpec.ow_method.")
    ol_weight = property(lambda self: self.weights.ol_weight, doc="WeightSpec.ol_weight.")
    sn_method = property(lambda self: self.weights.sn_method, doc="WeightSpec.sn_method.")
    sn_power_iterations = property(lambda self: self.weights.sn_power_iterations,
                                   doc="WeightSpec.sn_power_iterations.")
    nog = property(lambda self: self.gradients.nog, doc="GradientSpec.nog.")
    nog_method = property(lambda self: self.gradients.nog_method, doc="GradientSpec.nog_method.")
    olr = property(lambda self: self.gradients.olr, doc="GradientSpec.olr.")
    ow_target = property(lambda self: self.gradients.ow_target, doc="GradientSpec.ow_target.")
    ow_generator = property(lambda self: self.weights.ow_generator, doc="WeightSpec.ow_generator.")
    ow_radius = property(lambda self: self.weights.ow_radius, doc="WeightSpec.ow_radius.")
    soc_terms = property(lambda self: self.weights.soc_terms, doc="WeightSpec.soc_terms.")
    soc_eval_terms = property(lambda self: self.weights.soc_eval_terms, doc="WeightSpec.soc_eval_terms.")
    nog_scale = property(lambda self: self.gradients.nog_scale, doc="GradientSpec.nog_scale.")
    nog_deficient = property(lambda self: self.gradients.nog_deficient, doc="GradientSpec.nog_deficient.")

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
        kw: dict[str, Any] = {"stabilize": self.stabilize, "inplace": self.inplace,
                              "analysis": self.analysis, "preset": self.preset,
                              "ignored_scope": self.ignored_scope, "layer_configs": self.layer_configs}
        for section in _SECTIONS:
            if section in changes:
                continue
            flat_changes = {_FLAT[k][1]: changes.pop(k) for k in list(changes) if _FLAT.get(k, ("",))[0] == section}
            kw[section] = dataclasses.replace(getattr(self, section), **flat_changes)
        kw.update(changes)
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
