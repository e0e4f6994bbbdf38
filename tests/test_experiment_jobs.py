"""orthofx.experiment.jobs: the demo's runs spread over worker processes (one per core)."""

from __future__ import annotations

import json
import math
import operator
import time

import pytest

from orthofx.experiment import demo as demo_mod
from orthofx.experiment.jobs import Task, default_jobs, run_tasks, usable_cores
from test_cli import _has_fashion_mnist  # tests/ is on sys.path (rootdir-less tests, pytest prepend mode)


def test_run_tasks_in_workers_returns_every_result_by_key():
    tasks = [Task(("pow", k), operator.pow, (k, 3), cost=k) for k in range(5)]
    seen = []
    out = run_tasks(tasks, jobs=2, on_done=lambda t, r, s: seen.append((t.key, r, s)))
    assert out == {("pow", k): k ** 3 for k in range(5)}
    assert sorted(k for k, _, _ in seen) == sorted(out) and all(s >= 0 for _, _, s in seen)


def test_run_tasks_serial_keeps_the_given_order():
    seen = []
    tasks = [Task(k, operator.neg, (k,), cost=k) for k in (3, 1, 2)]
    assert run_tasks(tasks, jobs=1, on_done=lambda t, r, s: seen.append(t.key)) == {3: -3, 1: -1, 2: -2}
    assert seen == [3, 1, 2]


def test_a_failing_task_raises_its_error_and_stops_the_pool():
    tasks = [Task("ok", math.sqrt, (4.0,)), Task("bad", math.sqrt, (-1.0,), cost=2), Task("slow", time.sleep, (30,))]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="math domain"):
        run_tasks(tasks, jobs=2)
    assert time.perf_counter() - t0 < 25  # the 30 s task was terminated, not waited for


def test_duplicate_keys_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        run_tasks([Task("a", abs, (1,)), Task("a", abs, (2,))], jobs=2)


def test_default_jobs():
    assert default_jobs("cpu") == usable_cores() >= 1
    assert default_jobs("cuda") == default_jobs("cuda:1") == 1


@pytest.mark.slow  # two quick demos end to end
@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
def test_demo_results_do_not_depend_on_jobs(tmp_path):
    """Every run is seeded and deterministic: two worker processes give the serial results."""
    rows = ["SVD", "NOG", "OW", "Newton-Schulz"]
    res = {}
    for jobs in (1, 2):
        r = demo_mod.demo(tmp_path / f"j{jobs}", quick=True, experiment="dbn", rows=rows, jobs=jobs, progress=False,
                          log=lambda s: None)
        assert r["jobs"] == jobs
        res[jobs] = r["experiments"]["dbn"]["runs"]
    assert [r["label"] for r in res[2]] == rows
    for a, b in zip(res[1], res[2]):
        assert a["final_test_error"] == b["final_test_error"]
        assert json.dumps(a["kappa_records"]) == json.dumps(b["kappa_records"])
        assert json.dumps(a["history"]) == json.dumps(b["history"])


@pytest.mark.parametrize("kwargs, has_sn", [({}, False), ({"extended": True}, True), ({"rows": ["SVD", "SN"]}, True)])
def test_extended_dbn_rows_are_opt_in(tmp_path, monkeypatch, kwargs, has_sn):
    """The DBN rows beyond the 12-minute budget (SN, OL, NOG+SN, ...) run only when asked for."""
    import orthofx.experiment.jobs as jobs_mod

    seen = []

    def fake(tasks, **k):
        seen.extend(t.key for t in tasks)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(jobs_mod, "run_tasks", fake)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.demo(tmp_path, quick=True, experiment="dbn", jobs=1, log=lambda s: None, **kwargs)
    labels = [k[2] for k in seen if k[0] == "run"]
    assert ("SN" in labels) == has_sn and ("NOG+OLR" in labels) == ("extended" in kwargs)
    assert "SVD" in labels
    if "extended" in kwargs:
        assert {"SN", "OL", "NOG+SN", "NOG+OL", "NOG+OLR", "OW+OLR"} <= set(labels)
