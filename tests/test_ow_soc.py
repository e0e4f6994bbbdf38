"""OW method "soc": skew-orthogonal convolution (issue 13).

The layer's linear map J = Σ_{j≤T} M^j/j! with M = x ↦ conv(x, M_kernel) exactly skew-symmetric
(zero and circular 'same' padding alike) and ‖M‖₂ ≤ ρ; the tolerance on JᵀJ − I is
soc_truncation_bound(T, ρ) = 2ε + ε², ε = ρ^{T+1}/(T+1)!.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import orthofx
from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import weight as W
from orthofx.treatments.weight import (
    OW_METHODS,
    SOC_RADIUS,
    SOC_TERMS,
    SOCOrthogonal,
    bake,
    bake_all,
    plain_state_dict,
    register_orthogonal,
    soc_truncation_bound,
    treatment_of,
)

C, HW = 2, 6


def _soc_conv(padding_mode: str = "zeros", scale: float = 1.0, seed: int = 0, c: int = C, k: int = 3) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, c, k, padding=k // 2, padding_mode=padding_mode).double()
    with torch.no_grad():
        conv.weight.mul_(scale)
    assert register_orthogonal(conv, method="soc") is True
    return conv


def _jacobian(fn, c: int = C, hw: int = HW) -> torch.Tensor:
    x = torch.zeros(c * hw * hw, dtype=torch.float64)
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(1, c, hw, hw)).reshape(-1), x)


def _layer_jacobians(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(J of the layer's linear part, J_M of one convolution with the kernel M)."""
    with torch.no_grad():
        M = conv.weight
    bias = conv.bias.detach()[:, None, None]
    J = _jacobian(lambda x: conv(x) - bias)
    JM = _jacobian(lambda x: conv._conv_forward(x, M, None))
    return J, JM


# ------------------------------------------------------------------ config
def test_config_accepts_soc_and_matches_the_registry():
    cfg = OrthoConfig.from_preset("ow", ow_method="soc")
    assert cfg.weight == "ow" and cfg.ow_method == "soc"
    assert OrthoConfig.from_dict(cfg.to_dict()).ow_method == "soc"
    from orthofx.vocab import OW_METHOD_NAMES as config_methods

    assert tuple(config_methods) == tuple(OW_METHODS) == ("expm", "cayley", "soc")
    with pytest.raises(ConfigError):
        OrthoConfig.from_preset("ow", ow_method="socc")


# ------------------------------------------------------------------ orthogonality
def test_truncation_bound_formula():
    eps = SOC_RADIUS ** (SOC_TERMS + 1) / math.factorial(SOC_TERMS + 1)
    assert soc_truncation_bound() == pytest.approx(2 * eps + eps**2)
    assert soc_truncation_bound() < 6e-8  # T = 10, ρ = 1
    assert soc_truncation_bound(3, 1.0) == pytest.approx(2 / 24 + 1 / 24**2)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("scale", [10.0, 0.02])  # saturated (M scaled to the bound) / inside the ball
def test_soc_layer_is_orthogonal(padding_mode, scale):
    conv = _soc_conv(padding_mode, scale)
    p = conv.parametrizations.weight[0]
    assert isinstance(p, SOCOrthogonal) and treatment_of(conv) == "ow"
    J, JM = _layer_jacobians(conv)
    eye = torch.eye(J.shape[0], dtype=torch.float64)
    # M is an exactly skew-symmetric operator with both paddings, and ‖M‖₂ ≤ ρ (guaranteed bound)
    assert (JM + JM.T).abs().max() <= 1e-15
    rho = torch.linalg.matrix_norm(JM, ord=2).item()
    assert rho <= SOC_RADIUS * (1 + 1e-12)
    if scale == 0.02:  # inside the ball: not scaled, M = L − L*
        L = conv.parametrizations.weight.original.detach()
        torch.testing.assert_close(conv.weight, L - L.transpose(0, 1).flip(-2, -1), rtol=0, atol=1e-15)
    # a priori tolerance from T and ρ, and the exact value from M's spectrum iλ: |p_T(iλ)|² − 1
    err = torch.linalg.matrix_norm(J.T @ J - eye, ord=2).item()
    assert err <= soc_truncation_bound(p.terms, p.radius) + 1e-12
    lam = torch.linalg.eigvals(JM)
    pT = sum(lam**j / math.factorial(j) for j in range(p.terms + 1))
    predicted = (pT.abs() ** 2 - 1).abs().max().item()
    assert err == pytest.approx(predicted, abs=1e-12)
    # fewer terms: the error grows as predicted and stays within the bound
    p.terms = 3
    J3, _ = _layer_jacobians(conv)
    err3 = torch.linalg.matrix_norm(J3.T @ J3 - eye, ord=2).item()
    pT3 = sum(lam**j / math.factorial(j) for j in range(4))
    assert err3 == pytest.approx((pT3.abs() ** 2 - 1).abs().max().item(), abs=1e-12)
    assert err3 <= soc_truncation_bound(3, p.radius) + 1e-12


