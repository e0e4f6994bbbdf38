"""strip() and replay() of a fused ExactSpectral (a user's eigh + U f(Λ) Uᵀ, f = √· or 1/√·).

* ``orthofx.strip`` replaces the fused module by plain torch ops with the same forward
  (:func:`orthofx.fuse.emit_plain`): the stripped model holds nothing of orthofx, gives the
  transformed model's outputs and exports with ``torch.export``.
* ``orthofx.load_checkpoint`` / ``replay`` fuse the recorded reconstruction node again
  (:func:`orthofx.fuse.fuse_at`), so the resumed model is the trained one (module types,
  outputs, gradients); plans written before ``SwapRecord.output`` existed still load.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import orthofx
from orthofx.errors import ConfigError
from orthofx.fuse import ExactSpectral, emit_plain, fuse_at
from orthofx.nn.stable import StableDecomposition
from orthofx.pipeline import plan_of, replay
from orthofx.plan import ActionKind, Plan, SwapRecord

F32_EPS = torch.finfo(torch.float32).eps

#: the reconstruction's eigenvalue function as users write it
_ROOTS = {
    "sqrt": lambda lam: lam.sqrt(),
    "rsqrt": lambda lam: lam.rsqrt(),
    "pow": lambda lam: lam.pow(-0.5),
}
_USAGE = {"sqrt": "sqrtm", "rsqrt": "invsqrtm", "pow": "invsqrtm"}


class CovRoot(nn.Module):
    """Conv → C = X Xᵀ/N + εI (ε = 1e-3) → ``lam, U = eigh(C)`` → ``U diag(f(lam)) Uᵀ`` → Linear."""

    def __init__(self, root: str = "sqrt", channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.fc = nn.Linear(channels * channels, 4)
        self.root = root

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).flatten(2)
        n = f.shape[-1]
        cov = f @ f.transpose(-1, -2) / n + 1e-3 * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        lam, u = torch.linalg.eigh(cov)
        y = u @ torch.diag_embed(_ROOTS[self.root](lam)) @ u.transpose(-1, -2)
        return self.fc(y.flatten(1))


def _model(root: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CovRoot:
    torch.manual_seed(seed)
    return CovRoot(root).to(device=device, dtype=dtype)


def _input(dtype: torch.dtype, device: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 5, 5, generator=g, dtype=dtype).to(device)


def _fused(gm: nn.Module) -> dict[str, ExactSpectral]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, ExactSpectral)}


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------ strip
@pytest.mark.parametrize("root", sorted(_ROOTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_strip_turns_the_fused_meta_layer_into_plain_torch(device: torch.device, root: str,
                                                           dtype: torch.dtype) -> None:
    x = _input(dtype, device)
    gm, report = orthofx.transform(_model(root, dtype, device), x, config="nog")
    assert [type(m).__name__ for m in _fused(gm).values()] == ["ExactSpectral"], report.notes
    assert next(iter(_fused(gm).values())).usage == _USAGE[root]

    plain = orthofx.strip(gm)
    assert not any(type(m).__module__.startswith("orthofx") for m in plain.modules())
    assert "orthofx" not in plain.code
    assert all(n.op != "call_module" or not str(n.target).startswith("orthofx") for n in plain.graph.nodes)
    assert list(plain.state_dict()) == list(gm.state_dict()) == list(CovRoot(root).state_dict())
    assert _fused(gm)  # gm itself is untouched

    # same forward: float64 to 1e-10 relative, float32 to its rounding (ε32 = 2^-23)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=4 * F32_EPS, atol=4 * F32_EPS)
    for training in (True, False):
        gm.train(training), plain.train(training)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), gm(x), **tol)
    # distinct eigenvalues: autograd through eigh and the Daleckii–Krein backward agree
    if dtype == torch.float64:
        want, got = _grads(gm, x), _grads(plain, x)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-10)


def test_stripped_model_exports_and_unpickles_without_orthofx(tmp_path: Path) -> None:
    dtype, device = torch.float64, torch.device("cpu")
    x = _input(dtype, device)
    gm, _ = orthofx.transform(_model("rsqrt", dtype, device), x, config="nog+ow")
    plain = orthofx.strip(gm).eval()
    with torch.no_grad():
        ref = gm.eval()(x)
    ep = torch.export.export(plain, (x,))
    assert "orthofx" not in ep.graph_module.code
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-10, atol=1e-12)

    path = tmp_path / "plain.pt"
    torch.save({"model": plain, "x": x, "ref": ref}, path)
    code = f"""
