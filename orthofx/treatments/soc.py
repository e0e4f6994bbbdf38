r"""OW method ``"soc"``: the skew-orthogonal convolution (SOC, Singla & Feizi 2021) as the
paper's authors use it for OW (their ``models/skew_symmetric_conv.py``). An orthogonal
*operator* ``y = exp(M) x``, not an orthogonal weight.

* :class:`SOCOrthogonal` — the parametrization: a new generator ``L`` (C, C, k, k) ↦ the
  normalised skew-adjoint kernel ``M = ρ (L − L*) / σ̂(L − L*)``.
* :func:`soc_forward` — the conv's forward under SOC (downsampling, channel padding, the
  Taylor series of convolutions, the bias).
* :func:`soc_build` — checks the producer and builds the parametrization (the ``"soc"``
  entry of :data:`orthofx.treatments.weight.OW_METHODS`).
* :func:`soc_truncation_bound` — the series' deviation from an orthogonal operator.

This module imports :mod:`orthofx.treatments.flat_ow`, never :mod:`orthofx.treatments.weight`
(which imports this one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from orthofx.errors import ConfigError, TreatmentError
from orthofx.linalg._checks import no_autocast
from orthofx.treatments._common import compute_dtype, flat_shape
from orthofx.treatments.flat_ow import POWER_EVAL_ITERS, POWER_INIT_ITERS, FlatOrthogonal, _power_step, _unit

__all__ = [
    "SOCOrthogonal",
    "SOC_TERMS",
    "SOC_EVAL_TERMS",
    "SOC_RADIUS",
    "SOC_NOT_BAKEABLE",
    "soc_build",
    "soc_forward",
    "soc_grid",
    "soc_truncation_bound",
]

#: Taylor terms T of exp(M) x ≈ Σ_{j=0..T} M^j x / j! in training (the authors' 5) ...
SOC_TERMS = 5
#: ... and in eval (the authors' 10)
SOC_EVAL_TERMS = 10
#: ρ = ‖M‖₂ of the normalised skew convolution (the authors' ``correction`` 0.7)
SOC_RADIUS = 0.7
#: why SOC cannot be baked into its conv (the refusal of ``bake``/``strip``/``plain_state_dict``)
SOC_NOT_BAKEABLE = (
    "The layer applies exp(M) x ≈ Σ_j M^j x / j!, a series of convolutions of the input; that is "
    "no single kernel of the layer's shape (its receptive field grows to (k−1)·T+1, and the padding "
    "of each term breaks translation invariance), so it cannot be baked into a plain Conv2d."
)


def soc_truncation_bound(terms: int = SOC_TERMS, radius: float = SOC_RADIUS) -> float:
    r"""Bound on ``‖JᵀJ − I‖₂`` of ``J = Σ_{j≤T} M^j/j!`` for a skew-symmetric operator M with
    ``‖M‖₂ ≤ ρ``: ``2ε + ε²``, ``ε = ρ^{T+1}/(T+1)!``.

    M is normal with eigenvalues iλ, |λ| ≤ ρ, so J is normal with singular values
    ``|p_T(iλ)|`` (p_T the Taylor polynomial of exp) and ``p_T(iλ) = e^{iλ} − r`` with
    ``|r| ≤ |λ|^{T+1}/(T+1)!`` (integral remainder, |e^{itλ}| = 1); hence
    ``||p_T(iλ)|² − 1| ≤ 2|r| + |r|²``. ρ = 0.7: T = 5 → 3.3e-4, T = 10 → 1.0e-9.
    """
    eps = radius ** (terms + 1) / math.factorial(terms + 1)
    return 2 * eps + eps * eps


def soc_kernel(kernel: int, stride: int) -> int:
    """The SOC kernel on the s-downsampled grid of a k×k, stride-s conv: the smallest odd
    ``k_s ≥ ⌈k/s⌉`` (``k`` for stride 1). One k_s×k_s window of the downsampled grid covers
    ``k_s·s ≥ k`` input pixels per side, the original conv's receptive field, at ``(k_s/k)²`` of
    the cost of keeping k there (5×5 stride 2 → 3×3: 0.36×)."""
    q = -(-int(kernel) // int(stride))
    return q if q % 2 == 1 else q + 1


def soc_grid(kernel: int) -> int:
    """Side N of the N×N frequency grid of σ̂ for a k×k kernel: ``max(16, 2^⌈log2(2k+2)⌉)``
    (16 up to k = 7)."""
    return max(16, 1 << (2 * kernel + 1).bit_length())


def _adjoint_skew(L: Tensor) -> Tensor:
    """``L − L*`` with ``L*[o, i, a, b] = L[i, o, k−1−a, k−1−b]``, the kernel of the adjoint of
    ``x ↦ conv(x, L)`` ('same' padding, odd k; zero and circular padding alike)."""
    return L - L.transpose(0, 1).flip(-2, -1)


class SOCOrthogonal(FlatOrthogonal):
    r"""Skew-orthogonal convolution (SOC), the OW of the authors' code, as the weight half of
    ``ow_method="soc"``; :func:`soc_forward` is the other half.

    **Generator.** ``parametrizations.weight.original`` is a *new* trainable tensor ``L`` of
    shape ``(C, C, k, k)``, ``C = max(in·s², out)`` (s the stride; k = :func:`soc_kernel` of the
    layer's kernel and stride: the layer's own k for stride 1, 3 for a 5×5 stride-2 stem), drawn at registration
    from ``N(0, 1/C)`` (variance 1/C, the authors' init; random and nonzero). The values of
    the conv's own weight are **not used**: like the authors, who build their SOC layers from
    scratch, the layer starts from a random orthogonal operator (``module.weight = X`` later
    with X of shape (C, C, k, k) sets ``L = X``, a right inverse on the image: a skew-adjoint
    X with σ̂(X) = ρ maps to itself). This parametrization returns the kernel

        M = ρ · K / σ̂(K),   K = L − L*,   L*[o, i, a, b] = L[i, o, k−1−a, k−1−b],

    registered with ``unsafe=True``: ``module.weight`` reads M, shape (C, C, k, k), the
    generator of the operator, **not** a kernel the layer applies once; therefore SOC cannot
    be baked (:func:`~orthofx.treatments.baking.bake`, ``orthofx.strip`` and
    ``plain_state_dict`` refuse it). For a stride-1 'same'-padded conv with odd k the adjoint
    of ``x ↦ conv(x, K)`` is exactly ``x ↦ conv(x, K*)`` with zero as well as circular
    padding, so ``x ↦ conv(x, M)`` is an exactly skew-symmetric operator. M does not change
    when L is scaled by any ``c > 0`` (same buffers).

    **σ̂, the operator norm.** For circular padding on an H×W image the conv is block
    circulant, with norm ``max_ω σ_max(K̂(ω))`` over the H×W DFT frequencies, where
    ``K̂(ω) = Σ_{a,b} K[:, :, a, b] e^{−i(ω₁a + ω₂b)}`` (C×C, complex); the norm over all image
    sizes is the sup over the torus. Zero padding is a compression of a circular conv on a
    larger image, so its norm is at most that. σ̂ samples the torus on a fixed N×N grid
    (:func:`soc_grid`: N = 16 for k ≤ 7; ``torch.fft.rfft2`` of the zero-padded kernel rolled
    to centre it, the half-spectrum since K̂(−ω) = conj K̂(ω); K̂(ω) is skew-Hermitian) and
    runs a power iteration on ``K̂ᴴK̂ = −K̂²`` batched over the
    ``F = N(N/2+1)`` frequencies: ``σ̂ = max_f ‖K̂(ω_f) v_f‖`` with unit vectors ``v_f`` (buffer
    ``_v``, real, shape (2, F, C): real and imaginary parts; no gradient through them, as in
    torch's ``spectral_norm``). One iteration per training forward (buffer updated before
    σ̂ is read), ``POWER_EVAL_ITERS = 100`` from the carried vectors in eval (not written
    back: eval forwards are pure), ``POWER_INIT_ITERS = 200`` from a random start at
    registration. Accuracy: any unit v gives σ̂ ≤ the grid norm, so ‖M‖₂ ≥ ρ on the grid;
    in eval ``‖M‖₂ = ρ`` on N×N circular images to ≤ 1e-4 relative (measured, float64,
    tests/test_ow_soc.py). The grid underestimates the sup over the torus by ≤ 1 % (measured,
    random kernels k = 3, 5: 0.4–1.0 % vs a 128×128 grid), so on other image sizes ‖M‖₂ ≤
    1.01 ρ and the truncation bound below holds with ρ·1.01 (3.5e-4 for T = 5). Cost per
    forward: one rfft2 of the C²k² kernel (O(C²N² log N)) and 2·(1 train / 100 eval) batched
    C×C complex matvecs over F = 144 frequencies (C = 64: 1.2M complex MACs per iteration),
    small next to the T convolutions of a batch.

    **Operator** (:func:`soc_forward`): ``y = P_out Σ_{j=0..T} M^j/j! E_C U_s x + bias`` with
    U_s: zero-pad H, W at the bottom/right to multiples of s and ``pixel_unshuffle(·, s)``
    (an isometry, in → in·s² channels); E_C: zero-pad the channels to C (an isometry);
    T convolutions with 'same' padding k//2 (the layer's padding mode) on the downsampled
    grid, T = ``terms`` in training and ``eval_terms`` in eval; P_out keeps the first ``out``
    channels. So for ``in·s² ≤ out`` the linear part J is an isometry (JᵀJ = I), for
    ``in·s² > out`` a partial isometry with orthonormal rows (JJᵀ = I when H, W are multiples
    of s), each up to :func:`soc_truncation_bound` (3.3e-4 / 1.0e-9 for T = 5 / 10, ρ = 0.7).
    The output has the original conv's shape (stride s, padding k//2: ⌈H/s⌉ × ⌈W/s⌉).

    dtype: float16/bfloat16 generators compute K̂, σ̂ and M in float32 (complex64) and
    return M in their dtype; the series runs in the input's dtype like the plain conv. ``_v``
    is real, so ``.to(dtype)``, ``.double()``, ``state_dict`` and ``copy.deepcopy`` keep it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        padding_mode: str = "zeros",
        radius: float = SOC_RADIUS,
        terms: int = SOC_TERMS,
        eval_terms: int = SOC_EVAL_TERMS,
    ) -> None:
        nn.Module.__init__(self)  # FlatOrthogonal's state (base, low-rank route) is not used
        self.method = "soc"
        self.generator = "normalized"
        self.lowrank = False
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel, self.stride, self.padding_mode = int(kernel), int(stride), padding_mode
        self.channels = max(self.in_channels * self.stride**2, self.out_channels)
        C = self.channels
        self.shape = torch.Size((C, C, self.kernel, self.kernel))  # the generator's shape
        self.out, self.n = flat_shape(self.shape)
        self.k, self.n_big = min(self.out, self.n), max(self.out, self.n)
        self.wide = self.out < self.n
        self.radius, self.terms, self.eval_terms = float(radius), int(terms), int(eval_terms)
        self.grid = soc_grid(self.kernel)
        self.register_buffer("_v", torch.zeros(2, self.grid * (self.grid // 2 + 1), C))
        self._fresh = True  # the next right_inverse is the registration: draw L

    def extra_repr(self) -> str:
        return (
            f"method='soc', in={self.in_channels}, out={self.out_channels}, stride={self.stride}, "
            f"generator={tuple(self.shape)}, radius={self.radius:g}, terms={self.terms}, "
            f"eval_terms={self.eval_terms}, grid={self.grid}x{self.grid}"
        )

    def symbol(self, K: Tensor) -> Tensor:
        """``K̂(ω_f) = Σ_{a,b} K[:, :, a, b] e^{−i ω_f·((a, b) − c)}`` (centred, c = (k//2, k//2))
        on the half grid: (F, C, C) complex, ``F = N(N/2+1)``. Skew-Hermitian for a
        skew-adjoint K (``K̂(ω)ᴴ = (L − L*)^(ω)ᴴ = −K̂(ω)``)."""
        C, n, c = K.shape[0], self.grid, self.kernel // 2
        Kp = F.pad(K, (0, n - self.kernel, 0, n - self.kernel)).roll((-c, -c), dims=(-2, -1))
        return torch.fft.rfft2(Kp).permute(2, 3, 0, 1).reshape(-1, C, C)

    def sigma(self, K: Tensor) -> Tensor:
        """σ̂(K) (0-d, differentiable in K; the iteration vectors are detached); see the class."""
        A = self.symbol(K)
        with torch.no_grad():
            v = torch.complex(self._v[0].to(K.dtype), self._v[1].to(K.dtype)).unsqueeze(-1)
            if self.training:
                v = _power_step(v, -(A @ (A @ v)), dim=-2)  # Aᴴ = −A (K̂(ω) is skew-Hermitian)
                self._v.copy_(torch.stack([v.real, v.imag]).squeeze(-1))
            else:
                v = _iterate(A, v, POWER_EVAL_ITERS)
        sig = torch.linalg.vector_norm(A @ v, dim=(-2, -1)).amax()
        return sig.clamp_min(torch.finfo(K.dtype).tiny)

    def forward(self, L: Tensor) -> Tensor:
        with no_autocast(L.device.type):  # rfft2 and σ̂ in ≥ float32, also under AMP
            K = _adjoint_skew(L.to(compute_dtype(L.dtype)))
            return (K * (self.radius / self.sigma(K))).to(L.dtype)

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """At registration: a fresh ``L ~ N(0, 1/C)`` of shape (C, C, k, k) (W's values unused,
        W's dtype and device); afterwards (``module.weight = X``): ``L = X`` for X of that
        shape. Either way the iteration vectors restart: ``POWER_INIT_ITERS`` from random."""
        cd = compute_dtype(W.dtype)
        if self._fresh:
            L = torch.randn(self.shape, dtype=cd, device=W.device) / math.sqrt(self.channels)
        elif W.shape != self.shape:
            raise TreatmentError(
                f"OW(soc): assigned a tensor of shape {tuple(W.shape)}; the generator has shape "
                f"{tuple(self.shape)}"
            )
        else:
            L = W.to(cd)
        self._fresh = False
        A = self.symbol(_adjoint_skew(L))
        v = _unit(torch.randn(A.shape[0], self.channels, 1, dtype=A.dtype, device=W.device), dim=-2)
        v = _iterate(A, v, POWER_INIT_ITERS)
        self._v = torch.stack([v.real, v.imag]).squeeze(-1).to(W.dtype)
        return L.to(W.dtype).clone()


def _iterate(A: Tensor, v: Tensor, iters: int) -> Tensor:
    """``iters`` power-iteration steps on ``B = AᴴA = −A²`` (A skew-Hermitian, batched over
    frequencies; B is formed once, one batched GEMM, so each step is one matvec)."""
    B = -(A @ A)
    for _ in range(iters):
        v = _power_step(v, B @ v, dim=-2)
    return v


def _conv_same(x: Tensor, M: Tensor, pad: int, padding_mode: str) -> Tensor:
    """Stride-1 'same' conv of x with M, zero or circular padding ``pad`` (no bias)."""
    if padding_mode == "circular":
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="circular"), M)
    return F.conv2d(x, M, padding=pad)


def soc_forward(self: nn.Conv2d, input: Tensor) -> Tensor:
    """Forward of a Conv2d under SOC: ``P_out Σ_{j≤T} M^j/j! E_C U_s x + bias`` (M =
    ``self.weight``; T = ``terms`` in training, ``eval_terms`` in eval); see SOCOrthogonal."""
    p: SOCOrthogonal = self.parametrizations.weight[0]  # type: ignore[index,assignment]
    M = self.weight
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    s = p.stride
    if s > 1:
        ph, pw = (-x.shape[-2]) % s, (-x.shape[-1]) % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = F.pixel_unshuffle(x, s)
    if x.shape[-3] < p.channels:
        x = F.pad(x, (0, 0, 0, 0, 0, p.channels - x.shape[-3]))
    z = term = x
    for j in range(1, (p.terms if self.training else p.eval_terms) + 1):
        term = _conv_same(term, M, p.kernel // 2, p.padding_mode) / j
        z = z + term
    if p.out_channels < p.channels:
        z = z[:, : p.out_channels]
    if self.bias is not None:
        z = z + self.bias[:, None, None]
    return z.squeeze(0) if unbatched else z


def soc_build(
    module: nn.Module,
    name: str,
    W: Tensor,
    label: str,
    *,
    lowrank: bool | None = None,
    generator: str = "normalized",
    radius: float = SOC_RADIUS,
    terms: int = SOC_TERMS,
    eval_terms: int = SOC_EVAL_TERMS,
) -> SOCOrthogonal:
    """SOCOrthogonal for a supported Conv2d; TreatmentError naming the layer and the reason.

    Supported: ``nn.Conv2d`` (its class not overriding forward), ``groups=1``,
    ``dilation=1``, a square odd kernel, a square stride s ≥ 1, padding ``k//2`` ('same'
    for stride 1), ``padding_mode`` 'zeros' or 'circular'; any in/out channels. ``generator``
    is ignored (SOC is always normalised)."""
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
        if module.groups != 1:
            why = f"groups={module.groups}; SOC needs groups=1"
        elif module.dilation != (1, 1):
            why = f"dilation={module.dilation}; SOC needs dilation 1"
        elif k[0] != k[1] or k[0] % 2 == 0:
            why = f"kernel_size={k}; SOC needs a square kernel of odd size"
        elif module.stride[0] != module.stride[1]:
            why = f"stride={module.stride}; SOC needs a square stride (s, s)"
        elif module.padding not in ("same", (k[0] // 2, k[1] // 2)):
            why = f"padding={module.padding}; SOC needs padding k//2 = {k[0] // 2} ('same' for stride 1)"
        elif module.padding_mode not in ("zeros", "circular"):
            why = (f"padding_mode={module.padding_mode!r}; only 'zeros' and 'circular' padding keep "
                   "the adjoint a convolution")
    if why is not None:
        raise TreatmentError(f"OW(soc) cannot be applied to {label}: {why}")
    if lowrank is not None:
        raise ConfigError(f"OW(soc) on {label}: lowrank applies only to 'expm'/'cayley'")
    assert isinstance(module, nn.Conv2d)
    return SOCOrthogonal(
        module.in_channels, module.out_channels, soc_kernel(module.kernel_size[0], module.stride[0]), module.stride[0],
        module.padding_mode, radius=radius, terms=terms, eval_terms=eval_terms,
    )
