"""Scale safety of NOG, polar and OLR (issue 12): finite gradients from 1e-30 to 1e30 in float32
and bfloat16 give U Vᵀ (or a counted zero), on the CPU path and on the CUDA path
(``cuda_policy()``), with no host synchronisation on the latter."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orthofx.linalg.polar import polar
from orthofx.syncs import cuda_policy, sync_audit
from orthofx.treatments.gradient import nog, olr, olr_eta

# tolerance on ‖Q V_r − U_r‖_F / √r: float32 (svd/eigh ~1e-6, Polar Express ~1e-6 for
# σ_min ≥ 0.1 σ_max), bfloat16 output (entries rounded to 2^-8 relative)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _matrix(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """float64 m×n of the given rank, nonzero singular values in [0.1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.zeros(k, dtype=torch.float64)
    s[:rank] = torch.linspace(1.0, 0.1, rank, dtype=torch.float64) if rank else s[:0]
    return (u * s) @ v.T


def _range_error(q: torch.Tensor, g: torch.Tensor, rank: int) -> float:
    """‖Q V_r − U_r‖_F/√r against the float64 SVD of exactly the (rounded) input g: every
    method's U Vᵀ (svd: null space lifted; eigh/Polar Express: partial isometry) agrees there."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    ur, vr = u[:, :rank], vh[:rank].T
    return ((q.double() @ vr - ur).norm() / math.sqrt(rank)).item()


def _nog(g: torch.Tensor, method: str, cuda: bool) -> tuple[torch.Tensor, int, int]:
    t = nog(method)
    state = t.init([g])
    if cuda:
        with cuda_policy(), sync_audit() as audit:
            upd, state = t.update([g], state, [g])
        assert audit.syncs == {}, audit.syncs
    else:
        upd, state = t.update([g], state, [g])
    return upd.grads[0], int(state.zero), int(state.nonfinite)


@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    rank_frac=st.sampled_from([0.0, 0.5, 1.0]),
    log_scale=st.floats(-30.0, 30.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    path=st.sampled_from(["cpu-auto", "cuda-auto", "svd", "eigh", "polar_express"]),
    seed=st.integers(0, 2**16),
)
def test_nog_is_scale_safe(
    m: int, n: int, rank_frac: float, log_scale: float, dtype: torch.dtype, path: str, seed: int
) -> None:
    rank = round(rank_frac * min(m, n))
    g = (_matrix(m, n, rank, seed) * 10.0**log_scale).to(dtype)
    method = "auto" if path.endswith("auto") else path
    out, zero, nonfinite = _nog(g, method, cuda=path == "cuda-auto")
    assert out.dtype == dtype and out.shape == g.shape
    assert torch.isfinite(out).all()
    assert nonfinite == 0
    if rank == 0:
        assert zero == 1 and not out.any()
        return
    assert zero == 0
    assert _range_error(out, g, rank) < TOL[dtype], (path, rank, log_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1.3e-23, 1e-20, 1e19, 1e30])
@pytest.mark.parametrize("method", ["svd", "eigh", "ns", "polar_express"])
def test_polar_is_scale_invariant(dtype: torch.dtype, scale: float, method: str) -> None:
    """The measured failures: 6×8 × 1.3e-23 gave NaN (polar_express), below 1.1e-23 every
    method gave 0, ≥ 1e19 polar_express and ns gave 0. Now polar(c·G) = polar(G)."""
    g = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = polar(g, method=method)
    q = polar((g.double() * scale).to(dtype), method=method)
    assert torch.isfinite(q).all() and q.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: c·G is rounded again
    assert (q.double() - ref.double()).norm() / ref.double().norm() < tol


@pytest.mark.parametrize("cuda", [False, True])
def test_nog_tiny_and_huge_gradient_update_the_weight(cuda: bool) -> None:
    torch.manual_seed(0)
    g0 = torch.randn(6, 8)
    ref = torch.linalg.svd(g0.double(), full_matrices=False)
    ref = ref[0] @ ref[2]
    for scale in (1e-25, 1.3e-23, 1e19, 1e30):
        out, zero, nonfinite = _nog((g0.double() * scale).float(), "auto", cuda)
        assert (zero, nonfinite) == (0, 0)
        assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_nog_counts_only_true_zeros_and_nonfinite() -> None:
    g = torch.stack([torch.zeros(4, 5), torch.full((4, 5), 1e-30), torch.full((4, 5), math.nan)])
    t = nog("auto")
    state = t.init([g[0]])
    with cuda_policy():
        upd, state = t.update(list(g), state, [g[0]] * 3)
    out = upd.grads
    assert int(state.zero) == 1 and int(state.nonfinite) == 1
    assert not out[0].any() and not out[2].any() and torch.isfinite(out[1]).all() and out[1].any()


@given(
    log_a=st.floats(-30.0, 30.0),
    log_b=st.floats(-30.0, 30.0),
    seed=st.integers(0, 2**16),
)
def test_olr_eta_is_scale_safe(log_a: float, log_b: float, seed: int) -> None:
    """η*(a·w, b·l) = (a/b)·η*(w, l), with w, l in float32 and the dot products in float64
    (the default) or float32 — no overflow to inf/NaN and no underflow to 0."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(300, generator=gen, dtype=torch.float64)
    l = 0.3 * torch.randn(300, generator=gen, dtype=torch.float64) + 0.05 * w
    a, b = 10.0**log_a, 10.0**log_b
    wa, lb = (w * a).float(), (l * b).float()
    exact = olr_eta(wa.double() / a, lb.double() / b).item() * a / b  # rounded inputs, rescaled
    assert math.isfinite(exact) and exact != 0
    assert olr_eta(wa, lb).dtype == torch.float32
    for dtype in (torch.float64, torch.float32):
        t = olr(dtype=dtype, history=False)
        state = t.init([wa])
        _, state = t.update([lb], state, [wa], {"lrs": [1.0]})
        eta = state.eta.item()
        if dtype == torch.float32 and not 1e-37 < abs(exact) < 3e38:
            continue  # η* itself is outside float32's range
        assert math.isclose(eta, exact, rel_tol=1e-4), (dtype, eta, exact)


@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_scale, l_scale", [("max", "sub"), ("sub", "max"), ("max", "max"), ("sub", "sub")])
def test_olr_at_the_dtype_extremes_matches_exact_arithmetic(src, w_scale, l_scale) -> None:
    """OLR's float64 dot products of float32/bfloat16/float16 entries (unscaled: float64 holds
    their squares and sums) give η* of the rounded inputs to float64 accuracy, with entries near
    the source dtype's largest magnitude ("max") and in its subnormal range ("sub")."""
    from fractions import Fraction

    info = torch.finfo(src)
    scale = {"max": info.max / 2, "sub": info.tiny * info.eps * 64}
    gen = torch.Generator().manual_seed(7)
    w = ((torch.rand(64, 9, generator=gen, dtype=torch.float64) + 0.5) * scale[w_scale]).to(src)
    l = ((torch.rand(64, 9, generator=gen, dtype=torch.float64) - 0.3) * scale[l_scale]).to(src)
    assert torch.isfinite(w).all() and (w != 0).all() and (l != 0).any()
    W = [Fraction(float(x)) for x in w.double().flatten()]
    L = [Fraction(float(x)) for x in l.double().flatten()]
    ww, lw, ll = sum(a * a for a in W), sum(a * b for a, b in zip(W, L)), sum(b * b for b in L)
    exact = float(ww * lw / (ww * ll + 2 * lw * lw))
    t = olr(history=False)
    state = t.init([w])
    _, state = t.update([l], state, [w], {"lrs": [math.inf]})
    assert state.eta.dtype == torch.float64
    assert math.isclose(float(state.eta), exact, rel_tol=1e-12), (float(state.eta), exact)


def test_olr_reads_float32_pairs_without_a_scaling_pass() -> None:
    """The float64 route for float32 pairs runs no max-abs scaling (abs, amax) and no separate
    cast: one stack that writes float64, one batched Gram — two kernels for any number of
    producers, on the GPU too (cost: benchmarks/overhead.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ws = [torch.randn(8, 5), torch.randn(8, 5)]
    ls = [torch.randn(8, 5), torch.randn(8, 5)]
    t = olr(history=False)
    state = t.init(ws)
    with Ops() as ops:
        t.update(ls, state, ws, {"lrs": [0.1, 0.1]})
    assert not {"abs", "amax", "_to_copy", "copy_"} & set(ops.names), ops.names  # no scaling, no cast pass
    assert ops.names.count("stack") == 1 and ops.names.count("bmm") == 1  # one cast-on-write block, one Gram
