"""The two typed sections of a config: :class:`WeightSpec` (OW / SN / OL and their parameters)
and :class:`GradientSpec` (the NOG / OLR chain and what it acts on under OW).

Each option is validated and defaulted here, once: the dataclass field is the one definition of
its name, type and default, ``__post_init__`` the one check of its value. Everything that takes
these options reads them from a spec: :class:`~orthofx.config.OrthoConfig` (its flat keywords
and properties are derived from these fields), the plan (one config per Pre-SVD layer),
:func:`orthofx.treatments.attach` and :class:`orthofx.optim.OrthoSGD` (given a ``GradientSpec``;
their keywords are its fields). This module imports only :mod:`orthofx.vocab`,
:mod:`orthofx.checks` and :mod:`orthofx.errors`, so the treatments may depend on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from orthofx.checks import check_bool, check_choice, check_float, check_int, check_loss_weight
from orthofx.errors import ConfigError, OptionError
from orthofx.vocab import (
    DEFAULT_OW_METHOD, NOG_DEFICIENT, NOG_SCALES, OW_GENERATORS, OW_METHOD_NAMES, OW_TARGETS, POLAR_METHODS, SN_METHODS,
    WEIGHT_TREATMENTS, NOGDeficient, OWTarget,
)

__all__ = ["WeightSpec", "GradientSpec", "GRADIENT_KEYS", "TREATMENT_KEYS", "CHAIN_KEYS", "check_lift", "spec_keys"]


def _put(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _default(cls: type, name: str) -> Any:
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


def spec_keys(cls: type) -> tuple[str, ...]:
    """The field names of a spec class, in order (what its mapping form may hold)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def _replace(spec: Any, changes: Mapping[str, Any]) -> Any:
    """``dataclasses.replace`` with unknown names refused (ConfigError naming the allowed ones)."""
    allowed = spec_keys(type(spec))
    unknown = sorted(str(k) for k in changes if k not in allowed)
    if unknown:
        raise ConfigError(f"unknown {type(spec).__name__} field {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return dataclasses.replace(spec, **changes) if changes else spec


@dataclass(frozen=True)
class WeightSpec:
    """The weight treatment of a config: at most one of OW, SN, OL, with its parameters.

    Attributes:
        kind: ``None``, ``"ow"`` (orthogonal weight W = f(A − Aᵀ) on the flattened
            (out, in·k·k) weight), ``"sn"`` (W / σ_max(W)) or ``"ol"`` (loss ‖WWᵀ − I‖_F).
            Its flat name (``OrthoConfig(weight=...)``, ``cfg.weight``) is ``weight``.
        ow_method: ``"cayley"`` (the default, :data:`orthofx.vocab.DEFAULT_OW_METHOD`:
            (I − S/2)⁻¹(I + S/2), the degree-(1,1) Padé approximant of exp; one LU and solve at
            any ‖S‖, at or below torch's own orthogonal maps on every shape measured), ``"expm"``
            (the paper's exp(A − Aᵀ); the default until 2026-12-07) or ``"soc"`` (the authors' code:
            skew-orthogonal convolution, an orthogonal conv operator with a new random
            generator; only Conv2d producers with an odd square kernel, padding k//2,
            groups 1 and dilation 1 (any channels; stride by invertible downsampling) —
            any other producer raises TreatmentError; ``strip`` refuses it).
        ow_generator: for ``"expm"``/``"cayley"``: ``"free"`` (W = f(S) Y₀ with S = a Y₀ᵀ − Y₀ aᵀ
            unconstrained, a = 0 at registration; a square weight stores B = Y₀ᵀa, W = Y₀ f(B − Bᵀ)) or ``"normalized"`` (W = f(ρ S/σ̂(S)) Y₀, the
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

    kind: str | None = field(default=None, metadata={"flat": "weight"})
    ow_method: str = DEFAULT_OW_METHOD
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
        _put(self, "ow_method", check_choice(self.ow_method, "ow_method", OW_METHOD_NAMES))
        _put(self, "ow_generator", check_choice(self.ow_generator, "ow_generator", OW_GENERATORS))
        _put(self, "ow_radius", check_float(self.ow_radius, "ow_radius", min=0.0, min_inclusive=False, max=3.0))
        _put(self, "soc_terms", check_int(self.soc_terms, "soc_terms", min=1, max=64))
        _put(self, "soc_eval_terms", check_int(self.soc_eval_terms, "soc_eval_terms", min=1, max=64))
        _put(self, "sn_method", check_choice(self.sn_method, "sn_method", SN_METHODS))
        _put(self, "sn_power_iterations", check_int(self.sn_power_iterations, "sn_power_iterations", min=1))
        _put(self, "ol_weight", check_loss_weight(self.ol_weight, "ol_weight"))

    def replace(self, **changes: Any) -> "WeightSpec":
        """A copy with ``changes`` (fields) applied and checked; unknown names raise ConfigError."""
        return _replace(self, changes)


def check_lift(method: str, deficient: str, method_name: str = "nog_method",
               deficient_name: str = "nog_deficient") -> None:
    """NOG's one cross-option rule: ``deficient="full"`` (null directions lifted to 1) needs the
    SVD's null-space basis, so only the polar methods ``"svd"`` and ``"auto"`` can honour it.
    Raises ConfigError naming both options (``method_name``/``deficient_name``)."""
    if deficient == NOGDeficient.FULL and method not in ("auto", "svd"):
        raise ConfigError(
            f"{deficient_name}='full' with {method_name}={method!r}: only an SVD returns the null-space basis "
            f"the lift needs; use {method_name}='svd' or 'auto' (runs the SVD: one host sync per step on CUDA), "
            f"or {deficient_name}='partial'"
        )


@dataclass(frozen=True)
class GradientSpec:
    """The gradient chain of a config: what :func:`orthofx.treatments.attach` installs.

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
            thin SVD's U Vᵀ, null directions lifted to 1 along the SVD's own basis; with NOG on
            it needs ``nog_method`` ``"svd"`` or ``"auto"``, :func:`check_lift`).
        olr: per-step optimal learning rate η* = (wᵀw·lᵀw)/(wᵀw·lᵀl + 2(lᵀw)²), used when
            0 < η* < the scheduled lr.
        ow_target: what NOG/OLR act on when OW re-parametrizes the weight: ``"generator"``
            (the default: the trained parameter of the OW map, as the authors' code does) or
            ``"weight"`` (the orthogonal W the layer uses: a Riemannian step on W, pulled back
            to the generator exactly; refused for SOC and normalised generators, which have no
            A = 0 point). ``None`` (written by configs of orthofx ≤ 0.2) reads as the default.

    Raises:
        OptionError: a value of the wrong type or not among its choices (naming the field).
        ConfigError: ``nog_deficient="full"`` with NOG on and a ``nog_method`` other than
            ``"svd"``/``"auto"``.
    """

    nog: bool = False
    nog_method: str = "auto"
    nog_scale: str = "unit"
    nog_deficient: str = "partial"
    olr: bool = False
    ow_target: str = OWTarget.GENERATOR.value

    def __post_init__(self) -> None:
        _put(self, "nog", check_bool(self.nog, "nog"))
        _put(self, "olr", check_bool(self.olr, "olr"))
        _put(self, "nog_method", check_choice(self.nog_method, "nog_method", POLAR_METHODS))
        _put(self, "nog_scale", check_choice(self.nog_scale, "nog_scale", NOG_SCALES))
        _put(self, "nog_deficient", check_choice(self.nog_deficient, "nog_deficient", NOG_DEFICIENT))
        target = _default(GradientSpec, "ow_target") if self.ow_target is None else self.ow_target
        _put(self, "ow_target", check_choice(target, "ow_target", OW_TARGETS))
        if self.nog:
            check_lift(self.nog_method, self.nog_deficient)

    @property
    def active(self) -> bool:
        """Whether the spec asks for a treatment (NOG or OLR: a :data:`TREATMENT_KEYS` field is on)."""
        return any(getattr(self, k) for k in TREATMENT_KEYS)

    def switched_on(self, given: Mapping[str, Any]) -> bool:
        """Whether ``given`` (the field values this spec was made with) switched a treatment on."""
        return any(getattr(self, k) for k in TREATMENT_KEYS if k in given)

    def replace(self, **changes: Any) -> "GradientSpec":
        """A copy with ``changes`` (fields) applied and checked; unknown names raise ConfigError."""
        return _replace(self, changes)

    @classmethod
    def coerce(cls, value: Any) -> "GradientSpec":
        """``value`` as a GradientSpec: a GradientSpec as it is, ``None`` → the defaults, a
        mapping of its fields (strict keys), or an object carrying one as ``.gradients`` (an
        :class:`~orthofx.config.OrthoConfig`). A preset name or anything else raises ConfigError."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(getattr(value, "gradients", None), cls):
            return value.gradients
        if isinstance(value, str):
            raise ConfigError(
                f"{value!r} is a preset name; pass its gradient spec (orthofx.config.resolve_config({value!r}))"
                f".gradients, a GradientSpec, or its fields as keywords (nog=True, olr=True)")
        if isinstance(value, Mapping):
            return _replace(cls(), {str(k): v for k, v in value.items()})
        raise ConfigError(f"expected a GradientSpec (or a mapping of its fields), got {type(value).__name__}")


#: the fields of :class:`GradientSpec`: the gradient keywords of attach and OrthoSGD
GRADIENT_KEYS: tuple[str, ...] = spec_keys(GradientSpec)
#: the fields that switch a gradient treatment on
TREATMENT_KEYS: tuple[str, ...] = ("nog", "olr")
#: the fields that build the default chain: a custom ``chain=`` replaces them (``ow_target``,
#: what any chain acts on under OW, is not among them)
CHAIN_KEYS: tuple[str, ...] = tuple(k for k in GRADIENT_KEYS if k != "ow_target")
