"""``results.md`` of ``orthofx study``: its settings, then per experiment one table of every row
against SVD and one of the planned contrasts between rows (:func:`format_results_md`)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from orthofx.experiment.catalog import EXPERIMENTS
from orthofx.experiment.study_stats import _num

__all__ = ["format_results_md"]


def _f(x: Any, d: int = 2, sign: bool = False) -> str:
    v = _num(x)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def format_results_md(analysis: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """results.md: the study's settings, then one table per experiment."""
    lines = []
    if settings.get("smoke"):
        lines += ["# SMOKE RUN (`orthofx study --quick`): a few steps on tiny data — NOT evidence", ""]
    lines += ["# orthofx study: paired-seed comparison with SVD", ""]
    for k in ("finished", "profile", "steps", "seeds", "experiments", "schedule", "optimizer", "models", "batch_size",
              "test_images", "log_every", "commit", "date", "machine", "jobs", "runs", "estimated_wall_s_total",
              "mean_run_wall_s", "elapsed_s"):
        if k in settings:
            lines.append(f"- {k}: {settings[k]}")
    lines += ["", "Δ = row − SVD per seed (paired); CI = 95 % Student t; MDE at α = 0.05 two-sided, 80 % power "
              "from the observed SD of Δ. κ: final κ_range (median of the last 10 % of steps), Δ in log10.", ""]
    for exp, a in analysis.items():
        title = EXPERIMENTS[exp].title if exp in EXPERIMENTS else exp
        lines += [f"## {exp}: {title}", "",
                  "| row | seeds ok (failed) | test error % | Δ error [95 % CI] | n | MDE | verdict (error) "
                  "| log10 κ_range | Δ log10 κ [95 % CI] | verdict (κ) | non-finite steps | solver exc. |",
                  "|" + "---|" * 12]
        notes = []
        for r in a["rows"]:
            vs, kv = r.get("vs_baseline"), r.get("kappa_vs_baseline")
            err = f"{_f(r['test_error_mean'])} ± {_f(r['test_error_sd'])}"
            if vs:
                d, dk = _ci(vs), _ci(kv)
                n, mde, v, vk = vs["n"], _f(vs["mde"]), vs["verdict"], kv["verdict"]
            else:
                d = dk = "—"
                n, mde, v, vk = len(r["seeds_ok"]), "—", "baseline", "baseline"
            lines.append(f"| {r['label']} | {len(r['seeds_ok'])} ({len(r['seeds_failed'])}) | {err} | {d} | {n} | {mde} "
                         f"| {v} | {_f(r['log10_kappa_range_mean'])} ± {_f(r['log10_kappa_range_sd'])} | {dk} | {vk} "
                         f"| {r['nonfinite_steps']}/{r['steps']} | {r['solver_exceptions']} |")
            for e in r["errors"]:
                notes.append(f"- {r['label']}: failed on seeds {r['seeds_failed']}: {e}")
            if vs and vs["n"] and r.get("same_init_pairs", vs["n"]) < vs["n"]:
                notes.append(f"- {r['label']}: {vs['n'] - r['same_init_pairs']} of {vs['n']} pairs started from "
                             "different initial weights than SVD (different architecture)")
        lines += [""] + (["Notes:", ""] + notes + [""] if notes else [])
        lines += _contrast_lines(a.get("contrasts", []))
    return "\n".join(lines) + "\n"


def _ci(c: Mapping[str, Any]) -> str:
    return f"{_f(c['mean'], sign=True)} [{_f(c['ci_low'], sign=True)}, {_f(c['ci_high'], sign=True)}]"


def _contrast_lines(contrasts: Any) -> list[str]:
    """The planned contrasts of one experiment: row − reference per seed, error and log10 κ."""
    if not contrasts:
        return []
    lines = ["Planned contrasts (Δ = row − reference per seed, paired):", "",
             "| row − reference | question | n | Δ error [95 % CI] | MDE | verdict (error) "
             "| Δ log10 κ [95 % CI] | verdict (κ) |", "|" + "---|" * 8]
    for c in contrasts:
        e, k = c["error"], c["kappa"]
        lines.append(f"| {c['row']} − {c['reference']} | {c['question']} | {e['n']} | {_ci(e)} | {_f(e['mde'])} "
                     f"| {e['verdict']} | {_ci(k)} | {k['verdict']} |")
    return lines + [""]
