r"""Weight treatments of the paper (Sec. 4.2) on the *flattened* Pre-SVD weight.

Every treatment here sees a weight of shape ``(out, in, *kernel)`` as the matrix
``W ∈ R^{out × n}`` with ``n = in·∏kernel`` (``W = weight.reshape(out, -1)``), the matrix whose
rows produce the channels of the covariance. This differs from
``torch.nn.utils.parametrizations.orthogonal``, which treats a conv weight as a batch of
``kh × kw`` matrices.

* **OW** :func:`register_orthogonal` — hard orthogonality by the exponential (or Cayley) map
  of a skew-symmetric matrix (:class:`~orthofx.treatments.flat_ow.FlatOrthogonal`, free or
  normalised generator); or, with ``method="soc"``, the skew-orthogonal convolution
  (:class:`~orthofx.treatments.soc.SOCOrthogonal`, an orthogonal *operator*, not a weight).
  The methods are the table :data:`OW_METHODS`; a new one is one entry there.
* **SN** :class:`FlatSpectralNorm` / :func:`register_spectral_norm` — ``W / σ_max(W)``.
* **OL** :func:`orthogonality_loss` — ``Σ ‖W Wᵀ − I‖_F``.
* :func:`treatment_of` — which of them a weight carries. Baking them into plain weights
  (:func:`~orthofx.treatments.baking.bake`, ``bake_all``, ``plain_state_dict``, also importable
  from here) is :mod:`orthofx.treatments.baking`.

Registration functions return ``True`` when they registered something and ``False`` when the
same treatment was already there (a second call never stacks a second parametrization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from orthofx.checks import check_float, check_int
from orthofx.errors import ConfigError, TreatmentError
from orthofx.linalg._checks import no_autocast
from orthofx.treatments._common import check_weight, compute_dtype
from orthofx.treatments.serialize import make_picklable
from orthofx.treatments.flat_ow import OW_GENERATOR_KINDS, FlatOrthogonal
from orthofx.treatments.ow_state import install_state_migration
from orthofx.treatments.soc import (  # noqa: F401  (re-exported)
    SOC_EVAL_TERMS,
    SOC_NOT_BAKEABLE,
    SOC_RADIUS,
    SOC_TERMS,
    SOCOrthogonal,
    soc_build,
    soc_forward,
    soc_truncation_bound,
)
from orthofx.treatments.stiefel import OW_RANGE, _stiefel_map, _stiefel_map_flagged  # noqa: F401
from orthofx.vocab import DEFAULT_OW_METHOD, SN_METHODS, OWGenerator, OWMethod

__all__ = [
    "FlatOrthogonal",
    "SOCOrthogonal",
    "OWMethodSpec",
    "OW_METHODS",
    "FlatSpectralNorm",
    "register_orthogonal",
    "register_spectral_norm",
    "orthogonality_loss",
    "treatment_of",
]  # bake, bake_all, plain_state_dict: documented in orthofx.treatments.baking (served here lazily)

# --------------------------------------------------------------------------- OW methods
#: the builder of an OW method: ``(module, name, weight, label, *, lowrank, generator, radius,
#: terms, eval_terms) -> parametrization``
OWBuild = Callable[..., nn.Module]


@dataclass(frozen=True)
class OWMethodSpec:
    """One OW method: how :func:`register_orthogonal` builds it and what baking may do.

    Attributes:
        build: ``(module, name, weight, label, *, lowrank, generator, radius, terms,
            eval_terms) -> parametrization`` (a :class:`FlatOrthogonal`, so ``treatment_of``
            reports ``"ow"``); raises :class:`TreatmentError` naming ``label`` for a
            producer it does not support. Options a method does not use are ignored.
        forward: replaces the module's forward after registration (set on the class
            ``parametrize`` made for this module, so ``remove_parametrizations`` drops it);
            ``None``: the module applies its parametrized weight as usual.
        bakeable: whether :func:`~orthofx.treatments.baking.bake` / ``orthofx.strip`` /
            ``plain_state_dict`` can replace it by a plain weight of the same module.
        why_not_bakeable: with ``bakeable=False``, why (the refusal's message says it).
        unsafe: registered with ``parametrize``'s ``unsafe=True`` (the parametrized value
            may have another shape than the weight: SOC's M is (C, C, k, k)).
        summary: one line for messages and docs.
    """

    build: OWBuild
    forward: Callable[..., Tensor] | None = None
    bakeable: bool = True
    unsafe: bool = False
    summary: str = ""
    why_not_bakeable: str = ""


def _flat_build(method: str) -> OWBuild:
    def build(module: nn.Module, name: str, W: Tensor, label: str, *, lowrank: bool | None = None,
              generator: OWGenerator | str = "free", radius: float = 0.7, **_: object) -> FlatOrthogonal:
        return FlatOrthogonal(W.shape, method, lowrank, generator=generator, radius=radius)

    return build


#: the OW methods (``OrthoConfig.ow_method``); a new weight treatment is one entry here
OW_METHODS: dict[str, OWMethodSpec] = {
    "expm": OWMethodSpec(_flat_build("expm"), summary="exp of a skew matrix on the flattened weight"),
    "cayley": OWMethodSpec(_flat_build("cayley"), summary="Cayley map on the flattened weight"),
    "soc": OWMethodSpec(
        soc_build, forward=soc_forward, bakeable=False, unsafe=True,
        summary="skew-orthogonal convolution: Conv2d with an odd square kernel, padding k//2, "
                "groups 1, dilation 1 (stride by invertible downsampling)",
        why_not_bakeable=SOC_NOT_BAKEABLE,
    ),
}
_OW_METHODS = tuple(OW_METHODS)


# --------------------------------------------------------------------------- SN
class FlatSpectralNorm(nn.Module):
    r"""Spectral normalisation (SN) of the flattened weight: ``W / max(σ_max(W), eps)``.

    ``σ_max`` is exact: ``torch.linalg.matrix_norm(W.reshape(out, -1), ord=2)`` (the largest
    singular value, from ``svdvals``), differentiated by autograd (∂σ_max/∂W = u₁v₁ᵀ). So after
    every forward ``σ_max`` of the result is 1 up to rounding (≈1e-6 relative in float32).
    float16/bfloat16 are computed in float32. ``eps = 1e-12`` guards a zero weight.
    Unlike torch's power-iteration spectral norm, there is no state and train/eval agree.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"sigma=exact, eps={self.eps}"

    def forward(self, W: Tensor) -> Tensor:
        with no_autocast(W.device.type):  # σ_max in ≥ float32, also under AMP
            Wc = W.to(compute_dtype(W.dtype))
            sigma = torch.linalg.matrix_norm(Wc.reshape(W.shape[0], -1), ord=2)
            return (Wc / sigma.clamp_min(self.eps)).to(W.dtype)


# --------------------------------------------------------------------------- registration
def _label(module: nn.Module, name: str, qualname: str | None) -> str:
    """How messages name ``module.<name>``: ``qualname`` is the module's path (``"0"`` →
    ``"0.weight"``) or already the parameter's (``"0.weight"``, as the rewrite passes it)."""
    if not qualname:
        return f"{type(module).__name__}.{name}"
    return qualname if qualname == name or qualname.endswith(f".{name}") else f"{qualname}.{name}"


def _current_tensor(module: nn.Module, name: str, label: str) -> Tensor:
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    t = getattr(module, name, None)
    if t is None:
        raise TreatmentError(f"{label}: the module has no tensor named {name!r}")
    return t


def _existing(module: nn.Module, name: str) -> list[nn.Module]:
    if parametrize.is_parametrized(module, name):
        return list(module.parametrizations[name])
    return []


def _describe(ps: list[nn.Module]) -> str:
    return ", ".join(type(p).__name__ for p in ps)


def _ow_signature(p: nn.Module) -> tuple[object, ...]:
    """What makes two OW registrations the same (lowrank is compared separately)."""
    if isinstance(p, SOCOrthogonal):
        return ("soc", p.radius, p.terms, p.eval_terms)
    gen = getattr(p, "generator", "free")
    return (p.method, gen, p.radius if gen == "normalized" else None)


def register_orthogonal(
    module: nn.Module,
    name: str = "weight",
    *,
    method: OWMethod | str = DEFAULT_OW_METHOD,
    lowrank: bool | None = None,
    generator: OWGenerator | str = "free",
    radius: float = 0.7,
    terms: int = 5,
    eval_terms: int = 10,
    qualname: str | None = None,
) -> bool:
    """Register OW on ``module.<name>``. Idempotent.

    ``method`` is a key of :data:`OW_METHODS` (a string or an :class:`orthofx.vocab.OWMethod`,
    the one enum of OW method names):

    * ``"cayley"`` (default) / ``"expm"``: :class:`FlatOrthogonal` on the flattened weight. With
      ``generator="free"`` (default) ``module.<name>`` is afterwards the nearest orthogonal
      matrix to the old weight (rows orthonormal if out ≤ in·k·k, else columns), the
      trainable tensor is ``module.parametrizations.<name>.original`` (same Parameter object,
      now holding ``A = 0``, same shape) and the buffer ``...<name>.0.base`` holds ``Y₀``. With
      ``generator="normalized"`` the map uses ``ρ·S/σ̂(S)`` (``radius`` = ρ) and ``A`` starts
      random (N(0, 1/n')): W is orthogonal, a rotation of Y₀ by ρ, and scale-invariant in A.
    * ``"soc"``: :class:`~orthofx.treatments.soc.SOCOrthogonal`, only for an ``nn.Conv2d``
      with groups 1, dilation 1, an odd square kernel, a square stride and padding k//2
      (zeros or circular); any other producer raises :class:`TreatmentError` naming it and
      why (no fallback to another method). The conv gets a new random generator
      ``original`` of shape (C, C, k, k), C = max(in·s², out) (the old weight's values are
      not used), and its forward becomes the SOC series: ``terms`` Taylor terms in training,
      ``eval_terms`` in eval, ‖M‖₂ = ``radius``. ``generator`` is ignored (always normalised).

    Returns ``True`` if registered now, ``False`` if an identical OW was already there.
    Raises :class:`TreatmentError` for a non-float or 1-D weight, or when ``<name>`` already
    carries another parametrization or OW with other options (bake or remove it first — they
    are never stacked); :class:`ConfigError` for an unknown method or a bad option
    (``generator`` not "free"/"normalized", ``radius`` not in (0, 3], ``terms``/``eval_terms``
    not integers in [1, 64]). ``qualname`` only improves messages.
    """
    label = _label(module, name, qualname)
    method = str(method) if isinstance(method, str) else method  # an OWMethod member as its plain value
    spec = OW_METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ConfigError(f"OW on {label}: method={method!r}; use one of {_OW_METHODS}")
    if generator not in OW_GENERATOR_KINDS:
        raise ConfigError(f"OW on {label}: generator={generator!r}; use one of {OW_GENERATOR_KINDS}")
    radius = float(check_float(radius, "radius", min=0.0, min_inclusive=False, max=3.0))  # type: ignore[arg-type]
    terms = int(check_int(terms, "terms", min=1, max=64))  # type: ignore[arg-type]
    eval_terms = int(check_int(eval_terms, "eval_terms", min=1, max=64))  # type: ignore[arg-type]
    existing = _existing(module, name)
    if existing:
        if len(existing) == 1 and isinstance(existing[0], FlatOrthogonal):
            p = existing[0]
            wanted = (("soc", radius, terms, eval_terms) if method == "soc"
                      else (method, generator, radius if generator == "normalized" else None))
            if _ow_signature(p) == wanted and (lowrank is None or p.lowrank == lowrank):
                return False
            if p.method != method:
                raise TreatmentError(
                    f"OW on {label}: already registered with method={p.method!r}; "
                    "bake() it before registering another method"
                )
            raise TreatmentError(
                f"OW on {label}: already registered with method={p.method!r} and other options "
                f"({p.extra_repr()}); bake() or remove it before registering it again"
            )
        raise TreatmentError(
            f"OW on {label}: it already carries parametrization(s) {_describe(existing)}; "
            "orthofx never stacks parametrizations (bake() or remove them first)"
        )
    W = _current_tensor(module, name, label)
    check_weight(W, label, "OW")
    parametrization = spec.build(
        module, name, W, label, lowrank=lowrank, generator=generator, radius=radius, terms=terms,
        eval_terms=eval_terms,
    )
    parametrize.register_parametrization(module, name, parametrization, unsafe=spec.unsafe)
    install_state_migration(module.parametrizations[name])
    if spec.forward is not None:
        type(module).forward = spec.forward  # the class parametrize made for this module only
    make_picklable(module)
    return True


def register_spectral_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    method: Literal["exact", "power"] = "exact",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    qualname: str | None = None,
) -> bool:
    """Register spectral normalisation of the flattened weight (SN). Idempotent.

    * ``method="exact"``: :class:`FlatSpectralNorm` (σ_max from ``svdvals``; σ_max of the
      result is 1 to rounding after every forward).
    * ``method="power"``: ``torch.nn.utils.parametrizations.spectral_norm(module, name,
      n_power_iterations, eps, dim=0)``. Torch reshapes the weight to ``(out, -1)`` for
      ``dim=0`` (``_SpectralNorm._reshape_weight_to_matrix``: ``weight.flatten(1)``), i.e. the
      same flattened matrix. Its σ estimate comes from ``n_power_iterations`` power iterations
      per training forward (15 at registration), so σ_max of the result is ≥ 1 and approaches 1
      as the iteration converges; in eval mode the last estimate is reused.

    Returns ``True`` if registered now, ``False`` if the same SN was already there. Raises
    :class:`TreatmentError` for a non-float/1-D weight or another parametrization already on
    ``<name>``; :class:`ConfigError` for bad options.
    """
    label = _label(module, name, qualname)
    if method not in SN_METHODS:
        raise ConfigError(f"SN on {label}: method={method!r}; use 'exact' or 'power'")
    if int(n_power_iterations) < 1:
        raise ConfigError(f"SN on {label}: n_power_iterations must be >= 1")
    torch_sn = torch.nn.utils.parametrizations._SpectralNorm
    wanted = FlatSpectralNorm if method == "exact" else torch_sn
    existing = _existing(module, name)
    if existing:
        if len(existing) == 1 and isinstance(existing[0], wanted):
            return False
        raise TreatmentError(
            f"SN on {label}: it already carries parametrization(s) {_describe(existing)}; "
            "orthofx never stacks parametrizations (bake() or remove them first)"
        )
    W = _current_tensor(module, name, label)
    check_weight(W, label, "SN")
    if method == "exact":
        parametrize.register_parametrization(module, name, FlatSpectralNorm(eps))
    else:
        torch.nn.utils.parametrizations.spectral_norm(
            module, name, n_power_iterations=int(n_power_iterations), eps=eps, dim=0
        )
    make_picklable(module)
    return True


