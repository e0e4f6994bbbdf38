"""OW method "soc": the authors' skew-orthogonal convolution (orthofx/treatments/soc.py).

The layer's linear map is J = P_out Σ_{j≤T} M^j/j! E_C U_s with M = x ↦ conv(x, M_kernel) an
exactly skew-symmetric operator (zero and circular 'same' padding alike), ‖M‖₂ = ρ on the
16×16 frequency grid of σ̂ (≤ 1.01 ρ on other sizes). Tolerances: ‖JᵀJ − I‖₂ (or ‖JJᵀ − I‖₂ when
in·s² > out) ≤ soc_truncation_bound(T, ρ') + 1e-12 (float64 rounding of ≤ 10 convolutions),
ρ' = ρ for circular padding on a (downsampled) grid whose side divides 16 (its frequencies lie on
the 16×16 grid of σ̂) and 1.01 ρ otherwise (zero padding, other sizes). All references are float64.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import orthofx
from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import weight as W
from orthofx.treatments.soc import SOC_EVAL_TERMS, SOC_RADIUS, SOC_TERMS, SOCOrthogonal, _conv_same, soc_grid
from orthofx.treatments.weight import (
    OW_METHODS,
    bake,
    bake_all,
    plain_state_dict,
    register_orthogonal,
    soc_truncation_bound,
    treatment_of,
)

from corpora.gcp import cov_sqrt
from ow_checks import assert_invariant_to_generator_scale

F64 = torch.float64
RHO = SOC_RADIUS


def _soc(i: int, o: int, k: int = 3, s: int = 1, mode: str = "zeros", seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(i, o, k, stride=s, padding=k // 2, padding_mode=mode).double()
    assert register_orthogonal(conv, method="soc", **kw) is True
    return conv


def _jacobian(layer: nn.Module, i: int, h: int, w: int) -> torch.Tensor:
    """The dense float64 Jacobian (out·h'·w' × i·h·w) of the layer's linear part (no bias):
    the layer applied to the standard basis."""
    basis = torch.eye(i * h * w, dtype=F64).reshape(-1, i, h, w)
    with torch.no_grad():
        y = layer(basis)
        if getattr(layer, "bias", None) is not None:
            y = y - layer.bias[:, None, None]
    return y.reshape(basis.shape[0], -1).T


def _gram_err(J: torch.Tensor) -> float:
    """‖JᵀJ − I‖₂ for a tall/square J, ‖JJᵀ − I‖₂ for a wide one."""
    G = J.T @ J if J.shape[0] >= J.shape[1] else J @ J.T
    return torch.linalg.eigvalsh(G - torch.eye(G.shape[0], dtype=F64)).abs().max().item()


def _grid_norm(M: torch.Tensor, n: int = 16) -> float:
    """Exact ‖x ↦ conv(x, M)‖₂ for circular padding on n×n images: max_ω σ_max(M̂(ω)), float64."""
    A = torch.fft.fft2(M.detach().to(F64), s=(n, n)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(A, ord=2).max().item()


# ------------------------------------------------------------------ config / constants
def test_config_accepts_soc_and_matches_the_registry():
    cfg = OrthoConfig.from_preset("ow", ow_method="soc")
    assert cfg.weight == "ow" and cfg.ow_method == "soc"
    assert OrthoConfig.from_dict(cfg.to_dict()).ow_method == "soc"
    from orthofx.vocab import OW_METHOD_NAMES as config_methods

    assert tuple(config_methods) == tuple(OW_METHODS) == ("expm", "cayley", "soc")
    with pytest.raises(ConfigError):
        OrthoConfig.from_preset("ow", ow_method="socc")


def test_truncation_bound_is_the_authors_setting():
    assert (SOC_TERMS, SOC_EVAL_TERMS, SOC_RADIUS) == (5, 10, 0.7)
    eps = 0.7**6 / math.factorial(6)
    assert soc_truncation_bound() == pytest.approx(2 * eps + eps**2)
    assert soc_truncation_bound(5, 0.7) == pytest.approx(3.27e-4, rel=1e-2)
    assert 9e-10 < soc_truncation_bound(10, 0.7) < 1.1e-9
    assert soc_grid(3) == soc_grid(5) == soc_grid(7) == 16 and soc_grid(9) == 32


# ------------------------------------------------------------------ the generator
def test_generator_is_new_random_and_the_user_weight_is_unused():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 64, 5, stride=2, padding=2)
    w_user = conv.weight
    register_orthogonal(conv, method="soc")
    L = conv.parametrizations.weight.original
    p = conv.parametrizations.weight[0]
    assert L.shape == (64, 64, 3, 3) and p.channels == 64  # C = max(in·s², out) = max(4, 64); k_s = 3
    assert L is w_user  # parametrize keeps the Parameter object (optimizers built before still hold it)
    assert L.abs().min() > 0 and L.var().item() == pytest.approx(1 / 64, rel=0.05)  # N(0, 1/C)
    assert conv.weight.shape == (64, 64, 3, 3)  # M, the generator of the operator (on the 2× grid)
    # C = in·s² when that is larger: 4 → 8 at stride 2 gives C = 16
    assert _soc(4, 8, 3, 2).parametrizations.weight.original.shape == (16, 16, 3, 3)
    # the user's weight values do not matter: same seed for the draw, different weights
    a, b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        b.weight.mul_(100)
    torch.manual_seed(5)
    register_orthogonal(a, method="soc")
    torch.manual_seed(5)
    register_orthogonal(b, method="soc")
    torch.testing.assert_close(a.parametrizations.weight.original, b.parametrizations.weight.original, rtol=0, atol=0)


# ------------------------------------------------------------------ orthogonality
# (in, out, k, stride, image): the project's DBN stem, the authors' 3→64 stem, a square 16→16,
# in·s² > out (orthonormal rows), and an odd image size at stride 2
SHAPES = {
    "dbn_stem_1to64_5x5_s2": (1, 64, 5, 2, 8),
    "authors_stem_3to64_3x3": (3, 64, 3, 1, 4),
    "square_16": (16, 16, 3, 1, 6),
    "rows_4to8_s2": (4, 8, 3, 2, 8),
    "odd_image_2to16_s2": (2, 16, 3, 2, 7),
}


# the two 64-channel stems (dense Jacobians of 4096 columns) and the 16-channel circular case
# take 6-10 s of CPU each: slow; the small shapes cover both paddings and both strides fast
_HEAVY = {"dbn_stem_1to64_5x5_s2", "authors_stem_3to64_3x3"}


def _slow_if(heavy: bool, *values, id: str | None = None):
    """``pytest.param(*values)``, marked slow when ``heavy``."""
    return pytest.param(*values, id=id, marks=[pytest.mark.slow] if heavy else [])


@pytest.mark.parametrize("shape,mode", [
    _slow_if(s in _HEAVY or (s, m) == ("square_16", "circular"), s, m, id=f"{s}-{m}")
    for s in SHAPES for m in ("circular", "zeros")])
def test_operator_is_orthogonal_in_eval_and_train(shape, mode):
    i, o, k, s, hw = SHAPES[shape]
    conv = _soc(i, o, k, s, mode).eval()
    p = conv.parametrizations.weight[0]
    plain = nn.Conv2d(i, o, k, stride=s, padding=k // 2, padding_mode=mode).double()
    x = torch.randn(2, i, hw, hw, dtype=F64)
    assert conv(x).shape == plain(x).shape  # the original conv's output shape
    rho = RHO if (mode == "circular" and 16 % math.ceil(hw / s) == 0) else 1.01 * RHO
    J = _jacobian(conv, i, hw, hw)
    err_eval = _gram_err(J)
    assert err_eval <= soc_truncation_bound(SOC_EVAL_TERMS, rho) + 1e-12
    # one convolution with M on the downsampled grid is an exactly skew operator
    d = math.ceil(hw / s)
    JM = _jacobian(lambda z: _conv_same(z, conv.weight, p.kernel // 2, mode), p.channels, d, d)
    assert (JM + JM.T).abs().max().item() <= 1e-15
    # training mode: T = 5 terms (σ̂ one iteration behind the eval value, ‖M‖ ≤ ρ(1 + 1e-6))
    conv.train()
    err_train = _gram_err(_jacobian(conv, i, hw, hw))
    assert err_train <= soc_truncation_bound(SOC_TERMS, rho * (1 + 1e-6)) + 1e-12
    assert err_train > 100 * soc_truncation_bound(SOC_EVAL_TERMS, rho)  # really fewer terms


@settings(max_examples=15)
@given(
    i=st.integers(1, 4), o=st.integers(1, 12), k=st.sampled_from([1, 3, 5]), s=st.integers(1, 3),
    h=st.integers(1, 7), w=st.integers(1, 7), mode=st.sampled_from(["zeros", "circular"]),
)
def test_output_shape_and_norm_preservation_over_shapes(i, o, k, s, h, w, mode):
    """Any channels, stride, odd kernel and image size: the conv's own output shape; the
    linear part preserves norms when in·s² ≤ out and has orthonormal rows when in·s² > out
    and the image is a multiple of s."""
    if mode == "circular" and (k // 2) > math.ceil(min(h, w) / s):
        return  # torch's circular padding needs pad ≤ the (downsampled) size
    conv = _soc(i, o, k, s, mode).eval()
    plain = nn.Conv2d(i, o, k, stride=s, padding=k // 2, padding_mode=mode).double()
    x = torch.randn(1, i, h, w, dtype=F64)
    assert conv(x).shape == plain(x).shape
    J = _jacobian(conv, i, h, w)
    tol = soc_truncation_bound(SOC_EVAL_TERMS, 1.01 * RHO) + 1e-12
    if i * s * s <= o:
        G = J.T @ J
        assert (G - torch.eye(G.shape[0], dtype=F64)).abs().max().item() <= tol
    elif h % s == 0 and w % s == 0:
        G = J @ J.T
        assert (G - torch.eye(G.shape[0], dtype=F64)).abs().max().item() <= tol


# ------------------------------------------------------------------ σ̂ and the normalisation
@pytest.mark.parametrize(
    "shape", [_slow_if(s in _HEAVY, s) for s in ("dbn_stem_1to64_5x5_s2", "authors_stem_3to64_3x3", "square_16")])
def test_eval_operator_norm_equals_radius(shape):
    i, o, k, s, _ = SHAPES[shape]
    conv = _soc(i, o, k, s, "circular")
    conv.eval()
    assert _grid_norm(conv.weight) == pytest.approx(RHO, rel=1e-4)  # measured: ≤ 1e-9
    # after SGD steps (the carried vectors track L with one iteration per step)
    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for _ in range(3):
        x = torch.randn(2, i, 8, 8, dtype=F64)
        opt.zero_grad()
        (conv(x)[:, 0].sum() + conv(x).square().mean()).backward()
        opt.step()
    with torch.no_grad():
        train_norm = _grid_norm(conv.weight)  # σ̂ ≤ the grid norm, so ‖M‖ ≥ ρ in training
    # one power iteration per step lags behind L: lr-0.5 steps on the 3×3 (stride-2) stem: 1.6e-4
    assert RHO * (1 - 1e-12) <= train_norm <= RHO * (1 + 1e-3)
    conv.eval()
    assert _grid_norm(conv.weight) == pytest.approx(RHO, rel=1e-4)


def test_eval_norm_from_the_dense_jacobian_on_the_grid():
    """The exact operator norm of x ↦ conv(x, M), circular padding, 16×16 images (the σ̂
    grid): the dense float64 Jacobian's largest singular value is ρ."""
    conv = _soc(4, 4, 3, 1, "circular", seed=3).eval()
    M = conv.weight.detach()
    JM = _jacobian(lambda z: _conv_same(z, M, 1, "circular"), 4, 16, 16)
    assert (JM + JM.T).abs().max().item() <= 1e-15
    assert torch.linalg.matrix_norm(JM, ord=2).item() == pytest.approx(RHO, rel=1e-4)