def test_soc_preserves_norms_in_float32_and_unbatched_input():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding="same", bias=False)
    register_orthogonal(conv, method="soc")
    x = torch.randn(4, 8, 10, 10)
    y = conv(x)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(conv(x[0]), y[0])  # (C, H, W) input


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("scale", [10.0, 0.02])
def test_soc_gradcheck(scale):
    conv = _soc_conv("zeros", scale, c=2)
    conv.parametrizations.weight[0].terms = 4
    L0 = conv.parametrizations.weight.original.detach().clone().requires_grad_(True)
    b0 = conv.bias.detach().clone().requires_grad_(True)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, L, b):
        return functional_call(conv, {"parametrizations.weight.original": L, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, L0, b0))
    # and through the module's own parameter
    conv(x).square().sum().backward()
    g = conv.parametrizations.weight.original.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------ unsupported producers
@pytest.mark.parametrize(
    "module, why",
    [
        (nn.Linear(4, 4), "Linear"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), "stride"),
        (nn.Conv2d(4, 6, 3, padding=1), "in_channels=4 != out_channels=6"),
        (nn.Conv2d(4, 4, 2, padding="same"), "odd"),
        (nn.Conv2d(4, 4, (3, 1), padding=(1, 0)), "square"),
        (nn.Conv2d(4, 4, 3, padding=1, groups=2), "groups"),
        (nn.Conv2d(4, 4, 3, padding=0), "padding"),
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), "dilation"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv1d(4, 4, 3, padding=1), "Conv1d"),
    ],
)
def test_soc_refuses_unsupported_producers(module, why):
    with pytest.raises(TreatmentError, match="OW\\(soc\\) cannot be applied to body.layer.weight") as info:
        register_orthogonal(module, method="soc", qualname="body.layer")
    assert why in str(info.value)
    assert treatment_of(module) is None  # nothing registered


def test_soc_refuses_conv_subclass_with_own_forward_and_lowrank():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TreatmentError, match="overrides forward"):
        register_orthogonal(MyConv(4, 4, 3, padding=1), method="soc")
    with pytest.raises(ConfigError, match="lowrank"):
        register_orthogonal(nn.Conv2d(4, 4, 3, padding=1), method="soc", lowrank=True)


def test_soc_registration_is_idempotent_and_never_stacks():
    conv = _soc_conv()
    assert register_orthogonal(conv, method="soc") is False
    with pytest.raises(TreatmentError, match="already registered with method='soc'"):
        register_orthogonal(conv, method="expm")
    other = nn.Conv2d(2, 2, 3, padding=1)
    register_orthogonal(other, method="expm")
    with pytest.raises(TreatmentError, match="already registered with method='expm'"):
        register_orthogonal(other, method="soc")
    assert type(other).forward is nn.Conv2d.forward  # expm keeps the conv's own forward


# ------------------------------------------------------------------ baking / strip
def test_soc_cannot_be_baked():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1))
    register_orthogonal(model[0], method="soc")
    register_orthogonal(model[1], method="expm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TreatmentError, match="cannot be baked into a plain Conv2d"):
        bake(model[0])
    with pytest.raises(TreatmentError, match="0.weight carries OW method 'soc'"):
        bake_all(model)
    with pytest.raises(TreatmentError, match="soc"):
        plain_state_dict(model)
    # nothing was baked, not even the bakeable expm layer
    assert treatment_of(model[0]) == "ow" and treatment_of(model[1]) == "ow"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------ end to end
class SquareGCP(nn.Module):
    """A square 3×3 conv (the Pre-SVD layer) feeding a covariance and a raw eigh square root."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.mix = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.relu(self.stem(x)))
        n, c, h, w = x.shape
        f = x.reshape(n, c, h * w)
        f = f - f.mean(dim=-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / (h * w) + 1e-3 * torch.eye(c)
        lam, u = torch.linalg.eigh(cov)
        root = u @ torch.diag_embed(lam.clamp_min(1e-12).sqrt()) @ u.transpose(1, 2)
        return self.fc(root.flatten(1))


def test_transform_with_soc_trains_and_strip_refuses():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    cfg = OrthoConfig.from_preset("ow", ow_method="soc")
    gm, report = orthofx.transform(SquareGCP(), (x,), config=cfg)
    mix = gm.get_submodule("mix")
    assert isinstance(mix.parametrizations.weight[0], SOCOrthogonal)
    assert any("ow(soc)" in str(a) for a in report.actions)
    out = gm(x)
    out.square().mean().backward()
    assert torch.isfinite(mix.parametrizations.weight.original.grad).all()
    with pytest.raises(TreatmentError, match="cannot be baked"):
        orthofx.strip(gm)
    assert isinstance(gm.get_submodule("mix").parametrizations.weight[0], SOCOrthogonal)  # untouched
    # what strip's error recommends: checkpoints replay SOC, and the transformed model exports
    with torch.no_grad():
        mix.parametrizations.weight.original.mul_(3)
    gm.eval()
    buf = io.BytesIO()
    orthofx.save_checkpoint(gm, buf)
    buf.seek(0)
    again = orthofx.load_checkpoint(SquareGCP(), buf).eval()
    torch.testing.assert_close(again(x), gm(x))
    ep = torch.export.export(gm, (x,))
    torch.testing.assert_close(ep.module()(x), gm(x))


def test_transform_with_soc_on_unsupported_producer_names_it():
    class Rect(SquareGCP):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    with pytest.raises(TreatmentError, match="mix.*stride"):
        orthofx.transform(Rect(), (torch.randn(2, 3, 6, 6),), config=OrthoConfig(weight="ow", ow_method="soc"))


def test_flat_orthogonal_rejects_soc_directly():
    with pytest.raises(ConfigError, match="SOCOrthogonal"):
        W.FlatOrthogonal((4, 4, 3, 3), "soc")
