"""Render the study tables of docs/results.md from docs/results/study/results.json.

    python docs/study_tables.py            # rewrite the tables between the markers in docs/results.md
    python docs/study_tables.py --print    # print them instead

The per-row statistics (paired Δ, 95 % CI, MDE, verdicts) are the ones ``orthofx study --report``
computed; this script adds one thing the per-row verdicts cannot see: the multiplicity of the
family. 15 rows × 2 experiments = 30 paired t-tests per metric; with α = 0.05 about one "detected"
difference is expected by chance alone. The Holm–Bonferroni step-down adjustment (family-wise
error ≤ 0.05 over the 30 tests of a metric) gives the column ``Holm p``; a verdict that holds
only before the adjustment is marked "(not after Holm)".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from orthofx.experiment.study_stats import paired_p_value

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "study" / "results.json"
PAGE = ROOT / "results.md"
BEGIN = "<!-- study-tables:begin (python docs/study_tables.py) -->"
END = "<!-- study-tables:end -->"
TITLES = {
    "dbn": "DBN (ZCA whitening after the 5×5 stride-2 1→64 stem)",
    "gcp": "GCP (covariance pooling of 64 channels at 7×7)",
}


def holm(pvalues: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Holm–Bonferroni adjusted p-values: p_(i) · (m − i + 1), made monotone, capped at 1."""
    finite = sorted((p, key) for key, p in pvalues.items() if not math.isnan(p))
    m = len(finite)
    out: dict[tuple[str, str], float] = {key: math.nan for key in pvalues}
    running = 0.0
    for i, (p, key) in enumerate(finite):
        running = max(running, min(1.0, p * (m - i)))
        out[key] = running
    return out


def _ci(cmp: dict) -> str:
    return f"{cmp['mean']:+.2f} [{cmp['ci_low']:+.2f}, {cmp['ci_high']:+.2f}]"


def _verdict(cmp: dict, p_holm: float) -> str:
    v = cmp["verdict"]
    short = v.split(" (effects")[0]
    if short.startswith("equal in every pair"):
        return short
    if short.startswith("no difference"):
        return f"none detected (MDE {cmp['mde']:.2f})"
    if not math.isnan(p_holm) and p_holm >= 0.05:
        return f"{short} (not after Holm)"
    return f"**{short}**"


def render(results: dict) -> str:
    analysis = results["analysis"]
    p_err = {}
    p_kap = {}
    for exp, block in analysis.items():
        for row in block["rows"]:
            if "vs_baseline" in row:
                p_err[(exp, row["label"])] = paired_p_value(row["vs_baseline"]["diffs"])
            if "kappa_vs_baseline" in row:
                p_kap[(exp, row["label"])] = paired_p_value(row["kappa_vs_baseline"]["diffs"])
    h_err, h_kap = holm(p_err), holm(p_kap)
    out: list[str] = []
    for exp, block in analysis.items():
        out += [f"### {TITLES.get(exp, exp)}", ""]
        out.append(
            "| row | n | test error % | Δ error vs SVD [95 % CI] | Holm p | verdict (error) "
            "| log10 κ_range | Δ log10 κ [95 % CI] | Holm p | verdict (κ) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in block["rows"]:
            key = (exp, row["label"])
            err = f"{row['test_error_mean']:.2f} ± {row['test_error_sd']:.2f}"
            kap = f"{row['log10_kappa_range_mean']:.2f} ± {row['log10_kappa_range_sd']:.2f}"
            if "vs_baseline" not in row:
                out.append(
                    f"| {row['label']} | {len(row['seeds_ok'])} | {err} | — | — | baseline | {kap} | — | — | baseline |"
                )
                continue
            e, k = row["vs_baseline"], row["kappa_vs_baseline"]
            out.append(
                f"| {row['label']} | {e['n']} | {err} | {_ci(e)} | {h_err[key]:.3f} | {_verdict(e, h_err[key])} "
                f"| {kap} | {_ci(k)} | {h_kap[key]:.3f} | {_verdict(k, h_kap[key])} |"
            )
        out.append("")
    out += _contrast_tables(analysis)
    return "\n".join(out)


def _contrast_tables(analysis: dict) -> list[str]:
    """The planned contrasts between rows (``orthofx.experiment.study_plan.CONTRASTS``), with
    Holm over their own family (contrasts × experiments per metric)."""
    p_err, p_kap = {}, {}
    for exp, block in analysis.items():
        for c in block.get("contrasts", []):
            key = (exp, f"{c['row']} − {c['reference']}")
            p_err[key], p_kap[key] = paired_p_value(c["error"]["diffs"]), paired_p_value(c["kappa"]["diffs"])
    if not p_err:
        return []
    h_err, h_kap = holm(p_err), holm(p_kap)
    out = ["### Planned contrasts between rows", "",
           f"Δ = row − reference per seed (paired), the same statistics as above; Holm over the {len(p_err)} contrasts "
           "of a metric (its own family, separate from the comparisons with SVD).", ""]
    for exp, block in analysis.items():
        if not block.get("contrasts"):
            continue
        out += [f"**{exp.upper()}**", "",
                "| row − reference | question | n | Δ error [95 % CI] | Holm p | verdict (error) "
                "| Δ log10 κ [95 % CI] | Holm p | verdict (κ) |", "|---|---|---|---|---|---|---|---|---|"]
        for c in block["contrasts"]:
            key = (exp, f"{c['row']} − {c['reference']}")
            e, k = c["error"], c["kappa"]
            out.append(f"| {key[1]} | {c['question']} | {e['n']} | {_ci(e)} | {_p(h_err[key])} | {_verdict(e, h_err[key])} "
                       f"| {_ci(k)} | {_p(h_kap[key])} | {_verdict(k, h_kap[key])} |")
        out.append("")
    return out


def _p(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--print", action="store_true", help="print the tables instead of editing the page")
    args = ap.parse_args()
    tables = render(json.loads(RESULTS.read_text()))
    if args.print:
        print(tables)
        return
    page = PAGE.read_text()
    head, sep, rest = page.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"markers {BEGIN!r} … {END!r} not found in {PAGE}")
    PAGE.write_text(f"{head}{BEGIN}\n\n{tables}\n{END}{tail}")
    print(f"wrote the study tables into {PAGE}")


if __name__ == "__main__":
    main()
