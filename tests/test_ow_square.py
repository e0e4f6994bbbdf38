"""Square weights use their OW generator in place: ``W = Y₀ f(B − Bᵀ)``
(orthofx.treatments.stiefel.square_map, FlatOrthogonal's square layout). Checked against float64
references, with gradcheck/gradgradcheck on both code paths, the host-read audit of the sync-free
path, the equivalence with the tall layout (values and SGD trajectories), and the conversion of
state saved before the layout (FlatOrthogonal version 1)."""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.linalg.skew_expm_apply import expm_skew_apply_host
from orthofx.syncs import cuda_policy, sync_audit
from orthofx.treatments import register_orthogonal
from orthofx.treatments.stiefel import square_map, stiefel_map

F64 = torch.float64
U32 = 2.0**-24  # float32 unit roundoff


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _f(S: torch.Tensor, method: str) -> torch.Tensor:
    if method == "expm":
        return torch.linalg.matrix_exp(S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    return torch.linalg.solve(eye - S / 2, eye + S / 2)


def _generator(n: int, scale: float, seed: int) -> torch.Tensor:
    """B with ‖B − Bᵀ‖₂ = scale."""
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return B * (scale / torch.linalg.matrix_norm(B - B.T, 2).clamp_min(1e-300))


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.05, 0.7, 5.0, 300.0])
def test_square_map_is_the_float64_function(method: str, scale: float) -> None:
    """``Y₀ f(B − Bᵀ)`` to 1e-13 (float64); float32 within 4·u·n·max(1, ‖S‖) relative and
    orthonormal to 4·u·n (degree 2 and 4, higher degrees, squarings + polish)."""
    n = 12
    Y0, B = _orthogonal(n, 1), _generator(n, scale, 2)
    ref = Y0 @ _f(B - B.T, method)
    torch.testing.assert_close(square_map(B, Y0, method), ref, atol=1e-13 * max(1.0, scale), rtol=0)
    w32 = square_map(B.float(), Y0.float(), method).double()
    assert (w32 - ref).norm() / ref.norm() < 4 * U32 * n * max(1.0, scale)
    assert (w32.T @ w32 - torch.eye(n, dtype=F64)).norm() < 4 * U32 * n
    with cuda_policy():  # the sync-free path computes the same function
        torch.testing.assert_close(square_map(B, Y0, method), ref, atol=1e-12 * max(1.0, scale), rtol=0)


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.7, 4.0])
def test_square_map_gradients_are_exact(method: str, scale: float) -> None:
    """gradcheck and gradgradcheck (float64) in B, and in Y₀ where no polish can run (a
    perturbation of Y₀ off the orthonormal matrices switches the checked polish on: the map
    is then polish∘f, continuous only along orthonormal Y₀), on the host path (fused
    degree-2/4 backward, autograd above) and the sync-free path (always polished)."""
    Y0 = _orthogonal(8, 3)
    B = _generator(8, scale, 4).requires_grad_()
    no_polish = method == "expm" and scale < 0.09 or method == "cayley" and torch.linalg.matrix_norm(B - B.T, 1) <= 2
    fn = lambda b, y: square_map(b, y, method)  # noqa: E731
    inputs = (B, Y0.requires_grad_()) if no_polish else (B, Y0)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    with cuda_policy():
        assert torch.autograd.gradcheck(fn, (B, Y0.detach()))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.7])
def test_right_application_is_the_transposed_left_one(scale: float) -> None:
    """``Y·exp(S) = (exp(−S)·Yᵀ)ᵀ`` for the fused right-hand form and its gradient."""
    Y = torch.randn(5, 9, dtype=F64, generator=torch.Generator().manual_seed(5))
    P = _generator(9, scale, 6).requires_grad_()
    right, _ = expm_skew_apply_host(P, Y, side="right")
    left, _ = expm_skew_apply_host(-P, Y.T.contiguous(), side="left")
    torch.testing.assert_close(right, left.T, atol=1e-14, rtol=0)
    torch.testing.assert_close(right, Y @ torch.linalg.matrix_exp(P - P.T), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="side"):
        expm_skew_apply_host(P, Y, side="middle")


@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_sync_free_square_map_reads_nothing_on_the_host(method: str) -> None:
    Y0 = _orthogonal(16, 7).float()
    B = _generator(16, 0.3, 8).float().requires_grad_()
    with cuda_policy(), sync_audit() as audit:
        square_map(B, Y0, method).sum().backward()
    assert audit.syncs == {}, audit.syncs


def _linear(n: int, method: str, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(n, n).double()
    register_orthogonal(m, method=method)
    return m


@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_square_layout_follows_the_tall_layouts_sgd_trajectory(method: str) -> None:
    """SGD with momentum and weight decay moves W identically in both coordinates (the change
    a = Y₀B is orthogonal): the square layout against an instance forced to the tall one."""
    new, old = _linear(10, method), _linear(10, method)
    old.parametrizations.weight[0].square_direct = False  # the tall layout (what version 1 did)
    x = torch.randn(64, 10, dtype=F64, generator=torch.Generator().manual_seed(9))
    y = torch.randn(64, 10, dtype=F64, generator=torch.Generator().manual_seed(10))
    opts = [torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2) for m in (new, old)]
    for _ in range(8):
        for m, opt in zip((new, old), opts):
            opt.zero_grad()
            (m(x) - y).square().mean().backward()
            opt.step()
    torch.testing.assert_close(new.weight, old.weight, atol=1e-12, rtol=0)
    assert (new.weight - new.parametrizations.weight[0].base).norm() > 0.1  # it moved


