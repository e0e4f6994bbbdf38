"""``OrthoConfig``: which treatments the pass applies, and the paper's named presets.

A preset is named after the rows of the paper's tables: ``"svd"`` (nothing), ``"sn"``,
``"ol"``, ``"ow"``, ``"nog"``, ``"olr"`` and their ``+`` combinations such as
``"nog+ow+olr"``. At most one *weight* treatment (OW, SN or OL) can be active.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from orthofx.errors import ConfigError, OptionError
from orthofx.vocab import OW_METHOD_NAMES, POLAR_METHODS, SN_METHODS, WEIGHT_TREATMENTS

__all__ = [
    "OrthoConfig",
    "PRESETS",
    "resolve_config",
    "check_bool",
    "check_int",
    "check_float",
    "check_weight",
    "check_choice",
]

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


@dataclass(frozen=True)
class OrthoConfig:
    """What ``orthofx.transform`` does to each Pre-SVD layer it finds.

    Attributes:
        weight: ``None``, ``"ow"`` (orthogonal weight W = exp(A − Aᵀ) on the flattened
            (out, in·k·k) weight), ``"sn"`` (W / σ_max(W)) or ``"ol"`` (loss ‖WWᵀ − I‖_F).
        ow_method: ``"expm"`` (the paper's matrix exponential) or ``"cayley"``
            ((I − S/2)⁻¹(I + S/2), much cheaper for wide weights), or ``"soc"`` (the
            authors' code: skew-orthogonal convolution, an orthogonal conv operator; only
            stride-1 'same' Conv2d producers with in == out and an odd square kernel — any
            other producer raises TreatmentError; ``strip`` refuses it).
        ol_weight: multiplier of the orthogonality loss returned by
            ``orthofx.orthogonality_loss`` (only with ``weight="ol"``).
        sn_method: ``"exact"`` (σ_max from ``svdvals`` every forward: σ_max(W) = 1 to
            rounding) or ``"power"`` (torch's power-iteration spectral norm).
        sn_power_iterations: power iterations per forward for ``sn_method="power"``.
        nog: replace each producer's weight gradient by the polar factor U Vᵀ of its
            flattened gradient (nearest orthogonal gradient).
        nog_method: ``orthofx.linalg.polar`` method. ``"auto"`` (default): Polar Express
            + 5 polish steps on CUDA (no host sync; ≤ 1e-5 from U Vᵀ for σ_min ≥ 1.5e-4‖G‖_F),
            float64 Gram ``"eigh"`` on the CPU (2.5e-8); ``"svd"`` is the paper's literal
            U Vᵀ (synchronises on CUDA).
        olr: per-step optimal learning rate
            η* = (wᵀw·lᵀw)/(wᵀw·lᵀl + 2(lᵀw)²), used when 0 < η* < the scheduled lr.
        stabilize: swap raw ``torch.linalg.eigh``/``svd`` meta-layers that decompose a
            covariance for orthofx's stable-gradient versions.
        inplace: rewrite the traced copy without deep-copying the model first (the
            GraphModule then shares submodules with ``model``).
        analysis: options of the graph analysis (leaf modules, extra meta-layers, ...);
            an ``orthofx.graph.AnalysisConfig`` or ``None`` for the defaults.
        preset: the preset name this config was built from, if any (informational).
    """

    weight: str | None = None
    ow_method: str = "expm"
    ol_weight: float = 1e-2
    sn_method: str = "exact"
    sn_power_iterations: int = 1
    nog: bool = False
    nog_method: str = "auto"
    olr: bool = False
    stabilize: bool = True
    inplace: bool = False
    analysis: Any = None
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # validate every field and store its normalised value ("false" -> False, 2.0 -> 2)
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.weight is not None and not (isinstance(self.weight, str) and self.weight in _WEIGHT_TOKENS):
            raise OptionError(
                "weight", self.weight, f"not a weight treatment; use one of {_WEIGHT_TOKENS} or None"
            )
        check_choice(self.ow_method, "ow_method", OW_METHOD_NAMES)
        check_choice(self.nog_method, "nog_method", POLAR_METHODS)
        check_choice(self.sn_method, "sn_method", SN_METHODS)
        put("ol_weight", check_weight(self.ol_weight, "ol_weight"))
        put("sn_power_iterations", check_int(self.sn_power_iterations, "sn_power_iterations", min=1))
        for name in ("nog", "olr", "stabilize", "inplace"):
            put(name, check_bool(getattr(self, name), name))
        if self.preset is not None and not isinstance(self.preset, str):
            raise OptionError("preset", self.preset, "must be a preset name or None")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "OrthoConfig":
        """Build the config of a paper row, e.g. ``OrthoConfig.from_preset("nog+ow+olr")``.

        Tokens joined by ``+`` in any order are accepted (``"olr+nog"`` == ``"nog+olr"``);
        unknown tokens raise :class:`ConfigError` listing the presets.
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
        kwargs: dict[str, Any] = dict(
            weight=weights[0] if weights else None,
            nog="nog" in tokens,
            olr="olr" in tokens,
            preset=canonical,
        )
        _check_names(overrides, "from_preset override")
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
        """A copy with ``changes`` applied (dataclasses.replace); unknown names raise
        :class:`ConfigError`."""
        _check_names(changes, "replace()")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``analysis`` is serialised with its own ``to_dict``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        a = d.get("analysis")
        if a is not None:
            d["analysis"] = a.to_dict() if hasattr(a, "to_dict") else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OrthoConfig":
        """Inverse of :meth:`to_dict`. Values are checked like the constructor's (booleans
        accept ``"true"``/``"false"``, numbers must be numbers); unknown keys, a non-mapping
        and an ``analysis`` that is not a mapping raise :class:`ConfigError`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"an OrthoConfig dict must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown OrthoConfig keys: {sorted(map(str, unknown))}")
        kw = dict(d)
        a = kw.get("analysis")
        if isinstance(a, Mapping):
            from orthofx.graph.config import AnalysisConfig  # local: graph imports are heavier

            kw["analysis"] = AnalysisConfig.from_dict(a)
        elif a is not None:
            raise OptionError("analysis", a, "must be a mapping (AnalysisConfig.to_dict()) or None")
        return cls(**kw)


def _check_names(kwargs: Mapping[str, Any], what: str) -> None:
    names = {f.name for f in dataclasses.fields(OrthoConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown OrthoConfig fields {unknown}; known: {sorted(names)}")


def resolve_config(config: "OrthoConfig | str | Mapping[str, Any] | None") -> OrthoConfig:
    """Normalise what users pass as ``config``: None → "svd" defaults, a preset name,
    a dict (``OrthoConfig.from_dict``) or an ``OrthoConfig``."""
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
