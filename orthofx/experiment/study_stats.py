"""The statistics of ``orthofx study``: the final κ of a run (:func:`final_kappa`) and the paired
comparison of every row with SVD (:func:`paired_comparison`, :func:`analyze`).

Statistics (:func:`analyze`, a pure function of the saved runs): per row, test error mean ± SD
over its finished seeds; against SVD, over the seeds where both finished, the paired differences
d_k = row_k − SVD_k: mean d̄, SD s_d, n, 95 % CI d̄ ± t_{0.975,n−1}·s_d/√n (Student t) and the
minimum detectable effect MDE = (t_{0.975,n−1} + t_{0.80,n−1})·s_d/√n (α = 0.05 two-sided, 80 %
power, from the observed s_d). Verdict: "better/worse than SVD" only when the CI excludes 0;
otherwise "no difference detected (effects below ±MDE cannot be excluded)"; "too few seeds"
below 3 pairs. The same for the final κ_range as paired differences of log10 κ.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from orthofx.experiment.catalog import KAPPA_FIELDS
from orthofx.experiment.study_plan import BASELINE, CONTRASTS, STUDY_ROWS

__all__ = ["final_kappa", "t_quantile", "paired_p_value", "verdict", "paired_comparison", "analyze"]


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def final_kappa(klog: Mapping[str, Mapping[str, list]], tail: float = 0.1) -> dict[str, float]:
    """Final κ per convention: the median over the records of the last ``tail`` of the steps (all
    meta-layers); ``kappa_range`` over those at the smallest numerical rank among them (a rounding
    eigenvalue crossing the rank tolerance only adds to the rank, see the demo's ``_run_kappa``)."""
    out: dict[str, float] = {}
    for key in KAPPA_FIELDS:
        vals: list[float] = []
        for col in klog.values():
            steps = col["step"]
            if not steps:
                continue
            lo = max(steps) - tail * max(steps)
            idx = [i for i, s in enumerate(steps) if s >= lo]
            if key == "kappa_range":
                ranks = [_num(col["rank"][i]) for i in idx if math.isfinite(_num(col["rank"][i]))]
                if ranks:
                    idx = [i for i in idx if _num(col["rank"][i]) == min(ranks)]
            vals += [_num(col[key][i]) for i in idx if not math.isnan(_num(col[key][i]))]
        out[key] = statistics.median(vals) if vals else math.nan
    return out



# ---------------------------------------------------------------------------- statistics
def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (closed forms, Abramowitz & Stegun 26.7.3–4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        acc, term = 0.0, 1.0
        if df > 1:
            acc = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                acc += term
        return 2 / math.pi * (theta + (s * math.cos(theta) * acc if df > 1 else 0.0))
    acc, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        acc += term
    return s * acc


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer ``df`` ≥ 1 (bisection on the exact CDF to
    ~1e-12; no scipy needed)."""
    if not 0 < p < 1 or int(df) != df or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and integer df >= 1, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)  # P(|T| <= q)
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, int(df)) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_abs_cdf(mid, int(df)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    q = (lo + hi) / 2
    return q if p > 0.5 else -q


def verdict(n: int, ci_low: float, ci_high: float, mde: float, *, better: str = "better than SVD",
            worse: str = "worse than SVD", digits: int = 2) -> str:
    """Wording for a paired difference (row − SVD, lower is better): ``better``/``worse`` only
    when the 95 % CI excludes 0; "too few seeds" below 3 pairs; "equal in every pair" when every
    difference is 0; else no difference detected."""
    if n < 3:
        return f"too few seeds ({n} pair{'s' if n != 1 else ''} < 3)"
    if ci_low == ci_high == 0.0:
        return "equal in every pair (to the precision logged)"
    if ci_high < 0:
        return better
    if ci_low > 0:
        return worse
    return f"no difference detected (effects below ±{mde:.{digits}f} cannot be excluded)"


def paired_p_value(diffs: Sequence[float]) -> float:
    """Two-sided paired t-test p-value of mean(d) = 0: P(|T_{n−1}| ≥ |d̄|·√n/sd). NaN below 2
    pairs; with sd = 0, 0.0 if d̄ ≠ 0 else 1.0."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        return 0.0 if mean != 0.0 else 1.0
    return 1.0 - _t_abs_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1)


def paired_comparison(row: Mapping[int, float], base: Mapping[int, float], **wording: Any) -> dict[str, Any]:
    """Paired differences d_k = row[k] − base[k] over the seeds k where both are finite: n, mean,
    sd (n − 1), 95 % CI mean ± t_{0.975,n−1}·sd/√n, MDE = (t_{0.975,n−1} + t_{0.80,n−1})·sd/√n and
    the :func:`verdict` (``wording`` goes to it)."""
    seeds = sorted(k for k in row if k in base and math.isfinite(_num(row[k])) and math.isfinite(_num(base[k])))
    d = [float(row[k]) - float(base[k]) for k in seeds]
    n = len(d)
    out: dict[str, Any] = {"n": n, "seeds": seeds, "diffs": d, "mean": math.nan, "sd": math.nan,
                           "ci_low": math.nan, "ci_high": math.nan, "mde": math.nan}
    if n >= 1:
        out["mean"] = statistics.fmean(d)
    if n >= 2:
        sd = statistics.stdev(d)
        se = sd / math.sqrt(n)
        t975, t80 = t_quantile(0.975, n - 1), t_quantile(0.80, n - 1)
        out.update(sd=sd, ci_low=out["mean"] - t975 * se, ci_high=out["mean"] + t975 * se, mde=(t975 + t80) * se)
    out["verdict"] = verdict(n, out["ci_low"], out["ci_high"], out["mde"], **wording)
    return out


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def _log10(x: Any) -> float:
    v = _num(x)
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def analyze(runs: Sequence[Mapping[str, Any]], baseline: str = BASELINE,
            contrasts_of: Sequence[tuple[str, str, str]] = CONTRASTS) -> dict[str, Any]:
    """Per experiment and row: test error mean ± SD over the finished seeds and the paired
    comparison with ``baseline`` (:func:`paired_comparison`), the same for log10 of the final
    κ_range (lower = better conditioned), failures with their first error line, non-finite steps,
    solver exceptions, and whether the paired seeds shared the initial weights; and per
    experiment the planned contrasts ``contrasts_of`` (row, reference, question) whose two rows
    have finished runs, each a paired comparison of the row with its reference. Pure."""
    order = {r.label: i for i, r in enumerate(STUDY_ROWS)}
    result: dict[str, Any] = {}
    for exp in sorted({r["experiment"] for r in runs}):
        rs = [r for r in runs if r["experiment"] == exp]
        ok = [r for r in rs if r.get("status") == "ok"]
        err = lambda label: {int(r["seed"]): _num(r.get("final_test_error")) for r in ok if r["label"] == label}  # noqa: E731
        kap = lambda label: {int(r["seed"]): _log10((r.get("final_kappa") or {}).get("kappa_range")) for r in ok if r["label"] == label}  # noqa: E731
        digest = {(r["label"], int(r["seed"])): r.get("init_digest") for r in ok}
        base_err, base_kap = err(baseline), kap(baseline)
        rows = []
        for label in sorted({r["label"] for r in rs}, key=lambda s: (order.get(s, len(order)), s)):
            mine = [r for r in rs if r["label"] == label]
            e = err(label)
            m, sd = _mean_sd(list(e.values()))
            k = kap(label)
            km, ksd = _mean_sd(list(k.values()))
            failed = [r for r in mine if r.get("status") != "ok"]
            entry: dict[str, Any] = {
                "label": label, "seeds_ok": sorted(e), "seeds_failed": sorted(int(r["seed"]) for r in failed),
                "test_error_mean": m, "test_error_sd": sd, "test_errors": e,
                "log10_kappa_range_mean": km, "log10_kappa_range_sd": ksd,
                "nonfinite_steps": sum(int(r.get("nonfinite_steps") or 0) for r in mine if r.get("status") == "ok"),
                "solver_exceptions": sum(int(r.get("solver_exceptions") or 0) for r in mine if r.get("status") == "ok"),
                "steps": sum(int(r.get("steps") or 0) for r in mine if r.get("status") == "ok"),
                "errors": sorted({str(r.get("error") or "").splitlines()[0] if r.get("error") else "unknown" for r in failed}),
            }
            if label != baseline:
                entry["vs_baseline"] = paired_comparison(e, base_err)
                entry["kappa_vs_baseline"] = paired_comparison(
                    k, base_kap, better="better conditioned than SVD", worse="worse conditioned than SVD")
                pairs = entry["vs_baseline"]["seeds"]
                entry["same_init_pairs"] = sum(
                    1 for s in pairs if digest.get((label, s)) and digest.get((label, s)) == digest.get((baseline, s)))
            rows.append(entry)
        labels = {r["label"] for r in ok}
        contrasts = [
            {"row": row, "reference": ref, "question": q,
             "error": paired_comparison(err(row), err(ref), better=f"better than {ref}", worse=f"worse than {ref}"),
             "kappa": paired_comparison(kap(row), kap(ref), better=f"better conditioned than {ref}",
                                        worse=f"worse conditioned than {ref}")}
            for row, ref, q in contrasts_of
            if row in labels and ref in labels
        ]
        result[exp] = {"rows": rows, "contrasts": contrasts, "runs_ok": len(ok), "runs_failed": len(rs) - len(ok)}
    return result
