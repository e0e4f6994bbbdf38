r"""Weight treatments of the paper (Sec. 4.2) on the *flattened* Pre-SVD weight.

Every treatment here sees a weight of shape ``(out, in, *kernel)`` as the matrix
``W ∈ R^{out × n}`` with ``n = in·∏kernel`` (``W = weight.reshape(out, -1)``), the matrix whose
rows produce the channels of the covariance. This differs from
``torch.nn.utils.parametrizations.orthogonal``, which treats a conv weight as a batch of
``kh × kw`` matrices.

* **OW** :class:`FlatOrthogonal` / :func:`register_orthogonal` — hard orthogonality by the
  exponential (or Cayley) map of a skew-symmetric matrix; or, with ``method="soc"``,
  :class:`SOCOrthogonal`, the skew-orthogonal convolution (an orthogonal *operator*, not a
  weight). The methods are the table :data:`OW_METHODS`; a new one is one entry there.
* **SN** :class:`FlatSpectralNorm` / :func:`register_spectral_norm` — ``W / σ_max(W)``.
* **OL** :func:`orthogonality_loss` — ``Σ ‖W Wᵀ − I‖_F``.
* :func:`bake`, :func:`treatment_of`, :func:`plain_state_dict` — for strip/export.

Registration functions return ``True`` when they registered something and ``False`` when the
same treatment was already there (a second call never stacks a second parametrization).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from orthofx.errors import ConfigError, TreatmentError
from orthofx.linalg._checks import host_read_is_free, no_autocast
from orthofx.treatments._common import check_weight, compute_dtype, flat_shape
from orthofx.treatments.stiefel import OW_RANGE, _stiefel_map, _stiefel_map_flagged  # noqa: F401
from orthofx.vocab import SN_METHODS

__all__ = [
    "FlatOrthogonal",
    "SOCOrthogonal",
    "OWMethodSpec",
    "OW_METHODS",
    "FlatSpectralNorm",
    "register_orthogonal",
    "register_spectral_norm",
    "orthogonality_loss",
    "bake",
    "bake_all",
    "treatment_of",
    "plain_state_dict",
]

OWMethod = Literal["expm", "cayley", "soc"]
#: the methods of :class:`FlatOrthogonal` (matrix maps of the flattened weight)
_FLAT_METHODS = ("expm", "cayley")


# --------------------------------------------------------------------------- OW
class FlatOrthogonal(nn.Module):
    r"""Orthogonal weight (OW) on the flattened weight, a ``torch.nn.utils.parametrize``
    parametrization.

    Let ``W ∈ R^{out×n}`` be the flattened weight, ``k = min(out, n)``, ``n' = max(out, n)``,
    and write matrices in their *tall* form (``n' × k``: ``W`` itself when ``out ≥ n``, else
    ``Wᵀ``). With the trainable parameter ``A`` (tall form ``a ∈ R^{n'×k}``; stored with the
    weight's own shape, zero at registration) and the buffer ``base = Y₀ ∈ R^{n'×k}`` with
    orthonormal columns,

        S = a Y₀ᵀ − Y₀ aᵀ          (n'×n', skew-symmetric)
        W_tall = f(S) Y₀,           f = exp ("expm")  or  f(S) = (I − S/2)⁻¹(I + S/2) ("cayley").

    ``f(S)`` is orthogonal, so ``W_tall`` has orthonormal columns: **for a wide weight
    (out ≤ n) the rows of W are orthonormal (W Wᵀ = I_out); for a tall weight (out > n) the
    columns are (Wᵀ W = I_n)**. For a square weight this is the paper's ``exp(A' − A'ᵀ)``
    rotated by the base: ``W = Y₀ exp(Y₀ᵀa − aᵀY₀)``. The generators ``a Y₀ᵀ − Y₀ aᵀ`` span the
    whole tangent space of the Stiefel manifold at ``Y₀``, so every nearby orthonormal ``W``
    is reachable.

    ``base`` is set by :meth:`right_inverse`, which ``parametrize`` calls at registration (and
    on ``module.weight = value``): ``Y₀`` = the exact polar factor ``U Vᵀ`` of the given weight
    (float64 thin SVD), i.e. the **nearest orthogonal matrix** to it, and ``A = 0``. The
    parametrized weight right after registration is therefore the nearest orthogonal matrix
    to the original weight (its Frobenius norm becomes √k).

    Cost. ``S`` has rank ≤ 2k: with ``L = [a/t, Y₀]``, ``R = [t·Y₀, −a]`` (``S = L Rᵀ``, ``t``
    a balancing scalar) every analytic/rational ``f`` obeys ``f(L Rᵀ) L = L f(Rᵀ L)``, and
    ``Y₀`` is the second block of ``L``, so ``W_tall = L · f(M)[:, k:]`` with the 2k×2k matrix
    ``M = Rᵀ L``. This low-rank route costs O(n'k² + k³) instead of O(n'³) — for a 512×4608
    weight a 1024² instead of a 4608² exponential (Cayley: one 1024² solve) — and is exact up
    to rounding (checked against the dense route in the tests). ``t = max(‖a‖_F, 1)`` (detached) keeps the blocks of ``M`` of similar size.
    Auto (``lowrank=None``) uses it when ``4k ≤ n'`` (aspect ratio ≥ 4); timings:
    benchmarks/results/timings.md.

    Large generators. exp of a skew matrix is computed to full accuracy only while the
    argument ``X`` (``S``, or ``M`` on the low-rank route) has ``‖X‖₁ ≤ OW_RANGE = θ·2^14 =
    32768`` (expm's scaling range; beyond it the result was inaccurate from ‖A‖ ≈ 1e5 and NaN
    from 1e6), and each squaring doubles the rounding error. So, without any host sync:

    * the argument is scaled to the range, ``X ← c·X`` with ``c = min(1, OW_RANGE/‖X‖₁)``
      (differentiable; ``W = f(c·S) Y₀`` since ``f(c L Rᵀ) L = L f(c M)``). For ‖X‖₁ beyond the
      range W stays orthogonal but no longer follows A — there float32 could not resolve the
      rotation angles anyway (error ≈ ‖S‖·2⁻²⁴ ≥ 2e-3 rad). The two routes measure different
      X, so they may saturate at slightly different ‖A‖. On the host path (CPU, outside
      ``cuda_policy``/compile/export) a RuntimeWarning is issued once per parametrization;
      on CUDA it is silent;
    * the tall result is re-orthonormalised by ``OW_POLISH = 2`` polish steps
      ``Q ← Q(1.875 I − 1.25 QᵀQ + 0.375 (QᵀQ)²)`` (identity on an orthonormal Q and on its
      tangent space, so the map and its gradient change only by rounding).

    Measured (tests/test_ow_large.py, float32, shapes 8×8 … 64×27, both routes and methods):
    ``‖W Wᵀ − I‖_F`` ≤ 1e-6 for every ‖A‖_F from 1e-3 to 1e8 (before: 1.7 at 1e5, NaN at 1e6).

    dtype: float16/bfloat16 weights are computed in float32; float32/float64 in their own
    dtype. The output has the weight's dtype. No ε is involved.

    Per step the map runs once per forward (and its backward once): no host sync on CUDA (the
    exponential's squarings are decided on the device, Cayley uses ``solve_ex``). A forward
    that reads the weight several times can share one evaluation with
    ``torch.nn.utils.parametrize.cached()``.

    Args:
        shape: shape of the weight (out, in, *kernel).
        method: ``"expm"`` (the paper; :func:`orthofx.linalg.expm.expm`, scaling and
            squaring decided on the device, so no host sync on CUDA) or ``"cayley"``
            (``torch.linalg.solve_ex`` without the info check; cheaper, also orthogonal).
        lowrank: force (``True``) or forbid (``False``) the low-rank route; ``None`` = auto.
    """

    base: Tensor

    def __init__(
        self, shape: torch.Size | tuple[int, ...], method: OWMethod = "expm", lowrank: bool | None = None
    ) -> None:
        super().__init__()
        if method not in _FLAT_METHODS:
            raise ConfigError(
                f"FlatOrthogonal: method={method!r}; use one of {_FLAT_METHODS} "
                "('soc' is SOCOrthogonal, registered by register_orthogonal)"
            )
        self.shape = torch.Size(shape)
        self.out, self.n = flat_shape(self.shape)
        self.k, self.n_big = min(self.out, self.n), max(self.out, self.n)
        self.wide = self.out < self.n
        self.method = method
        self.lowrank = (4 * self.k <= self.n_big) if lowrank is None else bool(lowrank)
        self.register_buffer("base", torch.zeros(self.n_big, self.k))
        self._warned = False

    def extra_repr(self) -> str:
        return (
            f"flat=({self.out}, {self.n}), method={self.method!r}, lowrank={self.lowrank}, "
            f"orthonormal={'rows' if self.out <= self.n else 'columns'}"
        )

    # tall form <-> weight shape
    def _to_tall(self, X: Tensor) -> Tensor:
        X = X.reshape(self.out, self.n)
        return X.mT if self.wide else X

    def _from_tall(self, T: Tensor) -> Tensor:
        return (T.mT if self.wide else T).reshape(self.shape)

    def forward(self, A: Tensor) -> Tensor:
        cd = compute_dtype(A.dtype)
        with no_autocast(A.device.type):  # matrix_exp/solve in ≥ float32, also under AMP
            a = self._to_tall(A).to(cd)
            Y0 = self.base.to(cd)
            Q, over = _stiefel_map_flagged(a, Y0, self.method, self.lowrank)
        if not getattr(self, "_warned", False) and host_read_is_free(over) and bool(over):
            self._warned = True  # once per parametrization; only where the read is free
            warnings.warn(
                f"OW {self.extra_repr()}: the generator is beyond the exponential's range "
                f"(‖X‖₁ > {OW_RANGE:g}); it is scaled down to that range, so W stays orthogonal "
                "but no longer follows A there. A lower lr, or bake() and re-register OW, "
                "keeps A small",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._from_tall(Q).to(A.dtype)

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """Set ``base`` to the polar factor of ``W`` (nearest orthogonal matrix) and return A = 0."""
        check_weight(W, f"a weight of shape {tuple(W.shape)}", "OW")
        if W.shape != self.shape:
            raise TreatmentError(
                f"OW: assigned a weight of shape {tuple(W.shape)} to a parametrization of shape "
                f"{tuple(self.shape)}"
            )
        if not torch.isfinite(W).all():
            raise TreatmentError("OW: the weight holds NaN/Inf; cannot take its polar factor")
        # The exact polar factor through a float64 thin SVD. orthofx.linalg.polar maps a zero
        # matrix to zero by contract, but the base must always have orthonormal columns; the
        # thin SVD gives orthonormal U, V even for a rank-deficient (or zero) weight.
        T = self._to_tall(W).to(torch.float64)
        U, _, Vh = torch.linalg.svd(T, full_matrices=False)
        self.base = (U @ Vh).to(device=W.device, dtype=W.dtype)
        return torch.zeros_like(W)


# --------------------------------------------------------------------------- OW: SOC
#: terms T of the truncated series exp(M) x ≈ Σ_{j=0..T} M^j x / j! (T convolutions per forward)
SOC_TERMS = 10
#: bound ρ on the operator norm of the scaled skew convolution: ‖M‖₂ ≤ SOC_RADIUS
SOC_RADIUS = 1.0


def soc_truncation_bound(terms: int = SOC_TERMS, radius: float = SOC_RADIUS) -> float:
    r"""Bound on ``‖JᵀJ − I‖₂`` of the SOC layer's linear map J = Σ_{j≤T} M^j/j! when M is
    skew-symmetric with ``‖M‖₂ ≤ ρ``: ``2ε + ε²`` with ``ε = ρ^{T+1}/(T+1)!``.

    M is normal with eigenvalues iλ, |λ| ≤ ρ, so J is normal with singular values
    ``|p_T(iλ)|`` (p_T the Taylor polynomial of exp) and ``p_T(iλ) = e^{iλ} − r``,
    ``|r| ≤ |λ|^{T+1}/(T+1)!`` (integral remainder; |e^{itλ}| = 1). Hence
    ``||p_T(iλ)|² − 1| ≤ 2|r| + |r|²``. T = 10, ρ = 1: 5.0e-8 (below float32 rounding of
    10 convolutions); T = 6: 4.0e-4.
    """
    eps = radius ** (terms + 1) / math.factorial(terms + 1)
    return 2 * eps + eps * eps


class SOCOrthogonal(FlatOrthogonal):
    r"""Skew-orthogonal convolution (SOC, Singla & Feizi 2021), the OW of the authors' code,
    as the weight half of ``ow_method="soc"``.

    The trainable tensor ``L`` (``parametrizations.weight.original``, shape (C, C, k, k),
    the layer's own weight at registration) is made **skew-adjoint as a convolution
    operator** and scaled: this parametrization returns the kernel

        M = c · (L − L*),   L*[o, i, a, b] = L[i, o, k−1−a, k−1−b]   (the adjoint's kernel)
        c = min(1, ρ / β(L − L*)),   β(K) = k · σ_max(K.reshape(C, C·k·k)),   ρ = SOC_RADIUS.

    For a stride-1, 'same'-padded conv (odd k) the adjoint of ``x ↦ conv(x, K)`` is exactly
    ``x ↦ conv(x, K*)`` with **zero** as well as **circular** padding (entry (o,p),(i,q) of
    the operator is K[o,i,q−p+k//2] in both, and zero padding drops the same out-of-image
    taps on both sides), so ``x ↦ conv(x, M)`` is an exactly skew-symmetric operator.
    ``β`` is a guaranteed bound on its operator norm for every image size and both paddings
    (``conv(x, K) = [K_1 … K_{k²}] [S_1x; …; S_{k²}x]`` with shifts ‖S_t‖ ≤ 1), so
    ``‖M‖₂ ≤ ρ`` always; generators inside the ball are not scaled (M = 0 gives the identity).
    The authors' code divides by a power-iteration *estimate* instead; the exact bound here
    needs no state, no image size, and makes the truncation error a guaranteed bound.

    The module's forward (installed by :func:`register_orthogonal`, see :data:`OW_METHODS`)
    then applies ``y = Σ_{j=0..T} M^j x / j! + bias``: T = ``SOC_TERMS`` convolutions of the
    *input* with the layer's own padding. Its linear part is orthogonal up to
    :func:`soc_truncation_bound` (5e-8 for the defaults). ``module.weight`` reads M, the
    generator of the operator, **not** a kernel the layer applies once; therefore SOC cannot
    be baked (:func:`bake`, ``orthofx.strip`` and :func:`plain_state_dict` refuse it).

    dtype: float16/bfloat16 weights compute M in float32 and return it in their dtype.
    """

    def __init__(
        self, shape: torch.Size | tuple[int, ...], terms: int = SOC_TERMS, radius: float = SOC_RADIUS
    ) -> None:
        nn.Module.__init__(self)  # FlatOrthogonal's state (base, low-rank route) is not used
        self.shape = torch.Size(shape)
        self.out, self.n = flat_shape(self.shape)
        self.k, self.n_big = min(self.out, self.n), max(self.out, self.n)
        self.wide = self.out < self.n
        self.method = "soc"
        self.lowrank = False
        self.terms = int(terms)
        self.radius = float(radius)

    def extra_repr(self) -> str:
        return f"method='soc', kernel={tuple(self.shape)}, terms={self.terms}, radius={self.radius:g}"

    def forward(self, L: Tensor) -> Tensor:
        cd = compute_dtype(L.dtype)
        with no_autocast(L.device.type):
            Lc = L.to(cd)
            K = Lc - Lc.transpose(0, 1).flip(-2, -1)
            beta = self.shape[-1] * torch.linalg.matrix_norm(K.reshape(K.shape[0], -1), ord=2)
            over = beta > self.radius
            c = torch.where(over, self.radius / torch.where(over, beta, 1.0), 1.0)
            return (K * c).to(L.dtype)

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """The generator is the given kernel itself (L = W); SOC has no inverse map."""
        check_weight(W, f"a weight of shape {tuple(W.shape)}", "OW(soc)")
        if W.shape != self.shape:
            raise TreatmentError(
                f"OW(soc): assigned a weight of shape {tuple(W.shape)} to a parametrization of "
                f"shape {tuple(self.shape)}"
            )
        return W.clone()


def _soc_forward(self: nn.Conv2d, input: Tensor) -> Tensor:
    """Forward of a Conv2d under SOC: ``Σ_{j=0..T} M^j x / j! + bias`` (M = ``self.weight``)."""
    M = self.weight
    terms = self.parametrizations.weight[0].terms
    z = term = input
    for j in range(1, terms + 1):
        term = self._conv_forward(term, M, None) / j
        z = z + term
    if self.bias is not None:
        z = z + self.bias[:, None, None]
    return z


def _soc_build(module: nn.Module, name: str, W: Tensor, label: str, lowrank: bool | None) -> nn.Module:
    """SOCOrthogonal for a supported conv; TreatmentError naming the layer and the reason."""
    why = None
    if not isinstance(module, nn.Conv2d):
        why = (f"it is a {type(module).__name__}, SOC is a convolution operator and needs an nn.Conv2d "
               "(use ow_method='expm' or 'cayley' for this layer)")
    elif name != "weight":
        why = f"SOC replaces the conv's forward and acts on its 'weight', not {name!r}"
    elif type(module).forward is not nn.Conv2d.forward:
        why = f"its class {type(module).__name__} overrides forward, which SOC would replace"
    else:
        k = module.kernel_size
        if module.in_channels != module.out_channels:
            why = (f"in_channels={module.in_channels} != out_channels={module.out_channels}; an "
                   "orthogonal operator exp(M) needs a square map")
        elif module.groups != 1:
            why = f"groups={module.groups}; SOC needs groups=1"
        elif module.stride != (1, 1) or module.dilation != (1, 1):
            why = f"stride={module.stride}, dilation={module.dilation}; SOC needs stride 1 and dilation 1"
        elif k[0] != k[1] or k[0] % 2 == 0:
            why = f"kernel_size={k}; SOC needs a square kernel of odd size"
        elif module.padding not in ("same", (k[0] // 2, k[1] // 2)):
            why = f"padding={module.padding}; SOC needs 'same' padding ({k[0] // 2})"
        elif module.padding_mode not in ("zeros", "circular"):
            why = (f"padding_mode={module.padding_mode!r}; only 'zeros' and 'circular' padding keep "
                   "the adjoint a convolution")
    if why is not None:
        raise TreatmentError(f"OW(soc) cannot be applied to {label}: {why}")
    if lowrank is not None:
        raise ConfigError(f"OW(soc) on {label}: lowrank applies only to 'expm'/'cayley'")
    return SOCOrthogonal(W.shape)


# --------------------------------------------------------------------------- OW methods
@dataclass(frozen=True)
class OWMethodSpec:
    """One OW method: how :func:`register_orthogonal` builds it and what baking may do.

    Attributes:
        build: ``(module, name, weight, label, lowrank) -> parametrization`` (a
            :class:`FlatOrthogonal`, so ``treatment_of`` reports ``"ow"``); raises
            :class:`TreatmentError` naming ``label`` for a producer it does not support.
        forward: replaces the module's forward after registration (set on the class
            ``parametrize`` made for this module, so ``remove_parametrizations`` drops it);
            ``None``: the module applies its parametrized weight as usual.
        bakeable: whether :func:`bake` / ``orthofx.strip`` / :func:`plain_state_dict` can
            replace it by a plain weight of the same module.
        summary: one line for messages and docs.
    """

    build: Callable[[nn.Module, str, Tensor, str, bool | None], nn.Module]
    forward: Callable[..., Tensor] | None = None
    bakeable: bool = True
    summary: str = ""


def _flat_build(method: str) -> Callable[[nn.Module, str, Tensor, str, bool | None], nn.Module]:
    return lambda module, name, W, label, lowrank: FlatOrthogonal(W.shape, method, lowrank)


#: the OW methods (``OrthoConfig.ow_method``); a new weight treatment is one entry here
OW_METHODS: dict[str, OWMethodSpec] = {
    "expm": OWMethodSpec(_flat_build("expm"), summary="exp of a skew matrix on the flattened weight"),
    "cayley": OWMethodSpec(_flat_build("cayley"), summary="Cayley map on the flattened weight"),
    "soc": OWMethodSpec(
        _soc_build, forward=_soc_forward, bakeable=False,
        summary="skew-orthogonal convolution: stride-1 'same' Conv2d, in == out, odd square kernel",
    ),
}
_OW_METHODS = tuple(OW_METHODS)


def _unbakeable(module: nn.Module, name: str, label: str, what: str) -> None:
    """Raise TreatmentError if ``module.<name>`` carries an OW method that cannot be baked."""
    for p in _existing(module, name):
        if isinstance(p, FlatOrthogonal) and not OW_METHODS[p.method].bakeable:
            raise TreatmentError(
                f"{what}: {label} carries OW method {p.method!r} ({OW_METHODS[p.method].summary}). "
                "The layer applies exp(M) x ≈ Σ_j M^j x / j!, a series of convolutions of the input; "
                "that is no single kernel of the layer's shape (its receptive field grows to "
                "(k−1)·T+1, and the padding of each term breaks translation invariance), so it "
                "cannot be baked into a plain Conv2d. Keep the transformed model (it runs, trains "
                "and exports as it is) and use save_checkpoint/load_checkpoint to store it"
            )


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
    return f"{qualname}.{name}" if qualname else f"{type(module).__name__}.{name}"


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


def register_orthogonal(
    module: nn.Module,
    name: str = "weight",
    *,
    method: OWMethod = "expm",
    lowrank: bool | None = None,
    qualname: str | None = None,
) -> bool:
    """Register :class:`FlatOrthogonal` on ``module.<name>`` (OW). Idempotent.

    After registration ``module.<name>`` is the nearest orthogonal matrix to the old weight
    (rows orthonormal if out ≤ in·k·k, else columns), the trainable tensor is
    ``module.parametrizations.<name>.original`` (same Parameter object as before, now holding
    ``A = 0``, same shape) and the buffer ``...<name>.0.base`` holds ``Y₀``.

    ``method`` is a key of :data:`OW_METHODS`. ``"soc"`` (:class:`SOCOrthogonal`) applies
    only to an ``nn.Conv2d`` with stride 1, dilation 1, groups 1, in == out channels, an odd
    square kernel and 'same' padding (zeros or circular); any other producer raises
    :class:`TreatmentError` naming it and why (no fallback to another method). It keeps the
    weight as the generator L and replaces the module's forward by the SOC series.

    Returns ``True`` if registered now, ``False`` if an identical OW was already there.
    Raises :class:`TreatmentError` for a non-float or 1-D weight, or when ``<name>`` already
    carries another parametrization (bake or remove it first — they are never stacked);
    :class:`ConfigError` for an unknown method. ``qualname`` only improves messages.
    """
    label = _label(module, name, qualname)
    spec = OW_METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ConfigError(f"OW on {label}: method={method!r}; use one of {_OW_METHODS}")
    existing = _existing(module, name)
    if existing:
        if len(existing) == 1 and isinstance(existing[0], FlatOrthogonal):
            if existing[0].method == method and (lowrank is None or existing[0].lowrank == lowrank):
                return False
            raise TreatmentError(
                f"OW on {label}: already registered with method={existing[0].method!r}; "
                "bake() it before registering another method"
            )
        raise TreatmentError(
            f"OW on {label}: it already carries parametrization(s) {_describe(existing)}; "
            "orthofx never stacks parametrizations (bake() or remove them first)"
        )
    W = _current_tensor(module, name, label)
    check_weight(W, label, "OW")
    parametrization = spec.build(module, name, W, label, lowrank)
    parametrize.register_parametrization(module, name, parametrization)
    if spec.forward is not None:
        type(module).forward = spec.forward  # the class parametrize made for this module only
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


# --------------------------------------------------------------------------- baking
_OURS = (FlatOrthogonal, FlatSpectralNorm)


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


def bake(module: nn.Module, name: str = "weight", *, qualname: str | None = None) -> bool:
    """Replace the parametrization of ``module.<name>`` by its current value.

    ``parametrize.remove_parametrizations(module, name, leave_parametrized=True)``: the
    Parameter object that was ``parametrizations.<name>.original`` becomes ``module.<name>``
    again holding the parametrized value (so the state-dict key is ``<name>`` again and
    optimizers still hold the same object). Returns ``False`` if there was nothing to bake.
    Raises :class:`TreatmentError` (module unchanged) for an OW method that is not a weight
    (``"soc"``: see :class:`SOCOrthogonal`).
    """
    if not parametrize.is_parametrized(module, name):
        return False
    _unbakeable(module, name, _label(module, name, qualname), "bake")
    _private_class(module)
    with torch.no_grad():
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return True


def _private_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its parametrized class.

    ``parametrize`` injects one class per module, but ``copy.deepcopy`` of a parametrized
    module keeps that class object, so the original and the copy share it, and
    ``remove_parametrizations`` deletes the tensor's property *from the class*: baking a deep
    copy would break the original (torch behaviour, reproduced in tests/test_transform.py).
    A sibling class with the same attributes makes the removal local to ``module``.
    """
    cls = type(module)
    attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, attrs)


def bake_all(model: nn.Module, *, only_orthofx: bool = True) -> list[str]:
    """:func:`bake` every parametrized tensor in ``model`` (by default only OW/SN made by
    orthofx or torch's spectral norm); returns the qualified names baked. An OW that cannot
    be baked (``"soc"``) raises :class:`TreatmentError` before anything is baked."""
    todo: list[tuple[str, nn.Module, str]] = []
    for qn, m in list(model.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        for tname in list(m.parametrizations.keys()):
            if only_orthofx and treatment_of(m, tname) not in ("ow", "sn"):
                continue
            todo.append((f"{qn}.{tname}" if qn else tname, m, tname))
    for full, m, tname in todo:
        _unbakeable(m, tname, full, "bake/strip")
    for full, m, tname in todo:
        bake(m, tname, qualname=full.rpartition(".")[0] or None)
    return [full for full, _, _ in todo]


def plain_state_dict(model: nn.Module, *, keep_vars: bool = False) -> dict[str, Tensor]:
    """``model.state_dict()`` with every parametrized tensor replaced by its value under its
    original key (``conv.weight``) and the ``parametrizations.*`` entries (``original``,
    ``0.base``, SN's ``_u``/``_v``) dropped — what :func:`bake_all` would give, without
    mutating ``model``. Note that ``original`` of OW is the generator A, not the weight, so
    keys must never be renamed without computing the value. An OW that cannot be baked
    (``"soc"``, whose ``weight`` is the generator of an operator) raises
    :class:`TreatmentError`."""
    for qn, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for tname in m.parametrizations.keys():
                _unbakeable(m, tname, f"{qn}.{tname}" if qn else tname, "plain_state_dict")
    sd = model.state_dict(keep_vars=keep_vars)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if ".parametrizations." in f".{k}":
            continue
        out[k] = v
    for qn, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for tname in m.parametrizations.keys():
            with torch.no_grad():
                val = getattr(m, tname)
            out[f"{qn}.{tname}" if qn else tname] = val if keep_vars else val.detach()
    return out
