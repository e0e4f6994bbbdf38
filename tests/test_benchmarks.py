"""Smoke tests of the benchmark scripts the GPU session relies on (benchmarks/overhead.py,
benchmarks/report.py): they run, write the JSON schema, and the report checks the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import overhead
        import report

        yield overhead, report
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow  # times every audit workload: ~50 s of CPU
def test_overhead_audit_and_report(tmp_path: Path, bench_modules) -> None:
    overhead, report = bench_modules
    out = tmp_path / "o.json"
    assert overhead.main(["--quick", "--device", "cpu", "--only", "audit", "--only", "expm", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "quick", "date", "rows"} <= set(data)
    ex = [r for r in data["rows"] if r["group"] == "expm"]
    assert {r["config"] for r in ex} == {"torch.matrix_exp", "orthofx.expm"}
    assert all(r["err"] < 1e-5 and r["orth"] < 1e-4 for r in ex), ex
    rows = {(r["workload"], r["treatment"]): r for r in data["rows"] if r["group"] == "audit"}
    for wl in ("dbn", "gcp"):
        for t in ("nog", "olr", "nog+olr", "ow", "nog+ow+olr", "ow(expm)", "nog+ow+olr(expm)"):
            assert rows[(wl, t)]["extra_sync_ops"] == 0, rows[(wl, t)]
            assert rows[(wl, t)]["extra_kernel_ops"] > 0
        assert rows[(wl, "nog(svd)")]["extra_sync_ops"] == 1
    text = report.render(data)
    assert "Per-step op audit" in text and "OW exponential" in text and "Targets of issue 6" in text


def test_report_marks_gpu_targets(bench_modules) -> None:
    _, report = bench_modules

    def step(t: str, pct: float) -> dict:
        return {"group": "step", "workload": "dbn", "treatment": t, "plain_ms": 29.0, "step_ms": 29.0,
                "ratio": 1 + pct / 100, "overhead_pct": pct}

    head = [
        {"group": "gcp_head", "config": "ns", "time_ms": 4.0, "fwd_err": 0.18, "grad_err": 0.2},
        {"group": "gcp_head", "config": "gram-auto", "time_ms": 6.0, "fwd_err": 3e-6, "grad_err": 1e-5},
        {"group": "gcp_head", "config": "dense-auto", "time_ms": 16.0, "fwd_err": 5e-6, "grad_err": 1e-3},
    ]
    good = {"device": "NVIDIA H200", "torch": "x", "rows": [step("svd", 0.0), step("nog+olr", 0.8),
                                                            step("nog+ow+olr", 2.5)] + head}
    text = report.render(good)
    assert text.count("**met**") == 3 and "not met" not in text
    assert "`gram-auto` 1.50×" in text
    bad = {"device": "NVIDIA H200", "torch": "x", "rows": [step("svd", 0.0), step("nog+olr", 1.5),
                                                           step("nog+ow+olr", 2.0)] + head[:1]}
    text = report.render(bad)
    assert "+1.5 % → **not met**" in text and "n/a (no exact row measured)" in text


def test_analyze_bench_quick(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import analyze_bench
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "a.json"
    assert analyze_bench.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] and data["recorded"]["target_ratio"] == 3.0
    rec = {r["model"]: r for r in data["recorded"]["rows"]}
    assert set(rec) == set(analyze_bench.QUICK_RECORDED)
    for name, r in rec.items():
        assert r["analyze_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["ratio"] > 0, r
        assert set(r["producers"]) == set(analyze_bench.CASES[name].producers), r
    sym = data["symbolic"]["rows"]
    assert [r["model"] for r in sym] == list(analyze_bench.QUICK)
    assert sym[0]["producers"] == ["avgpool.reduce"] and sym[0]["ratio"] > 0