# --------------------------------------------------------------------------- OL
def orthogonality_loss(
    weights: Tensor | nn.Module | Iterable[Tensor | nn.Module], weight: float = 1.0
) -> Tensor:
    r"""Orthogonality loss (OL): ``weight · Σ_W ‖G(W) − I‖_F`` over the flattened weights.

    ``W = w.reshape(out, -1)`` (out × n); ``G(W) = W Wᵀ`` (out × out) when ``out ≤ n`` (the
    paper's eq. 12), and ``G(W) = Wᵀ W`` (n × n) for a tall weight (``out > n``), where
    ``W Wᵀ`` has rank n < out and could never reach I. The gradient is plain autograd of this
    formula: ``2 (W Wᵀ − I) W / ‖W Wᵀ − I‖_F`` per wide weight (0 where the norm is exactly 0,
    torch's subgradient). Not squared, as in the paper.

    Items may be tensors or modules (their ``.weight``, parametrized value included).
    float16/bfloat16 weights are computed in float32; the result is a 0-d tensor in the
    (promoted) compute dtype. An empty iterable gives ``tensor(0.)``.
    """
    if isinstance(weights, (Tensor, nn.Module)):
        weights = [weights]
    total: Tensor | None = None
    for i, w in enumerate(weights):
        if isinstance(w, nn.Module):
            w = w.weight
        check_weight(w, f"weight #{i} of orthogonality_loss (shape {tuple(getattr(w, 'shape', ()))})", "OL")
        Wf = w.reshape(w.shape[0], -1).to(compute_dtype(w.dtype))
        m, n = Wf.shape
        G = Wf @ Wf.mT if m <= n else Wf.mT @ Wf
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        term = torch.linalg.matrix_norm(G - eye)
        total = term if total is None else total + term.to(total.device)
    if total is None:
        return torch.zeros(())
    return total * weight


# --------------------------------------------------------------------------- which treatment
def treatment_of(module: nn.Module, name: str = "weight") -> str | None:
    """Which weight treatment ``module.<name>`` carries: ``"ow"``, ``"sn"``, ``"other"`` (a
    parametrization orthofx did not make) or ``None``."""
    existing = _existing(module, name)
    if not existing:
        return None
    if len(existing) == 1:
        p = existing[0]
        if isinstance(p, FlatOrthogonal):
            return "ow"
        if isinstance(p, (FlatSpectralNorm, torch.nn.utils.parametrizations._SpectralNorm)):
            return "sn"
    return "other"


_BAKE_NAMES = ("bake", "bake_all", "plain_state_dict")


def __getattr__(name: str) -> object:
    """``bake``, ``bake_all``, ``plain_state_dict`` live in :mod:`orthofx.treatments.baking`
    (which imports this module, hence resolved on first use)."""
    if name in _BAKE_NAMES:
        from orthofx.treatments import baking

        return getattr(baking, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
