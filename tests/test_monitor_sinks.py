"""Monitor sinks (issue 15): the MetricSink protocol, TensorBoard / CSV / JSONL / logging /
callable sinks fed at each flush, and the library logger."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from torch import nn

from orthofx._log import logger as orthofx_logger
from orthofx.errors import ConfigError
from orthofx.linalg import inject_failures
from orthofx.monitor import (
    CallableSink,
    ConditioningMonitor,
    CSVSink,
    JSONLSink,
    LoggingSink,
    MetricSink,
    TensorBoardSink,
    record_metrics,
)
from orthofx.nn import DecorrelatedBatchNorm


def _run(sinks, steps=3, every=1, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), DecorrelatedBatchNorm(8, eps=1e-2))
    mon = ConditioningMonitor(model, every=every, sinks=sinks, producers=["0.weight"], **kw)
    for _ in range(steps):
        model(torch.randn(4, 1, 6, 6))
        mon.step()
    mon.flush()
    return mon


def test_callable_sink_gets_one_call_per_step_with_every_metric():
    calls = []
    mon = _run([CallableSink(lambda m, step: calls.append((step, m)))], steps=4, every=2)
    assert [s for s, _ in calls] == [0, 2]
    step0 = calls[0][1]
    rec = next(r for r in mon.records if r["step"] == 0 and r["kind"] == "meta")
    w = next(r for r in mon.records if r["step"] == 0 and r["kind"] == "producer")
    assert step0["kappa/1"] == rec["kappa"] and step0["kappa_range/1"] == rec["kappa_range"]
    assert step0["kappa_paper/1"] == rec["kappa_paper"] and step0["rank/1"] == rec["rank"] == 8  # 9-dim patches
    assert step0["weight_norm/0.weight"] == w["weight_norm"] and step0["weight_cond/0.weight"] == w["weight_cond"]
    assert all(isinstance(v, float) for v in step0.values())
    assert record_metrics(rec) == {k: v for k, v in step0.items() if k.endswith("/1")}


def test_csv_and_jsonl_sinks(tmp_path):
    mon = _run([CSVSink(tmp_path / "m.csv"), JSONLSink(tmp_path / "m.jsonl")])
    mon.close()
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    kappas = {int(r["step"]): float(r["value"]) for r in rows if r["metric"] == "kappa/1"}
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    metas = {r["step"]: r["kappa"] for r in mon.records if r["kind"] == "meta"}
    assert kappas == metas == {ln["step"]: ln["kappa/1"] for ln in lines}


def test_logging_sink_and_library_logger(caplog):
    assert any(isinstance(h, logging.NullHandler) for h in orthofx_logger.handlers)
    assert orthofx_logger.name == "orthofx"
    with caplog.at_level(logging.INFO, logger="orthofx"):
        _run([LoggingSink()], steps=2)
    msgs = [r for r in caplog.records if r.name == "orthofx.monitor" and r.getMessage().startswith("step ")]
    assert [m.getMessage().split(":")[0] for m in msgs] == ["step 0", "step 1"]
    assert "kappa/1=" in msgs[0].getMessage()


def test_monitor_warns_through_the_orthofx_logger_on_solver_failures(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), DecorrelatedBatchNorm(8, eps=1e-2))
    mon = ConditioningMonitor(model)
    with caplog.at_level(logging.WARNING, logger="orthofx"), inject_failures(1):
        model(torch.randn(4, 1, 6, 6))
        mon.step()
        mon.flush()
    assert any(r.name == "orthofx.monitor" and "solver failure" in r.getMessage() for r in caplog.records)


def test_tensorboard_sink_and_tensorboard_dir(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = _run([], tensorboard_dir=tmp_path / "tb")
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("kappa/1")}
    want = {r["step"]: r["kappa"] for r in mon.records if r["kind"] == "meta"}
    assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in got)
    assert "weight_norm/0.weight" in acc.Tags()["scalars"]
    with pytest.raises(ConfigError):
        TensorBoardSink()


def test_sinks_must_follow_the_protocol():
    class Good:
        def log(self, metrics, step):
            pass

        def close(self):
            pass

    assert isinstance(Good(), MetricSink)
    with pytest.raises(ConfigError, match="log"):
        _run([object()])
    calls = []
    mon = _run([lambda m, step: calls.append(step)], steps=2)  # a bare callable is a sink
    assert calls == [0, 1] and isinstance(mon.sinks[0], CallableSink)
    with pytest.raises(ConfigError):
        CallableSink(3)


def test_nonfinite_outputs_warn_once_per_increase(caplog):
    torch.manual_seed(0)
    # nonfinite="skip": the NaN batch passes through (the default refuses it on the CPU)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), DecorrelatedBatchNorm(8, eps=1e-2, nonfinite="skip"))
    mon = ConditioningMonitor(model, max_pending=1)  # a flush per record
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="orthofx"):
        model(torch.randn(4, 1, 6, 6))
        mon.step()
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] = 0.5
        model(torch.randn(4, 1, 6, 6))
        mon.step()  # finite again: the cumulative counter did not grow, no second warning
    assert [r["nonfinite_outputs"] > 0 for r in mon.records] == [True, True]
    assert mon.records[0]["nonfinite_outputs"] == mon.records[1]["nonfinite_outputs"]
    warns = [r for r in caplog.records if "non-finite outputs" in r.getMessage()]
    assert len(warns) == 1 and "meta-layer 1" in warns[0].getMessage()
