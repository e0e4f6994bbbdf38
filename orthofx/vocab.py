"""The one vocabulary of orthofx: meta-layer kinds and inputs, walk roles, method names, and
the table of torch's decomposition callables.

Every other module reads these names from here (``nn``, ``graph``, ``linalg``, ``treatments``,
``config``); nothing here imports another orthofx module except :mod:`orthofx.errors`, so any
layer may depend on it without a cycle.

The enums are ``str`` enums: members compare, hash and serialise (JSON) as their values
(``Kind.EIGH == "eigh"``), and records keep the plain string values so that checkpoints load
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple

import torch

from orthofx.errors import ConfigError

__all__ = [
    "Kind",
    "KINDS",
    "MetaInput",
    "INPUTS",
    "MetaSpec",
    "is_meta_layer",
    "meta_spec_of",
    "MatFn",
    "Usage",
    "USAGES",
    "Role",
    "ROLES_BEFORE_COV",
    "ROLES_AFTER_COV",
    "WeightTreatment",
    "WEIGHT_TREATMENTS",
    "PolarMethod",
    "POLAR_METHODS",
    "OWMethod",
    "OW_METHOD_NAMES",
    "DEFAULT_OW_METHOD",
    "SNMethod",
    "SN_METHODS",
    "OWTarget",
    "OW_TARGETS",
    "OWGenerator",
    "OW_GENERATORS",
    "NOGScale",
    "NOG_SCALES",
    "NOGDeficient",
    "NOG_DEFICIENT",
    "TorchDecomposition",
    "TORCH_DECOMPOSITIONS",
]


class _StrEnum(str, Enum):
    def __str__(self) -> str:  # "eigh", not "Kind.EIGH"
        return self.value


def _values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(m.value for m in enum)


# ------------------------------------------------------------------------ meta-layers
class Kind(_StrEnum):
    """The matrix function a declared meta-layer applies to its input (``MetaSpec.kind``)."""

    SQRTM = "sqrtm"          # A^{1/2}
    INVSQRTM = "invsqrtm"    # A^{-1/2}
    EIGH = "eigh"            # (Λ, U), A = U Λ Uᵀ
    EIGVALSH = "eigvalsh"    # Λ
    SVD = "svd"              # (U, S, Vᵀ)
    SVDVALS = "svdvals"      # S


#: the declared kinds, as plain strings
KINDS: tuple[str, ...] = _values(Kind)


class MetaInput(_StrEnum):
    """What a meta-layer's first argument is."""

    COVARIANCE = "covariance"  # the (…, n, n) matrix that is decomposed
    FEATURES = "features"      # the feature map whose covariance the layer builds itself


INPUTS: tuple[str, ...] = _values(MetaInput)


