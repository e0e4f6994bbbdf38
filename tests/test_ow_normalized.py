"""Flat OW (expm/cayley) with ``generator="normalized"``: W_tall = f(ρ S/σ̂) Y₀, S = a Y₀ᵀ − Y₀ aᵀ,
σ̂ ≈ ‖S‖₂ by a carried power iteration (orthofx/treatments/flat_ow.py).

References are float64: orthonormality ‖WWᵀ − I‖ (or ‖WᵀW − I‖ for a tall weight) ≤ 1e-12 in
float64 and ≤ 1e-5 in float32; scale invariance to 1e-12 (float64); the eval σ̂ against
``torch.linalg.svdvals(S)[0]`` to 1e-10 relative right after registration and 1e-8 after SGD steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import orthofx
from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import FlatOrthogonal, bake, register_orthogonal
from orthofx.treatments.stiefel import _stiefel_map

from ow_checks import assert_invariant_to_generator_scale

F64 = torch.float64


def _orth_err(w: torch.Tensor) -> float:
    W = w.reshape(w.shape[0], -1).double()
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return (G - torch.eye(G.shape[0], dtype=F64)).abs().max().item()


def _S(p: FlatOrthogonal, A: torch.Tensor) -> torch.Tensor:
    """The n'×n' skew argument ``aY₀ᵀ − Y₀aᵀ`` of the tall generator (``a = Y₀B`` for a square weight)."""
    a, Y0 = p.tall_generator(A.detach()).double(), p.base.double()
    return a @ Y0.T - Y0 @ a.T


def _normalized(shape, method="expm", lowrank=None, seed=0, dtype=F64, radius=0.7) -> nn.Module:
    torch.manual_seed(seed)
    m = (nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2])).to(dtype)
    assert register_orthogonal(m, method=method, lowrank=lowrank, generator="normalized", radius=radius)
    return m


SHAPES = [(32, 2, 3, 3), (8, 16, 3, 3), (20, 20), (64, 1, 5, 5)]  # tall, wide, square, the DBN stem


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_is_orthonormal_and_a_rotation_by_rho(shape, method, lowrank):
    m = _normalized(shape, method, lowrank)
    p = m.parametrizations.weight[0]
    A = m.parametrizations.weight.original
    assert p.generator == "normalized" and "generator='normalized', radius=0.7" in repr(p)
    # A starts random and nonzero, N(0, 1/n')
    assert A.abs().min() > 0
    m.eval()
    assert _orth_err(m.weight) <= 1e-12
    # the effective generator has ‖ρS/σ̂‖₂ = ρ: W is Y₀ turned by exactly ρ (largest angle)
    S = _S(p, A)
    sig = torch.linalg.svdvals(S)[0]
    Y0 = p.base.double()
    W_ref = torch.linalg.matrix_exp(0.7 * S / sig) @ Y0 if method == "expm" else None
    if W_ref is not None:
        Wt = p._to_tall(m.weight.detach())
        torch.testing.assert_close(Wt, W_ref, rtol=0, atol=1e-9)
    m.train()
    assert _orth_err(m.weight) <= 1e-12


def test_init_variance_is_one_over_n_prime():
    m = _normalized((64, 3, 5, 5))  # n' = max(64, 75) = 75, k = 64: 4800 entries
    A = m.parametrizations.weight.original
    assert A.var().item() == pytest.approx(1 / 75, rel=0.06)
    assert A.mean().abs().item() < 3 / 75**0.5 / 4800**0.5 * 1.5


@pytest.mark.parametrize("c", [10.0, 1e-3])
@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_output_is_invariant_to_the_generator_scale(method, c):
    m = _normalized((16, 3, 3, 3), method, seed=1)
    assert_invariant_to_generator_scale(m, torch.randn(2, 3, 6, 6, dtype=F64), c)


@pytest.mark.parametrize("shape", SHAPES + [pytest.param((512, 64), marks=pytest.mark.slow)])  # 512 × 64: ~8 s
def test_power_iteration_converges_to_the_largest_singular_value(shape):
    m = _normalized(shape)
    p = m.parametrizations.weight[0]
    A = m.parametrizations.weight.original
    Y0 = p.base.double()
    m.eval()
    a = p._to_tall(A.detach())
    sig_eval = p._sigma(a, Y0)
    assert sig_eval.item() == pytest.approx(torch.linalg.svdvals(_S(p, A))[0].item(), rel=1e-10)
    # SGD in training mode: one iteration per forward tracks σ(S)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, *((shape[1],) if len(shape) == 2 else (shape[1], 6, 6)), dtype=F64)
    for _ in range(5):
        opt.zero_grad()
        (m(x).square().mean() + m(x).flatten(1)[:, 0].sum()).backward()
        opt.step()
    exact = torch.linalg.svdvals(_S(p, A))[0].item()
    v = p._v.clone()
    with torch.no_grad():
        sig_train = p._sigma(p._to_tall(A.detach()), Y0).item()
    assert not torch.equal(p._v, v)  # the training forward updated the carried vector
    assert exact * (1 - 1e-3) <= sig_train <= exact * (1 + 1e-12)
    m.eval()
    v = p._v.clone()
    assert p._sigma(p._to_tall(A.detach()), Y0).item() == pytest.approx(exact, rel=1e-8)
    assert torch.equal(p._v, v)  # eval does not write the buffer back


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_free_generator_is_unchanged(method, lowrank):
    """``generator="free"`` (and the default) is bitwise the map of before: W = f(S) Y₀ from
    ``_stiefel_map`` on the tall generator, A = 0 at registration."""
    torch.manual_seed(3)
    shape = (16, 3, 3, 3)
    w = torch.randn(shape, dtype=F64)
    free = FlatOrthogonal(shape, method, lowrank, generator="free").double()
    default = FlatOrthogonal(shape, method, lowrank).double()
    assert torch.equal(free.right_inverse(w), torch.zeros_like(w))
    default.right_inverse(w)
    assert "_v" not in dict(free.named_buffers()) and "generator='free'" in free.extra_repr()
    A = 0.3 * torch.randn(shape, dtype=F64)
    before = free._from_tall(_stiefel_map(free._to_tall(A), free.base, method, lowrank))
    assert torch.equal(free(A), before)
    assert torch.equal(default(A), before)


def test_registration_options_are_validated_and_idempotent():
    for bad in ({"generator": "bounded"}, {"radius": 0.0}, {"radius": -1.0}, {"radius": 5.0},
                {"radius": float("inf")}, {"terms": 0}, {"eval_terms": 65}, {"radius": "0.7"}):
        m = nn.Linear(4, 4)
        with pytest.raises(ConfigError):
            register_orthogonal(m, **bad)
        assert not hasattr(m, "parametrizations")
    m = _normalized((4, 4))
    assert register_orthogonal(m, method="expm", generator="normalized") is False
    with pytest.raises(TreatmentError, match="other options"):
        register_orthogonal(m, method="expm", generator="free")
    with pytest.raises(TreatmentError, match="other options"):
        register_orthogonal(m, method="expm", generator="normalized", radius=0.5)
    with pytest.raises(TreatmentError, match="method='expm'"):
        register_orthogonal(m, generator="normalized")  # the default map (cayley) is another method
    f = nn.Linear(4, 4)
    register_orthogonal(f)
    assert register_orthogonal(f, generator="free", radius=0.3) is False  # radius unused by "free"


def test_state_dict_deepcopy_dtype_and_bake():
    m = _normalized((8, 16, 3, 3), seed=4)
    x = torch.randn(2, 16, 5, 5, dtype=F64)
    m(x).sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.3).step()
    m.eval()
    ref = m(x)
    sd = m.state_dict()
    assert "parametrizations.weight.0._v" in sd
    other = _normalized((8, 16, 3, 3), seed=5).eval()
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(m)(x), ref, rtol=0, atol=0)
    m32 = copy.deepcopy(m).float()
    assert _orth_err(m32.weight) <= 1e-5
    torch.testing.assert_close(m32(x.float()).double(), ref, rtol=0, atol=1e-5)
    W = m.weight.detach().clone()
    assert bake(m) and not hasattr(m, "parametrizations")
    torch.testing.assert_close(m.weight.detach(), W, rtol=0, atol=0)


class Net(nn.Module):
    """A conv stem and a linear head as real code writes them, with a train-only branch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.training:
            h = nn.functional.dropout(h, 0.1)
        return self.head(h.mean(dim=(2, 3)))


