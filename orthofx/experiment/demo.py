"""``orthofx demo``: the paper's two experiments at CPU scale on real Fashion-MNIST.

* ``dbn`` — decorrelated BN (paper Sec. 6.1, Tables 2–4, Figs. 2–4): a small ResNet whose
  5×5 stem (1 → 64 channels, 25-dimensional patches: Σ of rank ≤ 25 of 64, the paper's 27 of
  64) is followed by ZCA whitening (:class:`orthofx.nn.DecorrelatedBatchNorm`, ε = 1e-2).
* ``gcp`` — global covariance pooling (paper Sec. 6.2, Table 5, Fig. 5): a small ResNet down
  to 7×7, 1×1 reduction to 64 channels → BN → ReLU → :class:`orthofx.nn.CovariancePooling`
  (49 positions, Σ of rank ≤ 48 of 64), plus a raw ``torch.linalg.eigh`` head as the row that
  shows what the stable meta-layer removes.
* ``dbn-small`` — the earlier DBN setting (3×3 stem, 1 → 16 channels, rank ≤ 9 of 16).

Every row is trained as a user would: build the model, ``orthofx.transform`` with a preset,
SGD, ``orthofx.attach``. Per row: test error, κ per convention (the monitor's fields), solver
failures, non-finite steps, ‖W‖_F and σ_max/σ_min(W) of the Pre-SVD layer. Step time ratios
come from one interleaved timing loop (rows round-robin, same batch, same moment), never from
runs minutes apart. Writes ``results.json``, ``results.md`` and PNGs into ``--out``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from orthofx.errors import ConfigError
from orthofx.experiment.catalog import EXPERIMENT_CHOICES, EXPERIMENTS, KAPPA_FIELDS, DemoRow, Experiment
from orthofx.experiment.tables import (  # noqa: F401  (_run_kappa: re-exported)
    _aggregate, _meta_records, _run_kappa, _weight_records, format_table,
)
from orthofx.experiment.timing import interleaved_step_times
from orthofx.experiment.train import ExperimentConfig, _jsonable, run

__all__ = [
    "DemoRow", "Experiment", "EXPERIMENTS", "EXPERIMENT_CHOICES", "demo", "format_table",
    "KAPPA_FIELDS", "collect",
]


# ---------------------------------------------------------------------------- plots
def _plot_lines(ax: Any, series: Mapping[str, list[tuple[int, float]]], log10: bool) -> None:
    """One line per series, styled by the monitor's :func:`~orthofx.monitor.plotting.line_styles`
    (lines that share a colour differ in line style and marker)."""
    from orthofx.monitor.plotting import line_styles

    for style, (label, pts) in zip(line_styles(), series.items()):
        pts = sorted(pts)
        ys = [(math.log10(v) if v > 0 and math.isfinite(v) else math.nan) if log10 else v for _, v in pts]
        ax.plot([p[0] for p in pts], ys, markevery=max(1, len(pts) // 6), markersize=4, linewidth=1.2,
                label=label, **style)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _figure(w: float, h: float, nplots: int) -> tuple[Any, list[Any]]:
    from orthofx._optional import require

    mfig = require("matplotlib.figure", "demo", purpose="the demo's plots")  # no pyplot: the backend is left alone
    fig = mfig.Figure(figsize=(w, h))
    axes = fig.subplots(1, nplots, squeeze=False)[0]
    return fig, list(axes)


def plot_kappa(runs: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """log10 κ against step for every convention present in the records (seed-0 runs)."""
    present = [k for k in KAPPA_FIELDS if any(r.get(k) is not None for run in runs for r in _meta_records(run))]
    fig, axes = _figure(5.2 * len(present), 4.2, len(present))
    for ax, key in zip(axes, present):
        series = {}
        for run in runs:
            recs = _meta_records(run)
            if key == "kappa_range":  # as in the table: the records at the run's smallest rank
                ranks = [r["rank"] for r in recs if r.get("rank") is not None and r["rank"] == r["rank"]]
                recs = [r for r in recs if not ranks or r.get("rank") == min(ranks)]
            pts = [(int(r["step"]), float(r[key])) for r in recs if r.get(key) is not None]
            if pts:
                series[run["label"]] = pts
        _plot_lines(ax, series, log10=True)
        ax.set_title(KAPPA_FIELDS[key], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"log10 {key}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_weights(runs: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """‖W‖_F and σ_max/σ_min(W) of the Pre-SVD layer against step (seed-0 runs)."""
    fig, axes = _figure(10.5, 4.0, 2)
    for ax, key, name in zip(axes, ("weight_norm", "weight_cond"), ("‖W‖_F", "σ_max/σ_min(W)")):
        series = {}
        for run in runs:
            pts = [(int(r["step"]), float(r[key])) for r in _weight_records(run) if r.get(key) is not None]
            if pts:
                series[run["label"]] = pts
        _plot_lines(ax, series, log10=False)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_error(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Bar chart of test error (mean ± std over seeds) per row."""
    fig, (ax,) = _figure(7.5, 3.6, 1)
    means = [r["test_error_mean"] for r in rows]
    stds = [r["test_error_std"] if r["seeds"] > 1 else 0.0 for r in rows]
    ax.bar(range(len(rows)), [m if math.isfinite(m) else 0.0 for m in means], yerr=stds, color="#4C72B0", capsize=3)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=25, fontsize=7, ha="right")
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(max(0.0, lo - 2 * (hi - lo + 0.5)), hi + (hi - lo + 0.5))
    ax.set_ylabel("test error %")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------- demo
