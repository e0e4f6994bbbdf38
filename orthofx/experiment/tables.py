"""The demo's tables: runs aggregated into one row per treatment (test error mean ± std over
seeds, geometric-mean κ per convention, final ‖W‖_F and σ_max/σ_min(W), failures, step-time
ratio; :func:`_aggregate`) and their markdown (:func:`format_table`)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from orthofx.experiment.catalog import KAPPA_FIELDS, DemoRow

__all__ = ["format_table"]


# ---------------------------------------------------------------------------- formatting
def _mean_std(xs: Sequence[float | None]) -> tuple[float, float]:
    ys = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not ys:
        return math.nan, math.nan
    return statistics.fmean(ys), (statistics.stdev(ys) if len(ys) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _geo(xs: Sequence[float | None]) -> float:
    """Geometric mean of the positive finite values; +inf if any is +inf; NaN if none."""
    vals = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if any(math.isinf(v) for v in vals):
        return math.inf
    vals = [v for v in vals if v > 0]
    return 10 ** statistics.fmean(math.log10(v) for v in vals) if vals else math.nan


def _fmt_sci(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}" if (x >= 1e4 or x < 1e-2) else f"{x:.3g}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of aggregated rows (see :func:`demo`)."""
    cols = [
        ("row", "label"), ("test error %", "error"), ("κ(Σ+εI) median", "kappa_fmt"),
        ("κ range median", "kappa_range_fmt"), ("rank r", "rank_fmt"), ("κ paper median", "kappa_paper_fmt"),
        ("‖W‖_F final", "weight_norm_fmt"), ("σmax/σmin(W) final", "weight_cond_fmt"),
        ("solver failures", "solver_failures"), ("non-finite steps", "nonfinite_steps"),
        ("step time vs SVD", "time_ratio_fmt"),
    ]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "n/a")) for _, k in cols) + " |")
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def _run_kappa(res: Mapping[str, Any], key: str) -> float:
    """Median over the run's κ records of field ``key`` (NaN when the field is absent).

    ``kappa_range`` uses only the records at the run's smallest numerical rank: a
    rounding-level eigenvalue of the null space that crosses the rank tolerance (rank 26 or 27
    of a rank-25 Σ, measured on the DBN stem on up to half of the steps) only ever adds to
    the rank, and gives κ ≈ 1e13 on those steps."""
    recs = _meta_records(res)
    if key == "kappa_range":
        ranks = [r.get("rank") for r in recs if r.get("rank") is not None and r.get("rank") == r.get("rank")]
        if ranks:
            low = min(ranks)
            recs = [r for r in recs if r.get("rank") == low]
    vals = [float(r[key]) for r in recs if r.get(key) is not None and r.get(key) != ""]
    vals = [v for v in vals if not math.isnan(v)]
    return _median(vals)


def _meta_records(res: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The run's κ records (the monitor's ``kind == "meta"``; older records have no kind)."""
    return [r for r in res.get("kappa_records", []) if r.get("kind", "meta") in ("meta", None)]


def _weight_records(res: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The Pre-SVD weight records: the monitor's ``kind == "producer"`` records when it writes
    them, else the experiment's own :class:`~orthofx.experiment.session.WeightTracker`."""
    recs = [r for r in res.get("kappa_records", []) if r.get("kind") == "producer"]
    return recs or list(res.get("weight_records") or [])


def _final_weight(res: Mapping[str, Any], key: str) -> float:
    recs = sorted(_weight_records(res), key=lambda r: int(r["step"]))
    return float(recs[-1][key]) if recs and recs[-1].get(key) is not None else math.nan


def _aggregate(rows: Sequence[DemoRow], runs: Sequence[Mapping[str, Any]], timing: Mapping[str, Any]) -> list[dict]:
    out = []
    for row in rows:
        rs = [r for r in runs if r["label"] == row.label]
        err_m, err_s = _mean_std([r["final_test_error"] for r in rs])
        kap = {k: _geo([_run_kappa(r, k) for r in rs]) for k in KAPPA_FIELDS}
        ranks = [_run_kappa(r, "rank") for r in rs]
        wn_m, wn_s = _mean_std([_final_weight(r, "weight_norm") for r in rs])
        wc_m, wc_s = _mean_std([_final_weight(r, "weight_cond") for r in rs])
        failures = sum(int(next(iter(r["kappa"].values()), {}).get("solver_failures", 0) or 0) for r in rs)
        failures += sum(int(r.get("solver_exceptions", 0)) for r in rs)
        nonfinite = sum(int(r.get("nonfinite_steps", 0)) for r in rs)
        steps = sum(int(r.get("steps", 0)) for r in rs)
        t = timing.get(row.label, {})
        ratio = t.get("ratio_median", math.nan)
        out.append({
            "label": row.label, "treatment": row.treatment, "backend": row.backend, "ortho": dict(row.ortho),
            "transform": row.transform, "seeds": len(rs),
            "test_error_mean": err_m, "test_error_std": err_s, "test_errors": [r["final_test_error"] for r in rs],
            "kappa_geomean": kap, "rank_median": _median(ranks),
            "weight_norm_mean": wn_m, "weight_norm_std": wn_s, "weight_cond_mean": wc_m, "weight_cond_std": wc_s,
            "solver_failures": failures, "nonfinite_steps": f"{nonfinite}/{steps}" if steps else "0",
            "time_ratio_median": ratio, "time_ratios": t.get("ratios", []),
            "error": _fmt(err_m, err_s, len(rs)),
            "kappa_fmt": _fmt_sci(kap["kappa"]), "kappa_range_fmt": _fmt_sci(kap["kappa_range"]),
            "kappa_paper_fmt": _fmt_sci(kap["kappa_paper"]),
            "rank_fmt": "n/a" if math.isnan(_median(ranks)) else f"{_median(ranks):.0f}",
            "weight_norm_fmt": _fmt(wn_m, wn_s, len(rs)), "weight_cond_fmt": _fmt(wc_m, wc_s, len(rs)),
            "time_ratio_fmt": "n/a" if math.isnan(ratio) else (
                f"{ratio:.2f}×" if len(t.get("ratios", [])) < 2 else
                f"{ratio:.2f}× ({min(t['ratios']):.2f}–{max(t['ratios']):.2f})"),
        })
    return out