def test_sgd_keeps_weights_orthonormal_in_a_model():
    torch.manual_seed(0)
    net = Net()
    for mod in (net.body[0], net.body[2], net.head):
        register_orthogonal(mod, method="cayley", generator="normalized")
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    for mod in (net.body[0], net.body[2], net.head):
        assert _orth_err(mod.weight) <= 1e-5  # float32


@settings(max_examples=15)
@given(out=st.integers(1, 12), n=st.integers(1, 12), method=st.sampled_from(["expm", "cayley"]),
       lowrank=st.sampled_from([None, True, False]), c=st.sampled_from([1e-4, 0.1, 7.0, 1e4]))
def test_orthonormal_and_scale_invariant_over_shapes(out, n, method, lowrank, c):
    m = _normalized((out, n), method, lowrank).eval()
    assert _orth_err(m.weight) <= 1e-12
    W = m.weight.detach().clone()
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(c)
    torch.testing.assert_close(m.weight, W, rtol=0, atol=1e-12)


def test_transform_reads_the_generator_config():
    class GCP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.mix(x).flatten(2)
            f = f - f.mean(dim=-1, keepdim=True)
            cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(4)
            lam, u = torch.linalg.eigh(cov)
            return self.fc((u @ torch.diag_embed(lam.clamp_min(1e-12).sqrt()) @ u.transpose(1, 2)).flatten(1))

    x = torch.randn(4, 3, 5, 5)
    cfg = OrthoConfig.from_preset("ow", ow_generator="normalized", ow_radius=0.4)
    gm, report = orthofx.transform(GCP(), (x,), config=cfg)
    p = gm.get_submodule("mix").parametrizations.weight[0]
    assert p.generator == "normalized" and p.radius == 0.4
    assert any("ow(cayley, normalized) mix.weight" in str(a) for a in report.actions)
    gm(x).sum().backward()