def _config(exp: Experiment, row: DemoRow, settings: Mapping[str, Any], seed: int, out: Path, **common: Any) -> ExperimentConfig:
    return ExperimentConfig(
        dataset="fashion-mnist", model=exp.model, model_kwargs={**dict(exp.model_kwargs), **dict(row.model_kwargs)},
        treatment=row.treatment, ortho=dict(row.ortho), transform=row.transform, backend=row.backend,
        guard_nonfinite=True, seed=seed, resume=False, name=row.label,
        out=str(out / "runs" / exp.key / f"{_slug(row.label)}-seed{seed}"), **{**common, **settings},
    )


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _run_quiet(cfg: ExperimentConfig) -> dict[str, Any]:
    """One training run without its log lines (a :class:`~orthofx.experiment.jobs.Task`)."""
    return run(cfg, log=lambda s: None)


def demo(
    out: str | Path = "out/demo",
    *,
    quick: bool = False,
    seeds: int = 1,
    first_seed: int = 0,
    experiment: str = "both",
    rows: Sequence[str] | None = None,
    extended: bool = False,
    data_dir: str | None = None,
    download: bool = False,
    device: str = "auto",
    progress: bool = True,
    timing: bool | None = None,
    threads: int | None = 1,
    jobs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every row of the chosen experiment(s) for ``seeds`` seeds; print and write the
    tables, JSON and plots. Seeds are ``first_seed … first_seed + seeds − 1`` (seeds can be
    split over processes writing into one ``out`` and combined with :func:`collect`).
    ``timing`` (default: on for full runs, off for ``quick``) adds the interleaved step-time
    column. ``threads``: torch intra-op threads per run (default 1: measured on 2 idle cores,
    ``--quick`` took 68 s with torch's 2 threads and 16 s with 1 — the many small batched
    decompositions thrash with 2; None keeps torch's setting). ``jobs``: runs at once, each in
    its own spawned worker process (default: one per usable CPU core on the CPU, 1 on CUDA;
    1 runs everything in this process). Every run is seeded and deterministic, so ``jobs``
    changes the wall time, not the results. ``overrides`` replace training settings
    (epochs, ...). ``rows``: run only the rows with these labels (extended ones included).
    ``extended``: also the rows outside the 12-minute budget (DBN: SN, OL, NOG+SN, NOG+OL,
    NOG+OLR, OW+OLR — the rest of the paper's Tables 1–3).

    Returns ``{"experiments": {key: {"rows": [...aggregated...], "runs": [...]}}, "files": {...}}``.
    """
    from orthofx.config import check_int
    from orthofx.experiment.jobs import default_jobs

    seeds = check_int(seeds, "seeds", min=1)  # OptionError (a ConfigError) for 0, -1, 2.5, "2"
    first_seed = check_int(first_seed, "first_seed", min=0)
    threads = check_int(threads, "threads", min=1, optional=True)
    jobs = check_int(jobs, "jobs", min=1, optional=True)
    if jobs is None:
        jobs = default_jobs(device)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _demo(out, quick, seeds, first_seed, experiment, rows, bool(extended), data_dir, download, device,
                     progress, timing, overrides, log, jobs, threads)
    finally:
        torch.set_num_threads(saved_threads)


def _demo(out: Any, quick: bool, seeds: int, first_seed: int, experiment: str, rows: Any, extended: bool, data_dir: Any,
          download: bool, device: str, progress: bool, timing: Any, overrides: Any, log: Any, jobs: int,
          threads: int | None) -> dict[str, Any]:
    from orthofx.experiment.jobs import Task, run_tasks

    if experiment not in EXPERIMENT_CHOICES:
        raise ConfigError(f"experiment must be one of {EXPERIMENT_CHOICES}, got {experiment!r}")
    keys = ["dbn", "gcp"] if experiment == "both" else [experiment]
    timing = (not quick) if timing is None else bool(timing)
    out = Path(out)
    notes: list[str] = []
    chosen: dict[str, tuple[Experiment, dict[str, Any], list[DemoRow]]] = {}
    for key in keys:  # every check before any work
        exp = EXPERIMENTS[key]
        settings = dict(exp.quick if quick else exp.full)
        settings.update(overrides or {})
        exp_rows = list(exp.rows)
        if rows is not None:
            known = [r.label for e in keys for r in EXPERIMENTS[e].rows]
            unknown = sorted(set(rows) - set(known))
            if unknown:
                raise ConfigError(f"unknown demo rows {unknown}; rows of {keys}: {known}")
            exp_rows = [r for r in exp_rows if r.label in rows]
        elif not extended:
            exp_rows = [r for r in exp_rows if not r.extended]
        chosen[key] = (exp, settings, exp_rows)
    from orthofx._optional import require

    require("matplotlib.figure", "demo", purpose="the demo's plots")  # before training, not after it
    out.mkdir(parents=True, exist_ok=True)
    common = dict(data_dir=data_dir, download=download, device=device, progress=progress and jobs == 1)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"quick": quick, "smoke_run": None, "seeds": seeds, "extended": extended, "jobs": jobs, "threads": threads, "experiments": {},
                              "files": {}, "notes": notes, "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    tasks: list[Task] = []
    for key, (exp, settings, rows_here) in chosen.items():
        if timing:
            cfgs = [_config(exp, r, {**settings, "progress": False}, 0, out, **common) for r in rows_here]
            tasks.append(Task(("timing", key), interleaved_step_times, (cfgs, [r.label for r in rows_here]),
                              cost=0.1 * exp.cost * sum(r.cost for r in rows_here)))
        for seed in range(first_seed, first_seed + seeds):
            for row in rows_here:
                tasks.append(Task(("run", key, row.label, seed), _run_quiet,
                                  (_config(exp, row, settings, seed, out, **common),), cost=exp.cost * row.cost))
    log(f"{len(tasks)} tasks ({', '.join(chosen)}) on {min(jobs, len(tasks))} worker process(es), "
        f"{threads or torch.get_num_threads()} torch thread(s) each")
    done = [0]

    def on_done(task: Task, res: Any, secs: float) -> None:
        done[0] += 1
        kind, key = task.key[0], task.key[1]
        if kind == "timing":
            (out / f"timing_{key}_seed{first_seed}.json").write_text(json.dumps(_jsonable(res), indent=1))
            log(f"  [{done[0]}/{len(tasks)}] {key} step time vs SVD (interleaved): " + ", ".join(
                f"{k} {v['ratio_median']:.2f}×" for k, v in res.items()))
            return
        label, seed = task.key[2], task.key[3]
        k = next(iter(res["kappa"].values()), {})
        log(f"  [{done[0]}/{len(tasks)}] {key} {label:<16} seed {seed}: test error {res['final_test_error']:.2f}%  "
            f"κ median {k.get('kappa_median', math.nan):.3g}  non-finite steps {res['nonfinite_steps']}"
            f"/{res['steps']}  solver exceptions {res['solver_exceptions']}  ({secs:.0f} s)")

    done_tasks = run_tasks(tasks, jobs=jobs, threads=threads, on_done=on_done)

    md = []
    for key, (exp, settings, rows_here) in chosen.items():
        times: dict[str, Any] = done_tasks.get(("timing", key), {})
        runs: list[dict[str, Any]] = []
        for seed in range(first_seed, first_seed + seeds):
            for row in rows_here:
                res = done_tasks[("run", key, row.label, seed)]
                res["label"], res["seed"] = row.label, seed
                runs.append(res)
        agg = _aggregate(rows_here, runs, times)
        table = format_table(agg)
        log("")
        log(f"== {exp.title}")
        log(table)
        seed0 = [r for r in runs if r["seed"] == first_seed]
        files = {
            "kappa_png": str(plot_kappa(seed0, out / f"{key}_kappa.png", exp.title)),
            "weights_png": str(plot_weights(seed0, out / f"{key}_weights.png", exp.title)),
            "error_png": str(plot_error(agg, out / f"{key}_error.png", exp.title)),
        }
        result["experiments"][key] = {
            "title": exp.title, "model": exp.model, "model_kwargs": dict(exp.model_kwargs), "settings": settings,
            "timing": times, "rows": agg, "runs": runs, "files": files,
        }
        result["files"].update({f"{key}_{k}": v for k, v in files.items()})
        md += [f"## {exp.title}", "", table, ""]
    elapsed = time.perf_counter() - t_start
    result["elapsed_s"] = elapsed
    if quick:  # say so where the numbers are read, not only in the closing line
        steps = max((r["steps"] for e in result["experiments"].values() for r in e["runs"]), default=0)
        result["smoke_run"] = (f"orthofx demo --quick: {steps} optimizer step(s) per row, to check that every row "
                               "runs; these numbers are not results (run orthofx demo without --quick)")
        md = [f"**Smoke run — {result['smoke_run']}.**", ""] + md
    for n in notes:
        log(f"note: {n}")
    md += [f"({'quick' if quick else 'full'} run, {seeds} seed(s), {elapsed:.0f} s wall with {jobs} job(s), "
           f"{result['date']}; κ from float64 eigenvalues; test error after re-estimating normalisation statistics)"]
    md += [f"note: {n}" for n in notes]
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    result["files"]["json"] = str(out / "results.json")
    result["files"]["md"] = str(out / "results.md")
    log(f"\n({'quick' if quick else 'full'} run, {seeds} seed(s), {elapsed:.0f} s wall, {jobs} job(s))")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len([f for f in result['files'] if f.endswith('png')])} PNGs")
    return result


def collect(out: str | Path, experiments: Sequence[str] = ("dbn", "gcp")) -> dict[str, Any]:
    """Rebuild the tables, plots and ``results.json`` of ``out`` from the per-run results
    (``out/runs/<experiment>/<row>-seed<k>/results.json``) and interleaved timings
    (``out/timing_<experiment>_seed<k>.json``) that one or several :func:`demo` processes
    wrote there — also when some runs have not finished (their rows then have fewer seeds)."""
    out = Path(out)
    result: dict[str, Any] = {"experiments": {}, "files": {}, "notes": [], "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    md = []
    for key in experiments:
        exp = EXPERIMENTS[key]
        runs = []
        for p in sorted((out / "runs" / key).glob("*/results.json")):
            res = json.loads(p.read_text())
            res["label"], res["seed"] = res["run"], int(res["config"]["seed"])
            runs.append(res)
        if not runs:
            continue
        labels = {r["label"] for r in runs}
        rows = [r for r in exp.rows if r.label in labels]
        timing: dict[str, Any] = {}
        for tp in sorted(out.glob(f"timing_{key}_seed*.json")):
            for label, t in json.loads(tp.read_text()).items():
                e = timing.setdefault(label, {"ratios": []})
                e["ratios"] += [float(x) for x in t["ratios"]]
        for e in timing.values():
            e["ratio_median"] = statistics.median(e["ratios"]) if e["ratios"] else math.nan
        agg = _aggregate(rows, runs, timing)
        first = min(r["seed"] for r in runs)
        seed0 = [r for r in runs if r["seed"] == first]
        files = {
            "kappa_png": str(plot_kappa(seed0, out / f"{key}_kappa.png", exp.title)),
            "weights_png": str(plot_weights(seed0, out / f"{key}_weights.png", exp.title)),
            "error_png": str(plot_error(agg, out / f"{key}_error.png", exp.title)),
        }
        result["experiments"][key] = {"title": exp.title, "rows": agg, "runs": runs, "timing": timing,
                                      "settings": runs[0]["config"], "files": files}
        result["files"].update({f"{key}_{k}": v for k, v in files.items()})
        md += [f"## {exp.title}", "", format_table(agg), ""]
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    return result
