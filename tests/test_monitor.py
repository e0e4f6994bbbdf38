"""Conditioning monitor: κ against float64 references, failure counters, sinks and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from orthofx.linalg import inject_failures, solver_stats
from orthofx.monitor import ConditioningMonitor, load_records, plot
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm


def _stem(device, eps=1e-2, backend="eigh"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), DecorrelatedBatchNorm(16, eps=eps, backend=backend)).to(device)


def _reference_kappa(model: nn.Module, x: torch.Tensor, eps: float) -> float:
    with torch.no_grad():
        f = model[0](x).double().transpose(0, 1).reshape(16, -1)
        f = f - f.mean(dim=1, keepdim=True)
        cov = f @ f.T / f.shape[1] + eps * torch.eye(16, dtype=torch.float64, device=x.device)
        lam = np.linalg.eigvalsh(cov.cpu().numpy())
    return float(lam[-1] / lam[0])


@pytest.mark.parametrize("backend", ["eigh", "ns"])
def test_kappa_equals_float64_reference(device, backend):
    eps = 1e-2
    model = _stem(device, eps, backend)
    mon = ConditioningMonitor(model, every=1, run="t")
    x = torch.randn(8, 1, 10, 10, device=device)
    expected = _reference_kappa(model, x, eps)
    model(x)
    mon.step()
    (rec,) = mon.flush()
    assert rec["layer"] == "1" and rec["step"] == 0
    # rank <= 9 < 16 channels: kappa = (lambda_max + eps) / eps exactly
    # "eigh" forms the covariance in float64; "ns" in float32 (its κ is that of the float32 matrix)
    rel = 1e-8 if backend == "eigh" else 1e-4
    assert rec["kappa"] == pytest.approx(expected, rel=rel)
    assert rec["lambda_min"] == pytest.approx(eps, rel=rel)


def test_every_k_steps_and_median_over_batch(device):
    head = CovariancePooling(6, eps=1e-3).to(device)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), head).to(device)
    mon = ConditioningMonitor(model, every=3)
    xs = [torch.randn(5, 3, 4, 4, device=device) for _ in range(7)]
    expected = {}
    for step, x in enumerate(xs):
        model(x)
        if step % 3 == 0:
            with torch.no_grad():
                f = model[0](x).double().reshape(5, 6, -1)
                f = f - f.mean(-1, keepdim=True)
                cov = f @ f.mT / f.shape[-1] + 1e-3 * torch.eye(6, dtype=torch.float64, device=device)
                lam = torch.linalg.eigvalsh(cov)
                expected[step] = (lam[:, -1] / lam[:, 0]).cpu()
        mon.step()
    recs = mon.flush()
    assert [r["step"] for r in recs] == [0, 3, 6]
    for r in recs:
        assert r["kappa"] == pytest.approx(float(expected[r["step"]].median()), rel=1e-8)
        assert r["kappa_max"] == pytest.approx(float(expected[r["step"]].max()), rel=1e-8)
    # recording is off on the other steps: no eigenvalues kept
    assert head.orthofx_record is False and mon.layer_names == ["1"]


def test_failure_counters_move_when_a_failure_is_injected(device):
    model = _stem(device)
    mon = ConditioningMonitor(model)
    x = torch.randn(4, 1, 8, 8, device=device)
    model(x)
    mon.step()
    with inject_failures(1):
        model(x)
    mon.step()
    recs = mon.flush()
    assert recs[0]["solver_failures"] == 0
    assert recs[1]["solver_failures"] == 1 and recs[1]["solver_fallbacks"] >= 1
    assert np.isfinite(recs[1]["kappa"])


def test_nonfinite_outputs_are_counted(device):
    model = _stem(device)
    model[1].nonfinite = "skip"  # pass the NaN batch through (the default refuses it on the CPU)
    mon = ConditioningMonitor(model)
    x = torch.randn(4, 1, 8, 8, device=device)
    model(x)
    mon.step()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    model(x)
    mon.step()
    recs = mon.flush()
    assert recs[0]["nonfinite_outputs"] == 0 and recs[1]["nonfinite_outputs"] > 0


def test_sinks_and_plot(tmp_path, device):
    runs = {}
    for name in ("a", "b"):
        model = _stem(device)
        mon = ConditioningMonitor(model, run=name)
        for _ in range(3):
            model(torch.randn(4, 1, 8, 8, device=device))
            mon.step()
        mon.to_csv(tmp_path / f"{name}.csv")
        mon.to_jsonl(tmp_path / f"{name}.jsonl")
        runs[name] = load_records(tmp_path / f"{name}.csv")
        assert load_records(tmp_path / f"{name}.jsonl")[0]["kappa"] == pytest.approx(runs[name][0]["kappa"])
        summ = mon.summary()
        assert summ["1"]["records"] == 3 and summ["1"]["kappa_final"] == pytest.approx(runs[name][-1]["kappa"])
        mon.close()
    fig = plot(runs, tmp_path / "kappa.png")
    assert (tmp_path / "kappa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].lines) == 2
    json.dumps(runs)  # records are JSON-serialisable


def test_model_without_meta_layer_is_a_clear_warning_not_an_error():
    """Issue 21: the model is never refused; an empty monitor says why in one line."""
    from orthofx.monitor import MonitorWarning

    with pytest.warns(MonitorWarning, match="nothing to monitor.*found no meta-layer"):
        mon = ConditioningMonitor(nn.Linear(3, 3), example_inputs=torch.randn(2, 3))
    assert mon.layer_names == [] and "found no meta-layer" in mon.empty_reason


def test_solver_stats_reset_between_tests_is_not_needed():
    # the monitor reports deltas from its own start, whatever the global counters hold
    solver_stats().record_failure()
    model = _stem(torch.device("cpu"))
    mon = ConditioningMonitor(model)
    model(torch.randn(4, 1, 8, 8))
    mon.step()
    assert mon.flush()[0]["solver_failures"] == 0


def test_pending_records_are_small_and_bounded(device):
    """A pending record holds 7 device numbers (not the spectrum), and step() flushes by itself
    after max_pending records, so memory stays bounded on long runs without flush()."""
    model = _stem(device)
    mon = ConditioningMonitor(model, every=1, max_pending=3)
    x = torch.randn(8, 1, 10, 10, device=device)
    for _ in range(7):
        model(x)
        mon.step()
        assert len(mon._pending) < 3
        assert all(p.summary.shape == (7,) and p.summary.device.type == device.type for p in mon._pending)
    assert len(mon.records) == 6  # two automatic flushes of 3
    recs = mon.flush()
    assert len(recs) == 1 and len(mon.records) == 7
    assert [r["step"] for r in mon.records] == list(range(7))
    expected = _reference_kappa(model, x, 1e-2)
    assert all(r["kappa"] == pytest.approx(expected, rel=1e-6) for r in mon.records)
    with pytest.raises(ValueError):
        ConditioningMonitor(model, max_pending=0)
