"""κ conventions of the monitor (issue 14) against float64 references: κ(Σ + εI), the numerical
rank and κ of Σ on its range, the paper's convention; constructed spectra, batched GCP-style,
grouped whitening, a float32-formed Σ, and a swapped decomposition with a user label.

dtypes and tolerances: references are numpy float64; ε values are stated per test; rank
tolerance n·u·λ_max with u of the coarser of formation/decomposition dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from orthofx.monitor import ConditioningMonitor, summarize_spectrum
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm
from orthofx.nn.stable import StableDecomposition

U64 = float(np.finfo(np.float64).eps)
U32 = float(np.finfo(np.float32).eps)


def _spd(mu: np.ndarray, seed: int) -> np.ndarray:
    """Q diag(mu) Qᵀ with a random orthogonal Q (float64)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((mu.size, mu.size)))
    return (q * mu) @ q.T


@given(
    n=st.integers(2, 10),
    data=st.data(),
    eps=st.sampled_from([0.0, 1e-5, 1e-2]),
    seed=st.integers(0, 2**16),
)
def test_constructed_spectrum_rank_and_conventions(n, data, eps, seed):
    """Σ = Q diag(μ) Qᵀ with r nonzero μ in [1e-4, 1]·scale; λ = eigvalsh(Σ) + ε (float64),
    a batch of 3 such matrices with one spectrum: rank = r, κ_range = μ_max/μ_min⁺,
    κ = (μ_max + ε)/(μ_min + ε), κ_paper saturates at ≤ 1/u for r < n and equals κ_range for r = n."""
    r = data.draw(st.integers(1, n))
    logs = data.draw(st.lists(st.floats(-4, 0), min_size=r, max_size=r))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    mu = np.sort(np.concatenate([np.zeros(n - r), scale * 10.0 ** np.array(logs)]))
    sigmas = [_spd(mu, seed + k) for k in range(3)]
    lam = torch.tensor(np.stack([np.linalg.eigvalsh(s) for s in sigmas])) + eps
    kappa, kappa_max, lam_max, lam_min, rank, k_range, k_paper = summarize_spectrum(lam, eps, U64).tolist()
    assert rank == r == np.linalg.matrix_rank(sigmas[0])
    assert k_range == pytest.approx(mu[-1] / mu[n - r], rel=1e-6)
    assert lam_max == pytest.approx(mu[-1] + eps, rel=1e-9)
    if eps > 0 or r == n:
        assert kappa == pytest.approx((mu[-1] + eps) / (mu[0] + eps), rel=1e-6)
        assert kappa_max == pytest.approx(kappa, rel=1e-6)
    if r == n:
        assert k_paper == pytest.approx(k_range, rel=1e-6)
    else:
        assert 1.0 / (n * U64) <= k_paper <= 1.0 / U64


def test_summary_edge_cases():
    # Σ = 0 with ε: rank 0, no range (NaN), κ = 1; NaN eigenvalues: NaN everywhere but counts
    lam = torch.full((2, 4), 1e-2, dtype=torch.float64)
    kappa, _, _, _, rank, k_range, k_paper = summarize_spectrum(lam, 1e-2, U64).tolist()
    assert kappa == 1.0 and rank == 0 and math.isnan(k_range) and math.isnan(k_paper)
    lam = torch.tensor([[1.0, 2.0, float("nan")]], dtype=torch.float64)
    out = summarize_spectrum(lam, 0.0, U64).tolist()
    assert all(math.isnan(v) for v in (out[0], out[4], out[5], out[6]))
    # rank 1: κ_range = 1; empty spectrum: no summary
    lam = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)
    assert summarize_spectrum(lam, None, U64)[5].item() == 1.0
    assert summarize_spectrum(torch.empty(3, 0), 0.0, U64) is None


def _gcp_reference(f64: np.ndarray, eps: float) -> dict[str, float]:
    """Per image (N, C, M) float64: Σ = Xc Xcᵀ/M; medians of κ(Σ+εI), rank, κ_range."""
    kap, ranks, ranges = [], [], []
    for x in f64:
        xc = x - x.mean(axis=1, keepdims=True)
        s = xc @ xc.T / x.shape[1]
        mu = np.linalg.eigvalsh(s)
        r = np.linalg.matrix_rank(s, tol=s.shape[0] * U64 * (mu[-1] + eps))
        kap.append((mu[-1] + eps) / (mu[0] + eps))
        ranks.append(r)
        ranges.append(mu[-1] / np.sort(mu)[-r])
    med = lambda v: float(torch.tensor(v, dtype=torch.float64).median())  # torch's lower median
    return {"kappa": med(kap), "kappa_max": max(kap), "rank": med(ranks), "kappa_range": med(ranges)}


