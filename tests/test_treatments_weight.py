"""OW / SN / OL / bake on the flattened (out, in·k·k) weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import (
    FlatOrthogonal,
    bake,
    bake_all,
    orthogonality_loss,
    plain_state_dict,
    register_orthogonal,
    register_spectral_norm,
    treatment_of,
)
from orthofx.treatments.weight import _stiefel_map


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _orth_err(w: torch.Tensor) -> float:
    """max |G − I| with G = W Wᵀ (wide/square) or Wᵀ W (tall), in float64."""
    W = _flat(w).double()
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max().item()


def _polar64(w: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(_flat(w).double(), full_matrices=False)
    return U @ Vh


# name -> (factory, input shape): tall 64×27 conv, wide 16×64 linear, wide 8×144 conv, square
LAYERS = {
    "conv_tall_64x27": (lambda: nn.Conv2d(3, 64, 3, padding=1, bias=False), (4, 3, 6, 6)),
    "linear_wide_16x64": (lambda: nn.Linear(64, 16), (8, 64)),
    "conv_wide_8x144": (lambda: nn.Conv2d(16, 8, 3, padding=1), (2, 16, 5, 5)),
    "linear_square_32": (lambda: nn.Linear(32, 32), (8, 32)),
}


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_ow_stays_orthogonal_under_sgd(layer: str, method: str, device: torch.device) -> None:
    torch.manual_seed(0)
    factory, in_shape = LAYERS[layer]
    m = factory().to(device)
    w_orig = m.weight.detach().clone()
    assert register_orthogonal(m, method=method)
    # right after registration: the nearest orthogonal matrix to the original weight
    torch.testing.assert_close(_flat(m.weight).double(), _polar64(w_orig), atol=2e-6, rtol=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(in_shape, device=device)
    target = torch.randn_like(m(x))
    w_start = m.weight.detach().clone()
    for _ in range(30):
        opt.zero_grad()
        loss = (m(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    assert (m.weight.detach() - w_start).abs().max() > 1e-3, "training did not move the weight"
    assert _orth_err(m.weight.detach()) < 5e-5
    assert m.weight.shape == w_orig.shape


def test_ow_documented_orientation() -> None:
    tall = FlatOrthogonal((64, 3, 3, 3))
    wide = FlatOrthogonal((16, 64))
    assert "columns" in tall.extra_repr() and "rows" in wide.extra_repr()


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("shape", [(40, 7), (9, 30), (12, 12)])
def test_ow_lowrank_route_equals_dense(method: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    n_big, k = max(shape), min(shape)
    U, _, Vh = torch.linalg.svd(torch.randn(n_big, k, dtype=torch.float64), full_matrices=False)
    Y0 = U @ Vh
    for scale in (0.0, 0.3, 3.0):
        a = (scale * torch.randn(n_big, k, dtype=torch.float64)).requires_grad_()
        dense = _stiefel_map(a, Y0, method, lowrank=False)
        (gd,) = torch.autograd.grad(dense.sin().sum(), a)
        low = _stiefel_map(a, Y0, method, lowrank=True)
        (gl,) = torch.autograd.grad(low.sin().sum(), a)
        torch.testing.assert_close(low, dense, atol=1e-10, rtol=0)
        torch.testing.assert_close(gl, gd, atol=1e-9, rtol=1e-9)
        eye = torch.eye(k, dtype=torch.float64)
        torch.testing.assert_close(low.T @ low, eye, atol=1e-11, rtol=0)


@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_ow_square_is_paper_exponential(method: str) -> None:
    """Square W: the generator is used in place, W = Y₀ f(A − Aᵀ) (the paper's exp(A − Aᵀ),
    rotated by the base), which is the tall layout's f(aY₀ᵀ − Y₀aᵀ)Y₀ at a = Y₀A."""
    torch.manual_seed(2)
    m = nn.Linear(10, 10).double()
    register_orthogonal(m, method=method)
    p = m.parametrizations.weight[0]
    Y0 = p.base
    assert p.square_direct and not p.lowrank
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(0.2 * torch.randn(10, 10, dtype=torch.float64))
    A = m.parametrizations.weight.original
    S = A - A.T
    eye = torch.eye(10, dtype=torch.float64)
    f = torch.linalg.matrix_exp(S) if method == "expm" else torch.linalg.solve(eye - S / 2, eye + S / 2)
    torch.testing.assert_close(m.weight, Y0 @ f, atol=1e-12, rtol=0)
    a = Y0 @ A
    Sa = a @ Y0.T - Y0 @ a.T
    fa = torch.linalg.matrix_exp(Sa) if method == "expm" else torch.linalg.solve(eye - Sa / 2, eye + Sa / 2)
    torch.testing.assert_close(m.weight, fa @ Y0, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.tall_generator(A.detach()), a.detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(p.generator_from_tall(a.detach()), A.detach(), atol=1e-14, rtol=0)


def test_ow_assignment_resets_to_nearest_orthogonal() -> None:
    torch.manual_seed(3)
    m = nn.Conv2d(4, 6, 3)
    register_orthogonal(m, method="cayley")
    target = torch.randn(6, 4, 3, 3)
    m.weight = target
    torch.testing.assert_close(_flat(m.weight).double(), _polar64(target), atol=2e-6, rtol=0)
    assert torch.count_nonzero(m.parametrizations.weight.original) == 0


def test_ow_zero_weight_still_orthonormal() -> None:
    m = nn.Linear(5, 3)
    with torch.no_grad():
        m.weight.zero_()
    register_orthogonal(m)
    assert _orth_err(m.weight.detach()) < 1e-6


def test_registration_is_idempotent_and_never_stacks() -> None:
    m = nn.Conv2d(3, 8, 3)
    param = m.weight
    assert register_orthogonal(m, method="expm") is True
    assert register_orthogonal(m, method="expm") is False
    assert len(m.parametrizations.weight) == 1
    assert m.parametrizations.weight.original is param  # the same Parameter object
    with pytest.raises(TreatmentError, match="method"):
        register_orthogonal(m, method="cayley")
    with pytest.raises(TreatmentError, match="never stacks"):
        register_spectral_norm(m)
    assert treatment_of(m) == "ow"

    s = nn.Linear(6, 4)
    assert register_spectral_norm(s) is True
    assert register_spectral_norm(s) is False
    assert len(s.parametrizations.weight) == 1
    with pytest.raises(TreatmentError, match="never stacks"):
        register_orthogonal(s)
    assert treatment_of(s) == "sn"

    t = nn.Linear(6, 4)
    torch.nn.utils.parametrizations.orthogonal(t)
    assert treatment_of(t) == "other"
    with pytest.raises(TreatmentError):
        register_orthogonal(t)


def test_non_float_weight_raises_naming_the_parameter() -> None:
    m = nn.Linear(4, 4)
    m.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TreatmentError, match=r"head\.fc\.weight"):
        register_orthogonal(m, qualname="head.fc")
    with pytest.raises(TreatmentError, match=r"Linear\.weight"):
        register_spectral_norm(m)
    with pytest.raises(TreatmentError, match="int64"):
        orthogonality_loss([m.weight])
    b = nn.BatchNorm1d(4)
    with pytest.raises(TreatmentError, match="2 dims"):
        register_orthogonal(b)
    with pytest.raises(ConfigError):
        register_orthogonal(nn.Linear(3, 3), method="svd")  # type: ignore[arg-type]