def _version1_state(m: nn.Linear, a: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The state dict of ``m`` as version 1 wrote it: ``original`` = the tall generator ``a``,
    and the W it meant, ``exp(aY₀ᵀ − Y₀aᵀ)Y₀``."""
    state = m.state_dict()
    state["parametrizations.weight.original"] = a.clone()
    state._metadata["parametrizations.weight"]["version"] = 1  # type: ignore[attr-defined]
    p = m.parametrizations.weight[0]
    return state, stiefel_map(a, p.base, p.method, False)


@pytest.mark.parametrize("method", ["expm", "cayley"])
def test_version1_state_is_converted_on_load(method: str) -> None:
    m = _linear(10, method, seed=1)
    a = 0.2 * torch.randn(10, 10, dtype=F64, generator=torch.Generator().manual_seed(11))
    state, W_old = _version1_state(m, a)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # the metadata survives a file
    fresh = _linear(10, method, seed=2)
    with pytest.warns(UserWarning, match="square layout.*not converted"):
        fresh.load_state_dict(loaded)
    torch.testing.assert_close(fresh.weight, W_old, atol=1e-12, rtol=0)
    # the current version loads as it is, silently
    again = _linear(10, method, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(again.weight, W_old, atol=1e-12, rtol=0)


def test_version1_normalised_generator_is_converted() -> None:
    torch.manual_seed(4)
    m = nn.Linear(9, 9).double()
    register_orthogonal(m, method="expm", generator="normalized")  # version 1 predates the Cayley default
    p = m.parametrizations.weight[0]
    m.eval()
    a = torch.randn(9, 9, dtype=F64, generator=torch.Generator().manual_seed(12))
    state = m.state_dict()
    state["parametrizations.weight.original"] = a
    state["parametrizations.weight.0._v"] = p.base @ p._v  # v in the ambient coordinates
    state._metadata["parametrizations.weight"]["version"] = 1  # type: ignore[attr-defined]
    S = a @ p.base.T - p.base @ a.T
    W_old = torch.linalg.matrix_exp(0.7 * S / torch.linalg.matrix_norm(S, 2)) @ p.base
    torch.manual_seed(5)
    fresh = nn.Linear(9, 9).double()
    register_orthogonal(fresh, method="expm", generator="normalized")
    fresh.eval()
    with pytest.warns(UserWarning, match="square layout"):
        fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weight, W_old, atol=1e-9, rtol=0)
    torch.testing.assert_close(fresh.parametrizations.weight[0]._v, p._v, atol=1e-12, rtol=0)


class _SquareHead(nn.Module):
    """A whitening head on a square Linear: fc (8→8), centring, covariance, eigh, ZCA."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = h - h.mean(0, keepdim=True)
        cov = h.T @ h / h.shape[0] + 1e-3 * torch.eye(8)
        e, v = torch.linalg.eigh(cov)
        return h @ (v * e.rsqrt()) @ v.T


def test_version1_checkpoint_loads_through_orthofx() -> None:
    """``orthofx.load_checkpoint`` of a checkpoint written before the layout (its state dict at
    version 1) gives the weights that checkpoint meant."""
    torch.manual_seed(6)
    cfg = orthofx.OrthoConfig.from_preset("ow", ow_method="expm")  # the map of checkpoints of that time
    gm, report = orthofx.transform(_SquareHead(), (torch.randn(32, 8),), config=cfg)
    ck = orthofx.export.checkpoint(gm)
    state = ck["state_dict"]
    key = "fc.parametrizations.weight.original"
    assert key in state, list(state)
    a = 0.1 * torch.randn(8, 8, generator=torch.Generator().manual_seed(13))
    state[key] = a
    state._metadata["fc.parametrizations.weight"]["version"] = 1
    Y0 = state["fc.parametrizations.weight.0.base"].double()
    W_old = (torch.linalg.matrix_exp(a.double() @ Y0.T - Y0 @ a.double().T) @ Y0).float()
    with pytest.warns(UserWarning, match="square layout"):
        back = orthofx.load_checkpoint(_SquareHead(), ck)
    torch.testing.assert_close(orthofx.pipeline.unwrap(back).fc.weight, W_old, atol=1e-6, rtol=0)


def test_instance_pickled_before_the_layout_keeps_its_map() -> None:
    """An instance without ``square_direct`` in its ``__dict__`` (pickled by version 1) keeps
    the tall layout for its stored ``a``."""
    m = _linear(6, "expm")
    p = m.parametrizations.weight[0]
    del p.__dict__["square_direct"]
    m2 = pickle.loads(pickle.dumps(m))
    p2 = m2.parametrizations.weight[0]
    assert not p2.square_direct
    a = 0.3 * torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(14))
    torch.testing.assert_close(p2(a), stiefel_map(a, p2.base, "expm", False), atol=1e-14, rtol=0)