@pytest.mark.parametrize("backend", ["auto", "eigh"])
def test_gcp_batched_rank_deficient(device, backend):
    """GCP: C = 16 channels, 3×3 = 9 positions per image, ε = 1e-3; Σ has rank ≤ 8 < 16.
    "auto" takes the exact Gram route (M < C), "eigh" the float64 eigh of Σ."""
    torch.manual_seed(0)
    eps = 1e-3
    conv = nn.Conv2d(4, 16, 1).to(device)
    model = nn.Sequential(conv, CovariancePooling(16, eps=eps, backend=backend)).to(device)
    mon = ConditioningMonitor(model, run="gcp")
    x = torch.randn(5, 4, 3, 3, device=device)
    with torch.no_grad():
        ref = _gcp_reference(conv(x).double().reshape(5, 16, 9).cpu().numpy(), eps)
    model(x)
    mon.step()
    (rec,) = mon.flush()
    # "auto" on CUDA decomposes the Gram matrix in float32 (the gesvda route): u = u32 there
    u = U32 if (device.type == "cuda" and backend == "auto") else U64
    rel = 1e-8 if u == U64 else 1e-4
    assert rec["eps"] == eps and rec["size"] == 16 and rec["kind"] == "meta"
    assert rec["rank"] == ref["rank"] == 4  # a 1×1 conv of 4 channels plus bias: rank ≤ 4
    assert rec["kappa"] == pytest.approx(ref["kappa"], rel=rel)
    assert rec["kappa_max"] == pytest.approx(ref["kappa_max"], rel=rel)
    assert rec["kappa_range"] == pytest.approx(ref["kappa_range"], rel=rel)
    # the paper's convention on a rank-deficient Σ: the rounding floor (float64: ≈1e15..4.5e15)
    assert 1.0 / (16 * u) <= rec["kappa_paper"] <= 1.0 / u


def test_grouped_whitening(device):
    """DBN with 2 groups of 8 channels after a 1→16 2×2 stem (4-dim patches): each group's Σ
    has rank 4 of 8; ε = 1e-2; medians over the 2 groups against float64 numpy."""
    torch.manual_seed(1)
    eps = 1e-2
    stem = nn.Conv2d(1, 16, 2, bias=False).to(device)
    model = nn.Sequential(stem, DecorrelatedBatchNorm(16, groups=2, eps=eps, backend="eigh")).to(device)
    mon = ConditioningMonitor(model)
    x = torch.randn(6, 1, 7, 7, device=device)
    with torch.no_grad():
        f = stem(x).double().transpose(0, 1).reshape(2, 8, -1).cpu().numpy()
    ref = _gcp_reference(f, eps)
    model(x)
    mon.step()
    (rec,) = mon.flush()
    assert rec["eps"] == eps and rec["size"] == 8
    assert rec["rank"] == ref["rank"] == 4
    assert rec["kappa"] == pytest.approx(ref["kappa"], rel=1e-8)
    assert rec["kappa_range"] == pytest.approx(ref["kappa_range"], rel=1e-8)


def test_float32_formed_covariance_uses_float32_tolerance():
    """backend="ns" forms Σ in float32 (its eigenvalues are then taken in float64): the null
    eigenvalues sit near 1e-8·λ_max, far above a float64 tolerance. The rank must still be the
    patch dimension 9 (16 with a float64 tolerance), and κ_paper saturates at ≤ 1/u32."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), DecorrelatedBatchNorm(16, eps=1e-2, backend="ns"))
    mon = ConditioningMonitor(model)
    model(torch.randn(8, 1, 10, 10))
    mon.step()
    (rec,) = mon.flush()
    assert rec["rank"] == 9
    assert rec["kappa_paper"] <= 1.0 / U32


class _UserEigh(nn.Module):
    """A user's covariance + swapped-in decomposition, as transform leaves it: the stand-in
    carries the user's path as ``orthofx_label`` and no ε of its own."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dtype = dtype
        self.proj = nn.Linear(3, 6, bias=False)
        self.swap = StableDecomposition.for_target(torch.linalg.eigh)
        self.swap.orthofx_label = "head.eigh"

    def forward(self, x):
        f = self.proj(x).to(self.dtype)  # (N, 6) from 3 inputs: rank ≤ 3
        cov = f.T @ f / f.shape[0]  # formed (and passed) in self.dtype
        return self.swap(cov).eigenvalues.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swapped_decomposition_label_and_no_eps(dtype):
    """The matrix's own dtype sets the tolerance: a float32 Σ (null eigenvalues ≈ 1e-8·λ_max)
    still has rank 3 of 6."""
    torch.manual_seed(3)
    model = _UserEigh(dtype)
    mon = ConditioningMonitor(model)
    assert mon.layer_names == ["head.eigh"] and "layers=1" in repr(mon)
    # layers= accepts the label or the qualified name
    assert ConditioningMonitor(model, layers=["swap"]).layer_names == ["head.eigh"]
    x = torch.randn(20, 3)
    model(x)
    mon.step()
    (rec,) = mon.flush()
    with torch.no_grad():
        f = model.proj(x).double()
        s = (f.T @ f / 20).numpy()
    mu = np.linalg.eigvalsh(s)
    assert rec["layer"] == "head.eigh" and rec["eps"] is None
    assert rec["rank"] == 3 == np.linalg.matrix_rank(s)
    rel = 1e-8 if dtype == torch.float64 else 1e-4
    assert rec["kappa_range"] == pytest.approx(mu[-1] / mu[-3], rel=rel)


def test_summary_reports_the_eps_free_conventions():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), DecorrelatedBatchNorm(16, eps=1e-2, backend="eigh"))
    mon = ConditioningMonitor(model)
    for _ in range(3):
        model(torch.randn(8, 1, 10, 10))
        mon.step()
    s = mon.summary()["1"]
    ranges = [r["kappa_range"] for r in mon.records]
    assert s["kappa_range_median"] == float(torch.tensor(ranges, dtype=torch.float64).median())
    assert s["kappa_range_final"] == ranges[-1] and s["rank_final"] == 9
    assert s["kappa_paper_final"] == mon.records[-1]["kappa_paper"]