def test_sn_exact_sigma_is_one(device: torch.device) -> None:
    torch.manual_seed(4)
    m = nn.Conv2d(3, 64, 3, bias=False).to(device)
    register_spectral_norm(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(2, 3, 8, 8, device=device)
    for _ in range(5):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
        sigma = torch.linalg.svdvals(_flat(m.weight.detach()).double())[0].item()
        assert abs(sigma - 1.0) < 1e-5


def test_sn_power_uses_the_flattened_matrix() -> None:
    torch.manual_seed(5)
    m = nn.Conv2d(4, 8, 3)
    w = m.weight.detach().clone()
    register_spectral_norm(m, method="power", n_power_iterations=5)
    for _ in range(20):  # training-mode forwards run the power iteration
        _ = m.weight
    sigma_flat = torch.linalg.svdvals(_flat(w).double())[0]
    torch.testing.assert_close(_flat(m.weight.detach()).double(), _flat(w).double() / sigma_flat, atol=1e-4, rtol=0)


def _ol_reference(ws: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 hand formula: value Σ‖G − I‖_F and gradient 2(WWᵀ−I)W/‖·‖ (tall: 2W(WᵀW−I)/‖·‖)."""
    total = torch.zeros((), dtype=torch.float64)
    grads = []
    for w in ws:
        W = _flat(w).detach().double().cpu()
        if W.shape[0] <= W.shape[1]:
            E = W @ W.T - torch.eye(W.shape[0], dtype=torch.float64)
            nrm = torch.linalg.matrix_norm(E)
            g = 2 * E @ W / nrm
        else:
            E = W.T @ W - torch.eye(W.shape[1], dtype=torch.float64)
            nrm = torch.linalg.matrix_norm(E)
            g = 2 * W @ E / nrm
        total = total + nrm
        grads.append(g.reshape(w.shape))
    return total, grads


def test_ol_value_and_gradient_match_formula(device: torch.device) -> None:
    torch.manual_seed(6)
    ws = [
        (0.3 * torch.randn(16, 3, 3, 3, device=device)).requires_grad_(),  # wide 16×27
        (0.3 * torch.randn(64, 3, 3, 3, device=device)).requires_grad_(),  # tall 64×27
        (0.3 * torch.randn(12, 12, device=device)).requires_grad_(),
    ]
    loss = orthogonality_loss(ws, weight=0.5)
    loss.backward()
    ref, ref_grads = _ol_reference(ws)
    torch.testing.assert_close(loss.detach().cpu().double(), 0.5 * ref, rtol=1e-5, atol=0)
    for w, g in zip(ws, ref_grads):
        torch.testing.assert_close(w.grad.cpu().double(), 0.5 * g, rtol=1e-4, atol=1e-6)


def test_ol_accepts_modules_and_parametrized_weights() -> None:
    a, b = nn.Linear(8, 4), nn.Conv2d(2, 3, 3)
    register_orthogonal(b)
    loss = orthogonality_loss([a, b])
    ref, _ = _ol_reference([a.weight, b.weight])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert orthogonality_loss([]).item() == 0.0


def test_bake_keeps_value_identity_and_plain_keys() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    register_orthogonal(model[0])
    register_spectral_norm(model[2])
    with torch.no_grad():
        model[0].parametrizations.weight.original.normal_(0, 0.1)
    opt_param = model[0].parametrizations.weight.original
    expected = {k: v.clone() for k, v in plain_state_dict(model).items()}
    assert set(expected) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(1, 3, 8, 8)
    y = model(x)

    fresh = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    fresh.load_state_dict(expected)
    torch.testing.assert_close(fresh(x), y)

    assert bake(model[0]) and not bake(model[0])
    assert bake_all(model) == ["2.weight"]
    assert not parametrize.is_parametrized(model)
    assert model[0].weight is opt_param  # the optimizer's Parameter object survives
    assert set(model.state_dict()) == set(expected)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    torch.testing.assert_close(model(x), y)
    copy.deepcopy(model)  # a baked model is an ordinary module again


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_ow_module_exports_and_traces(method: str) -> None:
    """The OW map has no data-dependent host control flow under tracing (expm switches to its
    sync-free squaring loop), so an OW-parametrized module exports with torch.export and
    traces with torch.jit.trace, giving the eager result."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    register_orthogonal(m[0], "weight", method=method)
    with torch.no_grad():  # move away from A = 0 so that squarings are needed
        m[0].parametrizations.weight.original.add_(torch.randn(8, 1, 3, 3) * 3)
    x = torch.randn(2, 1, 8, 8)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-6)
    traced = torch.jit.trace(m, (x,), check_trace=False)
    x2 = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(traced(x2), m(x2), rtol=1e-5, atol=1e-6)


def test_messages_name_the_producer_parameter_once() -> None:
    """The rewrite passes the parameter's path ("0.weight"): errors name "0.weight", not
    "0.weight.weight"; a module path still gets the tensor's name appended."""
    import orthofx
    from orthofx.errors import TreatmentError
    from orthofx.treatments.weight import _label

    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False, dilation=2), orthofx.nn.DecorrelatedBatchNorm(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(TreatmentError, match=r"applied to 0\.weight: dilation") as e:
        orthofx.transform(model, (torch.randn(8, 3, 9, 9),), config=orthofx.OrthoConfig.from_preset("ow", ow_method="soc"))
    assert "weight.weight" not in str(e.value)
    conv = nn.Conv2d(2, 2, 1)
    assert _label(conv, "weight", "stem") == "stem.weight"
    assert _label(conv, "weight", "stem.weight") == "stem.weight"
    assert _label(conv, "weight", None) == "Conv2d.weight"