@pytest.mark.parametrize("c", [10.0, 1e-3])
def test_output_is_invariant_to_the_generator_scale(c):
    conv = _soc(3, 8, 3, 1, "zeros", seed=1)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    v_after = _after_one_step(conv, x)  # the carried vectors after a training forward of the unscaled conv
    scaled = assert_invariant_to_generator_scale(conv, x, c)
    torch.testing.assert_close(scaled.parametrizations.weight[0]._v, v_after, rtol=0, atol=1e-12)


def _after_one_step(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    other = copy.deepcopy(conv).train()
    other(x)
    return other.parametrizations.weight[0]._v


def test_eval_forward_is_pure_and_train_forward_updates_the_vectors():
    conv = _soc(3, 8, 3, 1, seed=2)
    v0 = conv.parametrizations.weight[0]._v.clone()
    x = torch.randn(1, 3, 5, 5, dtype=F64)
    conv.eval()
    y = conv(x)
    assert torch.equal(conv.parametrizations.weight[0]._v, v0)
    torch.testing.assert_close(conv(x), y, rtol=0, atol=0)
    conv.train()
    with torch.no_grad():
        conv.parametrizations.weight.original.add_(0.3 * torch.randn_like(conv.parametrizations.weight.original))
    conv(x)
    assert not torch.equal(conv.parametrizations.weight[0]._v, v0)


# ------------------------------------------------------------------ training
class Stem(nn.Module):
    """The DBN stem as real code writes it: conv → BN → ReLU, with a train-only noise branch."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 64, 5, stride=2, padding=2), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x + 0.01 * torch.randn_like(x)
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_training_forward_backward_and_sgd_step():
    torch.manual_seed(0)
    model = Stem()
    register_orthogonal(model.features[0], method="soc")
    L = model.features[0].parametrizations.weight.original
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))
    before = L.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(L.grad).all() and L.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(L.detach(), before)
    # float32 training keeps the operator a near-isometry (T = 5 terms; float32 rounding)
    conv = model.features[0]
    z = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        out = conv(z) - conv.bias[:, None, None]
    torch.testing.assert_close(out.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1), rtol=1e-3, atol=0)
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("s", [1, _slow_if(True, 2)])  # stride 2: ~13 s of CPU
def test_gradcheck_wrt_generator(s):
    """float64 gradcheck of the eval output w.r.t. L (and x, bias). In eval σ̂ has converged,
    so the detached iteration vectors are stationary and the analytic gradient is exact."""
    conv = _soc(1, 2, 3, s, "zeros", seed=4)
    p = conv.parametrizations.weight[0]
    p.eval_terms = 3
    conv.eval()
    L0 = conv.parametrizations.weight.original.detach().clone().requires_grad_(True)
    b0 = conv.bias.detach().clone().requires_grad_(True)
    x = torch.randn(1, 1, 3, 3, dtype=F64, requires_grad=True)

    def f(x, L, b):
        return functional_call(conv, {"parametrizations.weight.original": L, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, L0, b0), fast_mode=True)
    # the full (slow-mode) check w.r.t. L alone
    assert torch.autograd.gradcheck(lambda L: f(x.detach(), L, b0.detach()), (L0,))


# ------------------------------------------------------------------ modules: copy, state, dtype
def test_state_dict_roundtrip_deepcopy_and_dtype():
    conv = _soc(1, 16, 5, 2, seed=6)
    opt = torch.optim.SGD(conv.parameters(), lr=0.2)
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    conv(x).square().mean().backward()
    opt.step()
    conv.eval()
    ref = conv(x)
    sd = conv.state_dict()
    assert sd["parametrizations.weight.original"].shape == (16, 16, 3, 3)  # 5×5 stride 2 → 3×3 on the 2× grid
    assert "parametrizations.weight.0._v" in sd
    other = _soc(1, 16, 5, 2, seed=7).eval()  # a different random generator ...
    assert not torch.allclose(other(x), ref)
    other.load_state_dict(sd)  # ... replaced by the checkpoint
    torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    # deepcopy: same output, independent state
    twin = copy.deepcopy(conv)
    torch.testing.assert_close(twin(x), ref, rtol=0, atol=0)
    with torch.no_grad():
        twin.parametrizations.weight.original.add_(1.0)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=0)
    # .to(dtype): float32 (compute in float32), bfloat16 (σ̂ and M in float32, series in bfloat16)
    c32 = copy.deepcopy(conv).to(torch.float32)
    assert c32.parametrizations.weight[0]._v.dtype == torch.float32
    torch.testing.assert_close(c32(x.float()).double(), ref, rtol=0, atol=1e-5)
    cbf = copy.deepcopy(conv).to(torch.bfloat16)
    ybf = cbf(x.to(torch.bfloat16))
    assert ybf.dtype == torch.bfloat16 and torch.isfinite(ybf).all()
    torch.testing.assert_close(ybf.double(), ref, rtol=0, atol=0.1)


def test_unbatched_input():
    conv = _soc(2, 8, 3, 2, seed=8).eval()
    x = torch.randn(3, 2, 6, 6, dtype=F64)
    torch.testing.assert_close(conv(x[1]), conv(x)[1])


def test_assigning_a_skew_kernel_of_norm_rho_is_a_right_inverse():
    conv = _soc(3, 8, 3, 1, seed=9).eval()
    M = conv.weight.detach().clone()
    conv.weight = M  # L = M: M − M* = 2M, normalised back to M
    torch.testing.assert_close(conv.weight, M, rtol=0, atol=1e-12)
    with pytest.raises(TreatmentError, match="generator has shape"):
        conv.weight = torch.zeros(8, 3, 3, 3, dtype=F64)


# ------------------------------------------------------------------ unsupported producers
@pytest.mark.parametrize(
    "module, why",
    [
        (nn.Linear(4, 4), "Linear"),
        (nn.Conv2d(4, 4, 2, padding="same"), "odd"),
        (nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), "square kernel"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=0), "padding=(0, 0)"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=2), "padding=(2, 2)"),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), "dilation=(2, 2)"),
        (nn.Conv2d(4, 4, 3, stride=(2, 1), padding=1), "square stride"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv1d(4, 4, 3, padding=1), "Conv1d"),
    ],
)
def test_soc_refuses_unsupported_producers(module, why):
    with pytest.raises(TreatmentError, match="OW\\(soc\\) cannot be applied to body.layer.weight") as info:
        register_orthogonal(module, method="soc", qualname="body.layer")
    assert why in str(info.value)
    assert treatment_of(module) is None  # nothing registered


def test_soc_refuses_conv_subclass_with_own_forward_lowrank_and_bad_options():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TreatmentError, match="overrides forward"):
        register_orthogonal(MyConv(4, 4, 3, padding=1), method="soc")
    with pytest.raises(ConfigError, match="lowrank"):
        register_orthogonal(nn.Conv2d(4, 4, 3, padding=1), method="soc", lowrank=True)
    for bad in ({"terms": 0}, {"eval_terms": 2.5}, {"radius": 0.0}, {"radius": float("nan")}, {"terms": "5"}):
        m = nn.Conv2d(4, 4, 3, padding=1)
        with pytest.raises(ConfigError):
            register_orthogonal(m, method="soc", **bad)
        assert treatment_of(m) is None


def test_soc_registration_is_idempotent_and_never_stacks():
    conv = _soc(2, 2)
    assert register_orthogonal(conv, method="soc") is False
    assert register_orthogonal(conv, method="soc", generator="normalized") is False  # ignored by soc
    with pytest.raises(TreatmentError, match="other options"):
        register_orthogonal(conv, method="soc", terms=7)
    with pytest.raises(TreatmentError, match="already registered with method='soc'"):
        register_orthogonal(conv, method="expm")
    other = nn.Conv2d(2, 2, 3, padding=1)
    register_orthogonal(other, method="expm")
    with pytest.raises(TreatmentError, match="already registered with method='expm'"):
        register_orthogonal(other, method="soc")
    assert type(other).forward is nn.Conv2d.forward  # expm keeps the conv's own forward
    assert "terms=5" in repr(conv.parametrizations.weight[0]) and "eval_terms=10" in repr(conv)


# ------------------------------------------------------------------ baking / strip
def test_soc_cannot_be_baked():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1))
    register_orthogonal(model[0], method="soc")
    register_orthogonal(model[1], method="expm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TreatmentError, match="cannot be baked into a plain Conv2d"):
        bake(model[0])
    with pytest.raises(TreatmentError, match="0.weight carries OW method 'soc'"):
        bake_all(model)
    with pytest.raises(TreatmentError, match="soc"):
        plain_state_dict(model)
    assert treatment_of(model[0]) == "ow" and treatment_of(model[1]) == "ow"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------ end to end
class GCP(nn.Module):
    """A Pre-SVD conv (any shape) feeding a covariance and a raw eigh square root."""

    def __init__(self, mix: nn.Module | None = None, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.mix = mix if mix is not None else nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c * c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(cov_sqrt(self.mix(torch.relu(self.stem(x)))).flatten(1))


def test_transform_reads_the_soc_config_trains_and_strip_refuses():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    cfg = OrthoConfig.from_preset("ow", ow_method="soc", soc_terms=3, soc_eval_terms=7, ow_radius=0.5)
    model = GCP(nn.Conv2d(3, 4, 3, stride=2, padding=1))  # in ≠ out, stride 2: now supported
    gm, report = orthofx.transform(model, (x,), config=cfg)
    mix = gm.get_submodule("mix")
    p = mix.parametrizations.weight[0]
    assert isinstance(p, SOCOrthogonal) and (p.terms, p.eval_terms, p.radius) == (3, 7, 0.5)
    assert p.channels == 12  # max(3·2², 4)
    assert any("ow(soc) mix.weight" in str(a) for a in report.actions)
    gm(x).square().mean().backward()
    assert torch.isfinite(mix.parametrizations.weight.original.grad).all()
    with pytest.raises(TreatmentError, match="cannot be baked"):
        orthofx.strip(gm)
    assert isinstance(gm.get_submodule("mix").parametrizations.weight[0], SOCOrthogonal)  # untouched
    gm.eval()
    assert _grid_norm(mix.weight) == pytest.approx(0.5, rel=1e-4)
    buf = io.BytesIO()
    orthofx.save_checkpoint(gm, buf)
    buf.seek(0)
    again = orthofx.load_checkpoint(GCP(nn.Conv2d(3, 4, 3, stride=2, padding=1)), buf).eval()
    torch.testing.assert_close(again(x), gm(x))
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(ep.module()(x), gm(x))


def test_transform_with_soc_on_unsupported_producer_names_it():
    model = GCP(nn.Conv2d(3, 4, 3, padding=2, dilation=2))
    with pytest.raises(TreatmentError, match="mix.*dilation"):
        orthofx.transform(model, (torch.randn(2, 3, 6, 6),), config=OrthoConfig(weight="ow", ow_method="soc"))


def test_flat_orthogonal_rejects_soc_directly():
    with pytest.raises(ConfigError, match="SOCOrthogonal"):
        W.FlatOrthogonal((4, 4, 3, 3), "soc")


@pytest.mark.parametrize("k,s,want", [(1, 1, 1), (3, 1, 3), (5, 1, 5), (3, 2, 3), (5, 2, 3), (7, 2, 5), (9, 2, 5),
                                      (7, 3, 3), (11, 4, 3)])
def test_stride_kernel_covers_the_receptive_field(k: int, s: int, want: int) -> None:
    """On the s-downsampled grid SOC uses the smallest odd k_s ≥ ⌈k/s⌉: k_s·s ≥ k."""
    from orthofx.treatments.soc import soc_kernel

    assert soc_kernel(k, s) == want and want * s >= k and want % 2 == 1

