"""ConditioningMonitor.summary with NaN records and shuffled records; monitor errors are
OrthofxErrors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from orthofx.errors import ConfigError, InputError
from orthofx.monitor import ConditioningMonitor, load_records
from orthofx.nn import DecorrelatedBatchNorm


def _monitor(kappas: list[float]) -> ConditioningMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), DecorrelatedBatchNorm(4))
    mon = ConditioningMonitor(model, run="t")
    for step, k in enumerate(kappas):
        mon.records.append(
            {"run": "t", "step": step, "layer": "1", "kappa": k, "kappa_max": k, "lambda_max": 1.0,
             "lambda_min": 1.0, "nonfinite_outputs": step, "solver_failures": step, "solver_fallbacks": 0,
             "solver_nonfinite": 0}
        )
    return mon


def test_one_nan_step_does_not_poison_the_summary():
    # measured: kappa_median became NaN after one NaN record
    s = _monitor([10.0, math.nan, 30.0, 20.0, 40.0]).summary()["1"]
    assert s["kappa_median"] == 20.0 and s["kappa_max"] == 40.0
    assert s["nan_records"] == 1 and s["records"] == 5
    assert s["kappa_final"] == 40.0


def test_kappa_max_ignores_nan_wherever_it_is():
    # measured: max([nan, ...]) is NaN, max([..., nan]) is not: the result depended on order
    assert _monitor([math.nan, 5.0, 7.0]).summary()["1"]["kappa_max"] == 7.0
    assert _monitor([5.0, 7.0, math.nan]).summary()["1"]["kappa_max"] == 7.0


def test_all_nan_is_nan_and_inf_counts():
    s = _monitor([math.nan, math.nan]).summary()["1"]
    assert math.isnan(s["kappa_median"]) and math.isnan(s["kappa_max"]) and s["nan_records"] == 2
    s = _monitor([3.0, math.inf, math.nan]).summary()["1"]
    assert s["kappa_max"] == math.inf and s["nan_records"] == 1


def test_summary_is_independent_of_record_order():
    mon = _monitor([10.0, math.nan, 30.0, 20.0, 40.0, math.inf, 1.0])
    ref = mon.summary()
    for seed in range(5):
        random.Random(seed).shuffle(mon.records)
        got = mon.summary()
        assert got.keys() == ref.keys()
        for k, v in ref["1"].items():
            assert got["1"][k] == v or (math.isnan(v) and math.isnan(got["1"][k])), k
    assert ref["1"]["kappa_final"] == 1.0 and ref["1"]["solver_failures"] == 6


@pytest.mark.parametrize("kw", [{"every": 0}, {"every": 1.5}, {"every": True}, {"max_pending": 0}, {"layers": ["nope"]}])
def test_constructor_errors_are_config_errors(kw):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), DecorrelatedBatchNorm(4))
    with pytest.raises(ConfigError):
        ConditioningMonitor(model, **kw)


def test_no_meta_layer_warns_at_the_first_training_forward():
    """Without example inputs the analysis runs on the first training forward; an empty
    monitor then warns (issue 21: never a refusal)."""
    from orthofx.monitor import MonitorWarning

    model = nn.Linear(3, 3)
    mon = ConditioningMonitor(model)
    assert mon.pending_discovery and mon.empty_reason is None
    with pytest.warns(MonitorWarning, match="nothing to monitor"):
        model(torch.randn(2, 3))
    assert not mon.pending_discovery and mon.summary() == {}


def test_malformed_records_file_is_an_input_error(tmp_path):
    p = tmp_path / "k.csv"
    p.write_text("run,step,layer,kappa\nt,x,1,2.0\n")
    with pytest.raises(InputError, match="row 2"):
        load_records(p)
    with pytest.raises(InputError):
        load_records(tmp_path / "missing.csv")


def test_transformed_model_without_swaps_is_not_refused(monkeypatch):
    """A transformed model whose raw decompositions were kept used to be refused ("kept its
    raw ..."); now the analysis finds its meta-layers, or the empty monitor says what it found."""
    import orthofx.pipeline
    from orthofx.monitor import MonitorWarning

    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten())
    monkeypatch.setattr(orthofx.pipeline, "plan_of", lambda m: object())  # "has a plan"
    with pytest.warns(MonitorWarning, match="no orthofx meta-layer module and the analysis"):
        ConditioningMonitor(model, example_inputs=torch.randn(2, 1, 5, 5), weights=False)