@dataclass(frozen=True)
class MetaSpec:
    """What a meta-layer computes: the marker of orthofx's meta-layer modules
    (``module.orthofx_meta``) and the spec of a user-registered one (``AnalysisConfig``).

    Attributes:
        kind: one of :data:`KINDS` (stored as the plain string).
        input: ``"covariance"`` when the first argument is the (…, n, n) matrix that is
            decomposed; ``"features"`` when it is a feature map (N, C, *spatial) or (N, C)
            whose covariance the layer builds itself.
    """

    kind: str
    input: str = "covariance"

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ConfigError(f"meta-layer kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.input, str) or self.input not in INPUTS:
            raise ConfigError(f"meta-layer input must be one of {INPUTS}, got {self.input!r}")
        object.__setattr__(self, "kind", str(Kind(self.kind)))
        object.__setattr__(self, "input", str(MetaInput(self.input)))

    @classmethod
    def coerce(cls, value: "MetaSpec | str | Mapping[str, str] | tuple[str, str]") -> "MetaSpec":
        """Accept a ``MetaSpec``, a kind string (``"eigh"``), ``(kind, input)`` or a dict."""
        if isinstance(value, MetaSpec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        raise ConfigError(f"a meta-layer spec must be a kind string, (kind, input) or MetaSpec, got {value!r}")


def is_meta_layer(module: Any) -> bool:
    """True when ``module``'s class carries a meta-layer marker ``orthofx_meta``: a
    :class:`MetaSpec`, or any object with string ``kind`` and ``input`` (duck-typed markers
    of user code, e.g. a ``SimpleNamespace``). The tracer keeps such modules as leaves and
    the analysis reports them as meta-layers."""
    marker = getattr(type(module), "orthofx_meta", None)
    return isinstance(marker, MetaSpec) or isinstance(getattr(marker, "kind", None), str)


def meta_spec_of(module: Any) -> MetaSpec | None:
    """The :class:`MetaSpec` of a meta-layer module (read from the *instance*, which may refine
    its class's marker, e.g. which decomposition a ``StableDecomposition`` replaces), or None.
    A duck-typed marker without ``input`` means ``"covariance"``."""
    if not is_meta_layer(module):
        return None
    info = getattr(module, "orthofx_meta", None) or getattr(type(module), "orthofx_meta")
    if isinstance(info, MetaSpec):
        return info
    return MetaSpec(getattr(info, "kind", None), getattr(info, "input", "covariance"))


# ------------------------------------------------------------------------ analysis
class MatFn(_StrEnum):
    """Kind of matrix function the recorded analysis finds applied to a covariance."""

    EIGH = "eigh"
    SVD = "svd"
    EIG = "eig"
    CHOLESKY = "cholesky"
    INVERSE = "inverse"
    SOLVE = "solve"
    LOGDET = "logdet"
    EXPM = "expm"
    NS_SQRT = "ns_sqrt"
    NS_INVSQRT = "ns_invsqrt"
    NEWTON_SCHULZ = "newton_schulz"
    PADE = "pade"
    POWER_ITERATION = "power_iteration"


class Usage(_StrEnum):
    """How a meta-layer's result is used (``MetaLayerEntry.usage``). A meta-layer module
    states its own as the class attribute ``orthofx_usage`` (orthofx.nn's
    ``DecorrelatedBatchNorm``: whitening; ``CovariancePooling``: pooling)."""

    SQRTM = "sqrtm"              # U diag(√λ) Uᵀ
    INVSQRTM = "invsqrtm"        # U diag(1/√λ) Uᵀ
    EIGENVALUES = "eigenvalues"  # only the values
    WHITENING = "whitening"      # features multiplied by (Σ + εI)^(-1/2) (ZCA, decorrelated BN)
    POOLING = "pooling"          # the (square-rooted) covariance is the pooled feature (GCP)
    UNKNOWN = "unknown"


USAGES: tuple[str, ...] = _values(Usage)


class Role(_StrEnum):
    """What an op does on the walk from a producer to a meta-layer."""

    RESHAPE = "reshape"          # view/reshape/flatten/permute/transpose/(un)squeeze/contiguous
    CAST = "cast"                # dtype/device casts, clone, detach
    ACTIVATION = "activation"    # pointwise nonlinearity
    NORM = "norm"                # per-channel normalisation (BatchNorm, InstanceNorm)
    DROPOUT = "dropout"
    IDENTITY = "identity"
    POOL = "pool"                # spatial pooling / resampling / padding, per channel
    SCALE = "scale"              # multiply/divide by a constant (scalar or non-data tensor)
    SHIFT = "shift"              # add/subtract a constant (bias, εI)
    POINTWISE = "pointwise"      # other elementwise op of one tensor (x*x, pow)
    CENTER = "center"            # x - mean(x)
    BATCH_SELECT = "batch-select"  # x[i] on the leading (batch) dim
    SYMMETRIZE = "symmetrize"    # (A + Aᵀ)
    COVARIANCE = "covariance"
    PRODUCER = "producer"
    META = "meta"
    STOP = "stop"


#: roles allowed before the covariance (on the feature map)
ROLES_BEFORE_COV: frozenset[Role] = frozenset({
    Role.RESHAPE, Role.CAST, Role.ACTIVATION, Role.NORM, Role.DROPOUT, Role.IDENTITY, Role.POOL,
    Role.SCALE, Role.SHIFT, Role.POINTWISE, Role.CENTER, Role.BATCH_SELECT})
#: roles allowed after the covariance (on the matrix that is decomposed)
ROLES_AFTER_COV: frozenset[Role] = frozenset({
    Role.RESHAPE, Role.CAST, Role.IDENTITY, Role.SCALE, Role.SHIFT, Role.SYMMETRIZE,
    Role.BATCH_SELECT})


# ------------------------------------------------------------------------ treatments
class WeightTreatment(_StrEnum):
    """The weight treatment of a config (at most one per model)."""

    OW = "ow"    # orthogonal weight W = f(A − Aᵀ): Cayley (default), exp (the paper's) or SOC
    SN = "sn"    # spectral norm W / σ_max(W)
    OL = "ol"    # orthogonality loss λ‖WWᵀ − I‖_F


WEIGHT_TREATMENTS: tuple[str, ...] = _values(WeightTreatment)


class PolarMethod(_StrEnum):
    """Methods of ``orthofx.linalg.polar`` (the NOG direction U Vᵀ)."""

    AUTO = "auto"                    # polar_express (+ polish) on CUDA, eigh on the CPU
    SVD = "svd"                      # U Vᵀ from torch.linalg.svd
    EIGH = "eigh"                    # float64 Gram eigh
    NS = "ns"                        # Newton–Schulz
    POLAR_EXPRESS = "polar_express"  # Polar Express coefficients


POLAR_METHODS: tuple[str, ...] = _values(PolarMethod)


class OWMethod(_StrEnum):
    """OW methods (keys of ``orthofx.treatments.weight.OW_METHODS``, kept equal by a test)."""

    EXPM = "expm"      # the paper's exp(A − Aᵀ)
    CAYLEY = "cayley"  # (I − S/2)⁻¹(I + S/2)
    SOC = "soc"        # skew-orthogonal convolution (an orthogonal conv operator)


OW_METHOD_NAMES: tuple[str, ...] = _values(OWMethod)

#: the flat OW map used when none is named (``WeightSpec.ow_method``, ``register_orthogonal``,
#: ``FlatOrthogonal``): the Cayley map, the degree-(1,1) Padé approximant of exp. It turns each
#: eigen-plane of the generator by 2·atan(λ/2) < π, costs one LU and one solve at every
#: ‖S‖, and the study found it equal to the exponential alone and far better under NOG
#: (docs/results.md). ``"expm"`` (the paper's exp(A − Aᵀ)) until 2026-12-07.
DEFAULT_OW_METHOD: str = OWMethod.CAYLEY.value


class SNMethod(_StrEnum):
    """How spectral norm finds σ_max."""

    EXACT = "exact"  # svdvals every forward
    POWER = "power"  # torch's power iteration


SN_METHODS: tuple[str, ...] = _values(SNMethod)


class OWTarget(_StrEnum):
    """What NOG/OLR act on when OW re-parametrizes a producer weight."""

    WEIGHT = "weight"        # the orthogonal weight W the layer uses
    GENERATOR = "generator"  # the trained parameter A of W = f(A − Aᵀ)


OW_TARGETS: tuple[str, ...] = _values(OWTarget)


class OWGenerator(_StrEnum):
    """How the flat OW maps (``expm``/``cayley``) use their generator S."""

    FREE = "free"              # W = f(S) Y₀, S unconstrained (starts at 0)
    NORMALIZED = "normalized"  # W = f(ρ S/σ̂(S)) Y₀, as the authors' SOC (random nonzero start)


OW_GENERATORS: tuple[str, ...] = _values(OWGenerator)


class NOGScale(_StrEnum):
    """The size of NOG's step."""

    UNIT = "unit"            # U Vᵀ: unit singular values, ‖·‖_F = √rank (the paper)
    FROBENIUS = "frobenius"  # U Vᵀ · ‖G‖_F/‖U Vᵀ‖_F: NOG's direction at the gradient's size


NOG_SCALES: tuple[str, ...] = _values(NOGScale)


class NOGDeficient(_StrEnum):
    """What NOG does with the zero singular values of a rank-deficient gradient."""

    PARTIAL = "partial"  # the partial isometry U_r V_rᵀ (null directions stay 0)
    FULL = "full"        # the authors' s[:] = 1: U Vᵀ of the full thin SVD (null directions lifted to 1)


NOG_DEFICIENT: tuple[str, ...] = _values(NOGDeficient)


# ------------------------------------------------------------------------ torch decompositions
class TorchDecomposition(NamedTuple):
    """One of torch's decomposition callables.

    Attributes:
        name: how reports write it (``"torch.linalg.eigh"``).
        kind: the meta-layer kind (one of :data:`KINDS`).
        returns: its return convention: ``"linalg_eigh"``, ``"linalg_svd"`` (named tuples),
            ``"svd"`` (``torch.svd``'s ``U, S, V``) or ``"tensor"``.
    """

    name: str
    kind: str
    returns: str


#: torch's decomposition callables, matched by identity: the one table behind the symbolic
#: analysis's meta functions, the names in reports and the stable swap modules.
TORCH_DECOMPOSITIONS: Mapping[Callable[..., Any], TorchDecomposition] = MappingProxyType({
    torch.linalg.eigh: TorchDecomposition("torch.linalg.eigh", "eigh", "linalg_eigh"),
    torch.linalg.eigvalsh: TorchDecomposition("torch.linalg.eigvalsh", "eigvalsh", "tensor"),
    torch.linalg.svd: TorchDecomposition("torch.linalg.svd", "svd", "linalg_svd"),
    torch.linalg.svdvals: TorchDecomposition("torch.linalg.svdvals", "svdvals", "tensor"),
    torch.svd: TorchDecomposition("torch.svd", "svd", "svd"),
})