import sys
sys.modules["orthofx"] = None  # import orthofx raises
import torch
ck = torch.load({str(path)!r}, weights_only=False)
with torch.no_grad():
    y = ck["model"](ck["x"])
torch.testing.assert_close(y, ck["ref"], rtol=1e-10, atol=1e-12)
assert not any(m == "orthofx" or m.startswith("orthofx.") for m, v in sys.modules.items() if v is not None)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


@given(
    n=st.integers(1, 7),
    batch=st.sampled_from([(), (3,), (2, 2)]),
    rank=st.integers(0, 7),
    usage=st.sampled_from(["sqrtm", "invsqrtm"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_emit_plain_is_exact_spectral_forward_bitwise(n, batch, rank, usage, dtype, seed) -> None:
    """On PSD matrices of any rank (rank 0: A = 0, every eigenvalue floored) and a non-PSD one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, min(rank, n) or 1, generator=g, dtype=torch.float64)
    a = (x @ x.mT if rank else torch.zeros(*batch, n, n, dtype=torch.float64)).to(dtype)
    graph = fx.Graph()
    graph.output(emit_plain(graph, graph.placeholder("a"), usage))
    plain = fx.GraphModule(nn.Module(), graph)
    assert "orthofx" not in plain.code
    module = ExactSpectral(usage, "test")
    for m in (a, a - 0.5 * torch.eye(n, dtype=dtype)):
        want, got = module(m), plain(m)
        assert got.dtype == m.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_emit_plain_refuses_an_unknown_usage() -> None:
    graph = fx.Graph()
    with pytest.raises(ConfigError, match="usage"):
        emit_plain(graph, graph.placeholder("a"), "expm")


# ------------------------------------------------------------------------------ replay
def test_checkpoint_replays_the_fused_meta_layer(device: torch.device) -> None:
    dtype = torch.float64
    x = _input(dtype, device)
    gm, report = orthofx.transform(_model("sqrt", dtype, device), x, config="nog+ow")
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)  # one plain step: weights away from their init
    gm(x).square().sum().backward()
    opt.step()
    (swap,) = plan_of(gm).swaps
    assert swap.output is not None and swap.to_dict()["output"] == swap.output
    assert [a.kind for a in report.actions if a.is_swap] == [ActionKind.FUSE]

    buf = io.BytesIO()
    orthofx.save_checkpoint(gm, buf)
    buf.seek(0)
    back = orthofx.load_checkpoint(_model("sqrt", dtype, device, seed=7), buf)
    types = {n: type(m).__name__ for n, m in gm.named_modules()}
    assert {n: type(m).__name__ for n, m in back.named_modules()} == types and types[swap.module] == "ExactSpectral"
    (path, fused), = _fused(back).items()
    assert path == swap.module and fused.usage == "sqrtm"
    assert fused.orthofx_label == _fused(gm)[path].orthofx_label
    assert plan_of(back).swaps == plan_of(gm).swaps
    for training in (True, False):
        gm.train(training), back.train(training)
        torch.testing.assert_close(back(x), gm(x), rtol=1e-12, atol=1e-14)
    want, got = _grads(gm, x), _grads(back, x)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)

    # replay of the plan alone gives the same graph
    again = replay(_model("sqrt", dtype, device), plan_of(gm))
    assert again.code == gm.code and list(_fused(again)) == [path]


def test_an_old_plan_without_output_still_loads() -> None:
    """A plan written before SwapRecord.output: its fused swap is replayed as the stable eigh
    (same forward) with a warning; non-fused swaps keep their dict format (no ``output`` key)."""
    dtype, device = torch.float64, torch.device("cpu")
    x = _input(dtype, device)
    gm, _ = orthofx.transform(_model("sqrt", dtype, device), x, config="nog")
    ck = orthofx.checkpoint(gm)
    (swap,) = ck["orthofx_plan"]["swaps"]
    del swap["output"]
    assert Plan.from_dict(ck["orthofx_plan"]).swaps[0].output is None
    with pytest.warns(UserWarning, match="without recording its output node"):
        old = orthofx.load_checkpoint(_model("sqrt", dtype, device), ck)
    assert isinstance(old.get_submodule(swap["module"]), StableDecomposition) and not _fused(old)
    with torch.no_grad():
        torch.testing.assert_close(old(x), gm(x), rtol=1e-9, atol=1e-12)
    assert "output" not in SwapRecord("n", "torch.linalg.eigh", "eigh", "m").to_dict()


def test_replay_refuses_a_plan_whose_fused_nodes_are_missing() -> None:
    dtype, device = torch.float64, torch.device("cpu")
    x = _input(dtype, device)
    gm, _ = orthofx.transform(_model("sqrt", dtype, device), x, config="nog")
    plan = plan_of(gm)
    (swap,) = plan.swaps
    for bad in (dict(output="no_such_node"), dict(node="no_such_eigh"), dict(output="conv")):
        broken = Plan(plan.config, plan.producers, [SwapRecord(**{**swap.to_dict(), **bad})])
        with pytest.raises(ConfigError, match="different architecture"):
            replay(_model("sqrt", dtype, device), broken)


def test_fuse_at_checks_its_nodes() -> None:
    gm = fx.symbolic_trace(CovRoot("sqrt"))
    eig = next(n.name for n in gm.graph.nodes if n.target is torch.linalg.eigh)
    with pytest.raises(ConfigError, match="usage"):
        fuse_at(gm, eig, "matmul_2", "expm")
    with pytest.raises(ConfigError, match="computed from"):
        fuse_at(gm, eig, "x", "sqrtm")


class _Head(nn.Module):
    """An eigh + U (1/√Λ) Uᵀ (fused) and an eigvalsh (a stable swap) of one covariance."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.proj(x).flatten(2)
        cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(5, dtype=f.dtype, device=f.device)
        lam, u = torch.linalg.eigh(cov)
        white = u @ torch.diag_embed(lam.rsqrt()) @ u.transpose(1, 2)
        return white.flatten(1).sum(1) + torch.linalg.eigvalsh(cov).sum(1)


class _WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_replay_of_fused_and_stable_swaps_in_a_submodule_matches_transform() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    gm, report = orthofx.transform(_WithHead().double(), x, config="svd")
    torch.manual_seed(1)
    back = orthofx.load_checkpoint(_WithHead().double(), orthofx.checkpoint(gm))
    kinds = {n: (type(m).__name__, m.orthofx_label) for n, m in back.named_modules()
             if isinstance(m, (ExactSpectral, StableDecomposition))}
    assert kinds == {n: (type(m).__name__, m.orthofx_label) for n, m in gm.named_modules()
                     if isinstance(m, (ExactSpectral, StableDecomposition))}
    assert sorted(k for k, _ in kinds.values()) == ["ExactSpectral", "StableDecomposition"]
    assert {label for _, label in kinds.values()} == {"head"}
    replayed = back._orthofx_meta["orthofx"]["report"]["actions"]  # the root stays the user's _WithHead
    assert sorted(a["kind"] for a in replayed) == sorted(a.kind.value for a in report.actions) == ["fuse", "stable"]
    torch.testing.assert_close(back(x), gm(x), rtol=1e-12, atol=1e-14)
    want, got = _grads(gm, x), _grads(back, x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)


def test_exact_spectral_forward_logs_nothing(caplog):
    """Every training step runs ExactSpectral.forward: it must not log (torch.fx's
    is_fx_tracing() logs a warning on every call)."""
    import logging

    from orthofx.fuse import ExactSpectral

    a = torch.randn(3, 5, 5, dtype=torch.float64)
    a = a @ a.mT + 1e-3 * torch.eye(5, dtype=torch.float64)
    mod = ExactSpectral("sqrtm", "test")
    with caplog.at_level(logging.DEBUG):
        y = mod(a)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    torch.testing.assert_close(y @ y, a, rtol=1e-9, atol=1e-10)
