"""``OrthoConfig``: which treatments the pass applies, and the paper's named presets.

A preset is named after the rows of the paper's tables: ``"svd"`` (nothing), ``"sn"``,
``"ol"``, ``"ow"``, ``"nog"``, ``"olr"`` and their ``+`` combinations such as
``"nog+ow+olr"``. At most one *weight* treatment (OW, SN or OL) can be active.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from orthofx.errors import ConfigError

__all__ = ["OrthoConfig", "PRESETS", "resolve_config"]

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

_WEIGHT_TOKENS = ("ow", "sn", "ol")
_TOKENS = ("svd", "nog", "olr") + _WEIGHT_TOKENS

_POLAR_METHODS = ("svd", "eigh", "ns", "polar_express", "auto")
_OW_METHODS = ("expm", "cayley")


@dataclass(frozen=True)
class OrthoConfig:
    """What ``orthofx.transform`` does to each Pre-SVD layer it finds.

    Attributes:
        weight: ``None``, ``"ow"`` (orthogonal weight W = exp(A − Aᵀ) on the flattened
            (out, in·k·k) weight), ``"sn"`` (W / σ_max(W)) or ``"ol"`` (loss ‖WWᵀ − I‖_F).
        ow_method: ``"expm"`` (the paper's matrix exponential) or ``"cayley"``
            ((I − S/2)⁻¹(I + S/2), much cheaper for wide weights).
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
        if self.weight is not None and self.weight not in _WEIGHT_TOKENS:
            raise ConfigError(
                f"weight={self.weight!r} is not a weight treatment; use one of {_WEIGHT_TOKENS} or None"
            )
        if self.ow_method not in _OW_METHODS:
            raise ConfigError(f"ow_method={self.ow_method!r}; use one of {_OW_METHODS}")
        if self.nog_method not in _POLAR_METHODS:
            raise ConfigError(f"nog_method={self.nog_method!r}; use one of {_POLAR_METHODS}")
        if not (self.ol_weight >= 0.0):
            raise ConfigError(f"ol_weight must be >= 0, got {self.ol_weight!r}")
        if self.sn_method not in ("exact", "power"):
            raise ConfigError(f"sn_method={self.sn_method!r}; use 'exact' or 'power'")
        if int(self.sn_power_iterations) < 1:
            raise ConfigError("sn_power_iterations must be >= 1")

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
        """A copy with ``changes`` applied (dataclasses.replace)."""
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
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown OrthoConfig keys: {sorted(unknown)}")
        kw = dict(d)
        a = kw.get("analysis")
        if isinstance(a, Mapping):
            from orthofx.graph.config import AnalysisConfig  # local: graph imports are heavier

            kw["analysis"] = AnalysisConfig.from_dict(a)
        return cls(**kw)


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
