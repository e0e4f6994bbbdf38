"""ow_target: what NOG/OLR act on under OW — the generator A (default, as the authors' code) or
the weight W = Φ(A) (closed-form pull-back at A = 0, re-based after every step). float64 unless
stated; ε of the central finite differences: 1e-6."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ConfigError
from orthofx.syncs import cuda_policy, sync_audit
from orthofx.treatments import attach, named_chain, nog, olr_eta, register_orthogonal
from orthofx.treatments._common import polar
from orthofx.treatments.ow_target import (
    OWLinearization, WeightTargetState, jacobian_at_zero, ow_parametrization, pullback, rebase,
    tangent_from_generator_grad,
)

F64 = torch.float64
CASES = [  # (weight shape, method, lowrank)
    ((8, 8), "expm", False),
    ((6, 3, 3, 3), "expm", False),  # wide: rows orthonormal
    ((6, 3, 3, 3), "expm", True),
    ((6, 3, 3, 3), "cayley", None),
    ((16, 3, 2, 2), "expm", None),  # tall: columns orthonormal
    ((40, 4), "cayley", True),
]


def _ow(shape: tuple[int, ...], method: str, lowrank: bool | None, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(*shape, dtype=F64))
    register_orthogonal(m, "weight", method=method, lowrank=lowrank)
    po = ow_parametrization(m, "weight")
    assert po is not None
    return m, po


def _tangent(po: nn.Module, W: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """P_T(D) = D − Q sym(QᵀD) in tall form (Q = W_tall has orthonormal columns)."""
    Q, Dt = po._to_tall(W), po._to_tall(D)
    S = Q.mT @ Dt
    return po._from_tall(Dt - Q @ ((S + S.mT) / 2))


def _fd(po: nn.Module, A: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    with torch.no_grad():
        return (po(A + eps * x) - po(A - eps * x)) / (2 * eps)


def _generator(shape: tuple[int, ...], scale: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, dtype=F64, generator=g)
    return A * (scale / A.norm())


@pytest.mark.parametrize("shape,method,lowrank", CASES)
def test_J_is_the_derivative_of_the_map(shape, method, lowrank) -> None:
    _, po = _ow(shape, method, lowrank)
    A = _generator(shape, 1.0)
    lin = OWLinearization(po, A)
    x = torch.randn(*shape, dtype=F64)
    torch.testing.assert_close(lin.J(x), _fd(po, A, x), rtol=1e-7, atol=1e-8)
    # J* is J's adjoint: <J x, y> = <x, J* y>
    y = torch.randn(*shape, dtype=F64)
    torch.testing.assert_close((lin.J(x) * y).sum(), (x * lin.Jt(y)).sum(), rtol=1e-10, atol=1e-12)


def _rebased(shape, method, lowrank, scale: float):
    """An OW map whose generator was moved to ``scale`` and then re-based (A = 0, Y₀ = W)."""
    m, po = _ow(shape, method, lowrank)
    A = m.parametrizations.weight.original
    with torch.no_grad():
        A.copy_(_generator(shape, scale))
    W = m.weight.detach().clone()
    rebase(po, A)
    return m, po, A, W


@pytest.mark.parametrize("shape,method,lowrank", CASES)
@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0])
def test_rebase_keeps_W_and_makes_J_the_closed_form(shape, method, lowrank, scale) -> None:
    """After rebase A = 0, W is unchanged (1e-12), and autograd's J of the real map (dense or
    low-rank, polished) equals the closed form J X = X − Y₀XᵀY₀ (1e-10 relative)."""
    m, po, A, W = _rebased(shape, method, lowrank, scale)
    assert float(A.detach().abs().max()) == 0.0
    torch.testing.assert_close(m.weight.detach(), W, rtol=0, atol=1e-12)
    lin = OWLinearization(po, A)
    Y0 = po.base
    x = torch.randn(*shape, dtype=F64)
    want = po._from_tall(jacobian_at_zero(Y0, po.tall_generator(x)))  # A-direction -> W
    torch.testing.assert_close(lin.J(x), want, rtol=0, atol=1e-10 * want.norm().item())
    want_t = po.generator_from_tall(jacobian_at_zero(Y0, po._to_tall(x)))  # W-gradient -> A
    torch.testing.assert_close(lin.Jt(x), want_t, rtol=0, atol=1e-10 * want_t.norm().item())


@pytest.mark.parametrize("shape,method,lowrank", CASES)
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_pullback_moves_W_along_the_tangent_direction(shape, method, lowrank, scale) -> None:
    """The closed-form A-update Δ changes W to first order by exactly P_T(D) (finite
    differences through the real map), and it is the least-norm such Δ."""
    _, po, A, W = _rebased(shape, method, lowrank, scale)
    D = polar(torch.randn(shape[0], math.prod(shape[1:]), dtype=F64), "svd").reshape(shape)
    Y0 = po.base
    delta = po.generator_from_tall(pullback(Y0, po._to_tall(D)))
    want = _tangent(po, W, D)
    torch.testing.assert_close(_fd(po, A.detach(), delta), want, rtol=0, atol=1e-8 * want.norm().item())
    # the least-norm step: nothing along ker J = {Y₀Σ}, Σ symmetric
    P = Y0.mT @ po.tall_generator(delta)
    torch.testing.assert_close(P + P.mT, torch.zeros_like(P), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,method,lowrank", CASES)
def test_riemannian_gradient_recovered_from_the_generator_gradient(shape, method, lowrank) -> None:
    """G_A = J* G_W (what autograd gives A at A = 0) determines P_T(G_W) in closed form."""
    _, po, A, W = _rebased(shape, method, lowrank, 0.5)
    A = A.detach().requires_grad_(True)
    G_W = torch.randn(*shape, dtype=F64)
    (G_A,) = torch.autograd.grad((po(A) * G_W).sum(), A)
    G_T = po._from_tall(tangent_from_generator_grad(po.base, po.tall_generator(G_A)))
    torch.testing.assert_close(G_T, _tangent(po, W, G_W), rtol=0, atol=1e-10 * G_W.norm().item())


def test_gradcheck_of_the_ow_map_used_for_J() -> None:
    """J and J* come from autograd through the map; the map's own derivative is checked here."""
    _, po = _ow((3, 2, 1, 2), "expm", False)
    A = _generator((3, 2, 1, 2), 0.7).requires_grad_(True)
    assert torch.autograd.gradcheck(po, (A,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(po, (A,), eps=1e-6, atol=1e-5)


class _Net(nn.Module):
    def __init__(self, method: str = "expm") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.head = nn.Linear(6, 4)
        register_orthogonal(self.conv, method=method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _data(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 3, 6, 6, generator=g).to(device, dtype), torch.randint(0, 4, (16,), generator=g).to(device)


def test_sgd_step_moves_W_along_nog_of_the_weight_gradient() -> None:
    """One plain SGD step with NOG on the weight: (W_new − W)/(−lr) = P_T(U Vᵀ of ∂L/∂W) up to
    O(lr) (lr = 1e-5, float64)."""
    torch.manual_seed(0)
    m = _Net().double()
    with torch.no_grad():  # a generator away from 0, so that J is not the trivial one
        m.conv.parametrizations.weight.original.copy_(_generator((6, 3, 3, 3), 0.8))
    po = ow_parametrization(m.conv, "weight")
    x, y = _data(torch.device("cpu"), F64)
    lr = 1e-5
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    W_before = m.conv.weight.detach().clone()
    h = attach(opt, [(m.conv, "weight")], nog=True, nog_method="svd", ow_target="weight")
    assert h.ow_target == "weight" and h.options["ow_target"] == "weight"
    W = m.conv.weight.detach().clone()  # the re-base keeps W (it only polishes the float32-built base)
    torch.testing.assert_close(W, W_before, rtol=0, atol=1e-6)
    Wv = W.clone().requires_grad_(True)
    loss = F.cross_entropy(m.head(F.relu(F.conv2d(x, Wv)).mean((2, 3))), y)
    (G_W,) = torch.autograd.grad(loss, Wv)
    want = _tangent(po, W, polar(G_W.reshape(6, -1), "svd").reshape(G_W.shape))
    F.cross_entropy(m(x), y).backward()
    opt.step()
    step = (m.conv.weight.detach() - W) / (-lr)
    torch.testing.assert_close(step, want, rtol=0, atol=1e-4 * want.norm().item())
    assert h.stats()["ow_residual"][h.names[0]] < 1e-6


def test_olr_sees_the_orthogonal_weight() -> None:
    """OLR's w is W (orthogonal), l is NOG's direction: η* = olr_eta(W, D) (Proposition 1's setting)."""
    torch.manual_seed(0)
    m = _Net().double()
    x, y = _data(torch.device("cpu"), F64)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    h = attach(opt, [(m.conv, "weight")], nog=True, olr=True, nog_method="svd", ow_target="weight")
    W = m.conv.weight.detach().clone()  # after attach: its re-base polished the float32-built base
    Wv = W.clone().requires_grad_(True)
    (G_W,) = torch.autograd.grad(F.cross_entropy(m.head(F.relu(F.conv2d(x, Wv)).mean((2, 3))), y), Wv)
    po = ow_parametrization(m.conv, "weight")
    D = polar(G_W.reshape(6, -1), "svd")
    F.cross_entropy(m(x), y).backward()
    opt.step()
    eta = h.state["olr"].eta
    torch.testing.assert_close(eta, olr_eta(W.reshape(1, -1), D.reshape(1, -1)).to(eta.dtype), rtol=1e-9, atol=0)
    # both orthogonal (rows): η* inside Proposition 1's bounds [1/(N²+2), N²/(N²+2)], N = 6
    N = 6
    assert 1 / (N * N + 2) <= float(eta[0]) <= N * N / (N * N + 2)


def test_without_capture_the_chain_sees_the_riemannian_gradient() -> None:
    """weight_target alone (no ctx["weight_grads"]): the chain gets P_T(∂L/∂W); NOG's direction
    is then orthogonal to W (tr(Ω·sym) = 0), so OLR's lᵀw = 0."""
    from orthofx.treatments import GradientTransformation
    from orthofx.treatments.ow_target import weight_target

    torch.manual_seed(0)
    m = _Net().double()
    po = ow_parametrization(m.conv, "weight")
    A = m.conv.parametrizations.weight.original
    rebase(po, A)  # what attach does first: Y₀ = Φ(A) orthonormal in float64 (it was built in float32)
    x, y = _data(torch.device("cpu"), F64)
    F.cross_entropy(m(x), y).backward()
    seen = {}

    def spy_update(updates, state, params, ctx):
        seen["g"], seen["w"] = updates.grads[0], params[0]
        return updates, state

    t = weight_target(GradientTransformation(lambda p: None, spy_update), [po])
    t.update([A.grad], t.init([A]), [A], {})
    W = m.conv.weight.detach()
    torch.testing.assert_close(seen["w"], W)
    torch.testing.assert_close(_tangent(po, W, seen["g"]), seen["g"], rtol=0, atol=1e-12)
    D = polar(seen["g"].reshape(6, -1), "svd")
    assert abs(float((D * W.reshape(6, -1)).sum())) < 1e-12


def test_capture_sums_micro_batches_and_restarts_after_zero_grad() -> None:
    torch.manual_seed(0)
    m = _Net().double()
    x, y = _data(torch.device("cpu"), F64)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = attach(opt, [(m.conv, "weight")], nog=True, ow_target="weight")
    cap = h._capture
    Wv = m.conv.weight.detach().clone().requires_grad_(True)
    (G1,) = torch.autograd.grad(F.cross_entropy(m.head(F.relu(F.conv2d(x[:8], Wv)).mean((2, 3))), y[:8]), Wv)
    (G2,) = torch.autograd.grad(F.cross_entropy(m.head(F.relu(F.conv2d(x[8:], Wv)).mean((2, 3))), y[8:]), Wv)
    F.cross_entropy(m(x[:8]), y[:8]).backward()
    F.cross_entropy(m(x[8:]), y[8:]).backward()
    torch.testing.assert_close(cap.grads[0], G1 + G2)
    opt.zero_grad()
    F.cross_entropy(m(x[:8]), y[:8]).backward()
    torch.testing.assert_close(cap.grads[0], G1)
    with torch.no_grad():
        m(x)  # no grad: nothing captured
    opt.step()
    assert cap.grads[0] is None  # handed over at the step
    h.remove()
    F.cross_entropy(m(x[:8]), y[:8]).backward()
    assert cap.grads[0] is None  # hooks gone


@pytest.mark.parametrize("target", ["weight", "generator"])
@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_both_targets_train(device: torch.device, target: str, method: str) -> None:
    torch.manual_seed(0)
    m = _Net(method).to(device)
    x, y = _data(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    h = attach(opt, [(m.conv, "weight")], nog=True, olr=True, ow_target=target)
    assert isinstance(h.state, WeightTargetState) == (target == "weight")
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    W = m.conv.weight.detach().reshape(6, -1).double()
    torch.testing.assert_close(W @ W.T, torch.eye(6, dtype=F64, device=device), atol=1e-5, rtol=0)
    assert h.stats()["nonfinite_grads"] == 0


def test_targets_differ_and_generator_is_the_earlier_behaviour() -> None:
    """"generator" is NOG on A's gradient (what attach did before); "weight" is another step."""
    x, y = _data(torch.device("cpu"), F64)
    out = {}
    for target in ("weight", "generator", None):
        torch.manual_seed(0)
        m = _Net().double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        h = attach(opt, [(m.conv, "weight")] if target else [m.conv.parametrizations.weight.original],
                   nog=True, nog_method="svd", ow_target=target)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        out[target] = m.conv.parametrizations.weight.original.detach().clone()
        h.remove()
    torch.testing.assert_close(out["generator"], out[None], rtol=0, atol=0)  # a bare tensor: the generator
    assert (out["weight"] - out["generator"]).norm() > 1e-3 * out["generator"].norm()


def test_nonfinite_gradient_is_counted_and_skipped() -> None:
    m = _Net().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = attach(opt, [(m.conv, "weight")], nog=True, olr=True, ow_target="weight")
    A = m.conv.parametrizations.weight.original
    before = A.detach().clone()
    A.grad = torch.full_like(A, math.nan)
    opt.step()
    assert h.stats()["nonfinite_grads"] == 1
    torch.testing.assert_close(A.detach(), before, rtol=0, atol=0)


def test_defaults_validation_and_soc() -> None:
    m = _Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="ow_target"):
        attach(opt, [(m.conv, "weight")], nog=True, ow_target="both")
    # a custom chain keeps the gradient the optimizer holds unless asked
    h = attach(opt, [(m.conv, "weight")], chain=named_chain(("nog", nog())))
    assert h.ow_target == "generator" and not isinstance(h.state, WeightTargetState)
    h.remove()
    h = attach(opt, [(m.conv, "weight")], chain=named_chain(("nog", nog())), ow_target="weight")
    assert isinstance(h.state, WeightTargetState) and h.chain_names == ("nog",)
    h.remove()
    # no OW: nothing to choose
    plain = nn.Conv2d(3, 6, 3)
    h = attach(torch.optim.SGD(plain.parameters(), lr=0.1), [(plain, "weight")], nog=True, ow_target="weight")
    assert h.ow_target is None
    # SOC has no weight matrix
    soc = nn.Conv2d(4, 4, 3, padding=1)
    register_orthogonal(soc, method="soc")
    sopt = torch.optim.SGD(soc.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="soc"):
        attach(sopt, [(soc, "weight")], nog=True, ow_target="weight")
    h = attach(sopt, [(soc, "weight")], nog=True)
    assert h.ow_target == "generator" and not isinstance(h.state, WeightTargetState)


def test_default_target_is_the_generator_as_in_the_authors_code() -> None:
    """With nothing chosen, NOG acts on the generator's gradient (bitwise what a bare generator
    tensor gets) and no weight-gradient capture or re-base is installed."""
    x, y = _data(torch.device("cpu"), F64)
    out = []
    for spec in ("pair", "tensor"):
        torch.manual_seed(0)
        m = _Net().double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        A = m.conv.parametrizations.weight.original
        h = attach(opt, [(m.conv, "weight")] if spec == "pair" else [A], nog=True, olr=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        out.append(A.detach().clone())
        if spec == "pair":
            assert h.ow_target == "generator" and h._capture is None and not isinstance(h.state, WeightTargetState)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    assert float(out[0].abs().max()) > 0  # the generator moved (no re-base)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape,method,lowrank", CASES)
def test_weight_target_residual_and_rebase_over_steps(dtype, tol, shape, method, lowrank) -> None:
    """Over 5 NOG+OLR steps with momentum the pull-back residual stays ≤ 1e-6 (float64) / 1e-4
    (float32), A is 0 after every step, W stays orthonormal and moves."""
    torch.manual_seed(0)
    lin = nn.Linear(math.prod(shape[1:]), shape[0], bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape[0], math.prod(shape[1:])))
    register_orthogonal(lin, method=method, lowrank=lowrank)
    head = nn.Linear(shape[0], 3).to(dtype)
    opt = torch.optim.SGD([*lin.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    h = attach(opt, [(lin, "weight")], nog=True, olr=True, nog_method="svd", ow_target="weight")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, lin.in_features, generator=g).to(dtype), torch.randint(0, 3, (32,), generator=g)
    W0 = lin.weight.detach().clone()
    A = lin.parametrizations.weight.original
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(head(torch.tanh(lin(x))), y).backward()
        opt.step()
        assert float(A.detach().abs().max()) == 0.0
        assert h.stats()["ow_residual"][h.names[0]] <= tol
    Wt = ow_parametrization(lin, "weight")._to_tall(lin.weight.detach()).double()
    torch.testing.assert_close(Wt.mT @ Wt, torch.eye(Wt.shape[1], dtype=F64), rtol=0, atol=10 * tol)
    assert (lin.weight.detach() - W0).norm() > 1e-3


def test_weight_target_refuses_a_normalised_generator() -> None:
    m = _Net()
    ow_parametrization(m.conv, "weight").generator = "normalized"  # as ow_generator="normalized" builds it
    with pytest.raises(ConfigError, match="normalised"):
        attach(torch.optim.SGD(m.parameters(), lr=0.1), [(m.conv, "weight")], nog=True, ow_target="weight")


def test_config_mapping_carries_ow_target() -> None:
    m = _Net()
    h = attach(torch.optim.SGD(m.parameters(), lr=0.1), [(m.conv, "weight")], {"nog": True, "ow_target": "generator"})
    assert h.ow_target == "generator"


def test_weight_target_step_is_sync_free_on_the_cuda_path() -> None:
    """Under cuda_policy (the CUDA choices on the CPU) the treated step dispatches no
    synchronising op: the solves run a fixed number of iterations, decided on the device."""
    torch.manual_seed(0)
    m = _Net()
    x, y = _data(torch.device("cpu"))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with cuda_policy():
        attach(opt, [(m.conv, "weight")], nog=True, olr=True, ow_target="weight")
        F.cross_entropy(m(x), y).backward()
        opt.step()  # the first step (and its re-base) out of the audit window: warm caches
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        with sync_audit() as audit:
            opt.step()
    assert audit.syncs == {}


def test_unscaled_generator_gradient_rescales_the_capture() -> None:
    """GradScaler-style: backward of 1024·loss, then A.grad /= 1024 (unscale_) — the captured
    ∂L/∂W is 1024× too large and is rescaled by c = ⟨G_A, J*G_cap⟩/‖J*G_cap‖²: the step equals
    the unscaled one (float64, to 1e-10 relative)."""
    x, y = _data(torch.device("cpu"), F64)
    out = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        m = _Net().double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        attach(opt, [(m.conv, "weight")], nog=True, olr=True, nog_method="svd", ow_target="weight")
        for _ in range(2):
            opt.zero_grad()
            (scale * F.cross_entropy(m(x), y)).backward()
            for p in m.parameters():
                p.grad.div_(scale)
            opt.step()
        out.append(m.conv.weight.detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


def test_copies_of_an_attached_model_do_not_feed_the_capture() -> None:
    """deepcopy (e.g. an EMA model) of the model after attach: the copy's backward does not
    reach the original's capture. (Parametrized modules cannot be pickled whole: torch.)"""
    import copy

    m = _Net().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = attach(opt, [(m.conv, "weight")], nog=True, ow_target="weight")
    ema = copy.deepcopy(m)
    x, y = _data(torch.device("cpu"), F64)
    F.cross_entropy(ema(x), y).backward()
    assert h._capture.grads[0] is None
    F.cross_entropy(m(x), y).backward()
    assert h._capture.grads[0] is not None
