"""Producer weight statistics (issue 14): ‖W‖_F and σ_max/σ_min of the flattened effective
weight, against numpy float64, for explicit producers and for a transformed model (plan)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ConfigError
from orthofx.monitor import ConditioningMonitor, load_records, weight_summary
from orthofx.nn import DecorrelatedBatchNorm


def _np_stats(w: torch.Tensor) -> tuple[float, float, float, float]:
    a = w.detach().double().cpu().numpy().reshape(w.shape[0], -1)
    s = np.linalg.svd(a, compute_uv=False)
    return float(np.linalg.norm(a)), float(s[0] / s[-1]), float(s[0]), float(s[-1])


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (16, 1, 3, 3), (5, 7)])
def test_weight_summary_matches_numpy(device, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, device=device)  # float32 weight, statistics in float64
    got = weight_summary(w)
    assert got.dtype == torch.float64 and got.device.type == device.type
    np.testing.assert_allclose(got.cpu().numpy(), _np_stats(w), rtol=1e-10)


def test_weight_summary_degenerate():
    # rank-deficient: σ_min = 0 -> cond inf; zero: cond NaN; non-finite: norm NaN/inf, rest NaN
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    norm, cond, smax, smin = weight_summary(w).tolist()
    assert norm == pytest.approx(math.sqrt(5)) and cond == math.inf and smin == 0.0
    assert math.isnan(weight_summary(torch.zeros(3, 3))[1].item())
    bad = weight_summary(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])).tolist()
    assert all(math.isnan(v) for v in bad)


def _stem(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), DecorrelatedBatchNorm(16, eps=1e-2)).to(device)


def test_explicit_producer_records_the_weight_of_the_recorded_forward(device, tmp_path):
    """every=2 with an SGD step per iteration: the step-k record holds W as step k's forward
    used it (before that step's update), as float64 statistics."""
    model = _stem(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = ConditioningMonitor(model, every=2, producers=["0.weight"])
    assert mon.producer_names == ["0.weight"]
    seen = {}
    for step in range(5):
        if step % 2 == 0:
            seen[step] = model[0].weight.detach().clone()
        model(torch.randn(8, 1, 10, 10, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    recs = [r for r in mon.flush() if r["kind"] == "producer"]
    assert [r["step"] for r in recs] == [0, 2, 4] and {r["layer"] for r in recs} == {"0.weight"}
    for r in recs:
        norm, cond, smax, smin = _np_stats(seen[r["step"]])
        assert r["weight_norm"] == pytest.approx(norm, rel=1e-10)
        assert r["weight_cond"] == pytest.approx(cond, rel=1e-8)
        assert r["weight_sigma_max"] == pytest.approx(smax, rel=1e-10)
        assert r["kappa"] is None
    # the weight changed between records, and the records round-trip through CSV
    assert recs[0]["weight_norm"] != recs[1]["weight_norm"]
    back = [r for r in load_records(mon.to_csv(tmp_path / "k.csv")) if r["kind"] == "producer"]
    assert [r["weight_norm"] for r in back] == pytest.approx([r["weight_norm"] for r in recs], rel=1e-12)
    assert mon.summary().keys() == {"1"}  # producer records stay out of the κ summary


def test_transformed_model_uses_the_plan_and_the_effective_weight():
    """OW: the recorded weight is exp(A − Aᵀ) on the flattened (16, 9) weight, so σ = 1:
    ‖W‖_F = √9 and σ_max/σ_min = 1 (float64 statistics of a float32 orthogonal weight)."""
    model = _stem(torch.device("cpu"))
    x = torch.randn(8, 1, 10, 10)
    gm, _ = orthofx.transform(model, x, "ow")
    mon = ConditioningMonitor(gm)
    assert mon.producer_names == ["0.weight"]
    gm(x)
    mon.step()
    (rec,) = [r for r in mon.flush() if r["kind"] == "producer"]
    assert rec["weight_norm"] == pytest.approx(3.0, rel=1e-5)
    assert rec["weight_cond"] == pytest.approx(1.0, rel=1e-5)
    assert ConditioningMonitor(gm, weights=False).producer_names == []


def test_untransformed_model_has_no_producers_and_bad_names_are_config_errors():
    model = _stem(torch.device("cpu"))
    assert ConditioningMonitor(model).producer_names == []
    with pytest.raises(ConfigError, match="nope.weight"):
        ConditioningMonitor(model, producers=["nope.weight"])
    with pytest.raises(ConfigError):
        ConditioningMonitor(model, producers="0.weight")
