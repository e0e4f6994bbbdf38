"""``orthofx study``: a paired-seed study of the paper's treatments, sized to resolve its effects.

The demo (192 steps, 1–3 seeds) cannot resolve the paper's 0.2–0.9-point effects: seed SDs are
0.3–0.7 points. The study runs every row of both experiments for ≥ 2000 SGD steps and ≥ 6 seeds
and compares each row with SVD as **paired per-seed differences**: seed k gives every row the
same initial weights (same architecture ⇒ same ``torch.manual_seed(k)`` draws before the
transform; each run records a digest of them) and the same training subset and data order.

The study's parts: :mod:`~orthofx.experiment.study_plan` (rows, schedules, profiles, the runs
and the hash that keys each), :mod:`~orthofx.experiment.study_run` (one run in a worker),
:mod:`~orthofx.experiment.study_stats` (paired comparisons with SVD) and
:mod:`~orthofx.experiment.study_report` (``results.md``); this module runs them (:func:`study`).

Runs are resumable: each finished (or failed) run is written at once, atomically, to
``out/<experiment>/<row-slug>/seed<k>.json`` with a hash of its full configuration; a rerun
skips runs whose file holds the same hash and status "ok", and reruns changed or failed ones.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from orthofx.errors import OptionError
from orthofx.experiment.study_plan import (  # noqa: F401  (re-exported: the study's public names)
    BASELINE, PROFILES, SCHEDULES, STUDY_ROWS, Profile, RunSpec, config_hash, needs_run, plan_study, row_slug,
)
from orthofx.experiment.study_report import format_results_md
from orthofx.experiment.study_run import StepLogger, execute_run, write_json_atomic  # noqa: F401
from orthofx.experiment.study_stats import analyze, final_kappa, paired_comparison, t_quantile, verdict  # noqa: F401

__all__ = [
    "STUDY_ROWS", "BASELINE", "row_slug", "Profile", "PROFILES", "SCHEDULES", "RunSpec", "plan_study", "config_hash",
    "needs_run", "write_json_atomic", "execute_run", "StepLogger", "t_quantile", "paired_comparison",
    "verdict", "analyze", "format_results_md", "study",
]


# ---------------------------------------------------------------------------- the study
def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        h = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (h + (" (+ uncommitted changes)" if dirty else "")) if h else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    from orthofx.experiment.jobs import usable_cores

    s = f"{platform.node()} {platform.machine()}, {usable_cores()} usable cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def _fmt_secs(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def study(
    out: str | Path | None = None,
    *,
    experiment: str = "both",
    rows: Sequence[str] | None = None,
    seeds: int | None = None,
    jobs: int | None = None,
    profile: str = "cpu",
    steps: int | None = None,
    quick: bool = False,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    progress: bool = True,
    report_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the study and write ``results.json`` and ``results.md`` into ``out``.
    ``report_only``: run nothing; write the two files from the runs already on disk (a study
    still in progress, or resumed elsewhere), stating how many of the planned runs they hold.

    ``experiment``: "both", "dbn" or "gcp"; ``rows``: labels or slugs of :data:`STUDY_ROWS`
    (default all); ``seeds``: seeds 0 … seeds − 1 (default: the profile's, 6; ``quick``: 2);
    ``jobs``: worker processes, one single-threaded run each (default: one per core on the CPU,
    1 on CUDA); ``profile``: "cpu" or "gpu" (:data:`PROFILES`); ``steps``: optimizer steps per
    run (default: the profile's); ``quick``: a smoke run ("quick" profile, ~20 steps, tiny data,
    marked as such in every output). Every option is checked before any work
    (:class:`OptionError` naming it). Returns ``{"settings", "analysis", "runs", "files"}``."""
    from orthofx.config import check_int
    from orthofx.experiment.jobs import Task, default_jobs, run_tasks

    if experiment not in ("both", "dbn", "gcp"):
        raise OptionError("experiment", experiment, "must be one of both, dbn, gcp")
    if profile not in ("cpu", "gpu") or not isinstance(profile, str):
        raise OptionError("profile", profile, "must be cpu or gpu")
    if rows is not None and (isinstance(rows, (str, bytes)) or not all(isinstance(r, str) for r in rows) or not rows):
        raise OptionError("rows", rows, "must be a non-empty list of row labels")
    prof = PROFILES["quick" if quick else profile]
    seeds = check_int(prof.seeds if seeds is None else seeds, "seeds", min=1)
    steps = check_int(prof.steps if steps is None else steps, "steps", min=1)
    jobs = check_int(jobs, "jobs", min=1, optional=True)
    if out is None:
        out = "out/study-quick" if quick else "out/study"
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise OptionError("out", out, "must be a directory path")
    keys = ["dbn", "gcp"] if experiment == "both" else [experiment]
    specs = plan_study(out, experiments=keys, rows=rows, seeds=seeds, profile=prof.name, steps=steps,
                       dataset=dataset, data_dir=data_dir)  # raises OptionError("rows") for an unknown row
    if jobs is None:
        jobs = default_jobs(prof.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    reasons = {s.path: needs_run(s) for s in specs}
    todo = [s for s in specs if reasons[s.path] is not None]
    counts: dict[str, int] = {}
    for s in todo:
        counts[str(reasons[s.path])] = counts.get(str(reasons[s.path]), 0) + 1
    est_total = sum(s.est_seconds for s in specs) / max(1, min(jobs, len(specs)))
    est_todo = sum(s.est_seconds for s in todo) / max(1, min(jobs, len(todo) or 1))
    mk = {k: dict(prof.model_kwargs[k]) for k in keys}
    settings: dict[str, Any] = {
        "smoke": prof.smoke, "profile": prof.name, "steps": steps, "seeds": list(range(seeds)),
        "experiments": keys, "rows": [r.label for r in STUDY_ROWS if any(s.row == r for s in specs)],
        "schedule": {k: f"{SCHEDULES[k][0]} chunks of ⌈{steps}/{SCHEDULES[k][0]}⌉ steps, lr 0.1 ÷ 10 after chunks "
                        f"{list(SCHEDULES[k][1])}" for k in keys},
        "optimizer": "SGD lr 0.1, momentum 0.9, weight decay 5e-4",
        "models": mk, "batch_size": {k: prof.batch_size[k] for k in keys},
        "test_images": prof.test_limit or "all 10000", "log_every": prof.log_every, "jobs": jobs,
        "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
        "estimated_wall_s_total": est_total, "runs": len(specs),
    }
    log(("SMOKE RUN (--quick): not evidence. " if prof.smoke else "")
        + f"orthofx study → {out}: {len(specs)} runs ({', '.join(keys)}; {len(settings['rows'])} rows × {seeds} seeds, "
          f"{steps} steps, profile {prof.name}: " + "; ".join(
              f"{k} batch {prof.batch_size[k]}, {mk[k]}" for k in keys) + ")")
    if report_only:
        log(f"  --report: {len(specs) - len(todo)} finished, {len(todo)} not yet run (none started)")
    else:
        log(f"  {len(specs) - len(todo)} finished (skipped), {len(todo)} to run "
            f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'}) on {min(jobs, max(1, len(todo)))} "
            f"single-threaded worker(s); estimated {_fmt_secs(est_todo)} for these, {_fmt_secs(est_total)} for the whole "
            f"study on idle cores")

    t0 = time.perf_counter()
    tasks = [Task((s.experiment, s.row.label, s.seed), execute_run, (s,), cost=float(len(todo) - i))
             for i, s in enumerate(todo)] if not report_only else []  # cost = rank: seed-major order
    bar = None
    if progress and tasks:
        from orthofx._optional import require

        bar = require("tqdm.auto", "cli", purpose="the progress bar (or progress=False)").tqdm(
            total=len(tasks), desc="study runs", unit="run", smoothing=0.05)

    def on_done(task: Task, rec: Any, secs: float) -> None:
        exp, label, seed = task.key
        line = (f"{exp} {label} seed {seed}: " + (f"test error {rec['final_test_error']:.2f}%, "
                f"κ_range {rec['final_kappa']['kappa_range']:.3g}, non-finite {rec['nonfinite_steps']}/{rec['steps']}"
                if rec["status"] == "ok" else f"FAILED: {str(rec['error']).splitlines()[0][:200]}") + f" ({secs:.0f} s)")
        if bar is not None:
            bar.set_postfix_str(f"{exp} {label} s{seed}", refresh=False)
            bar.update(1)
            bar.write(line)
        else:
            log(line)

    saved_threads = torch.get_num_threads()
    if jobs == 1 and prof.device == "cpu":
        torch.set_num_threads(1)
    try:
        run_tasks(tasks, jobs=jobs, threads=1 if prof.device == "cpu" else None, on_done=on_done)
    finally:
        torch.set_num_threads(saved_threads)
        if bar is not None:
            bar.close()
    settings["elapsed_s"] = round(time.perf_counter() - t0, 1)

    runs = []
    for s in specs:
        try:
            rec = json.loads(Path(s.path).read_text())
        except (OSError, ValueError):
            continue
        if rec.get("hash") == s.hash:
            runs.append(rec)
    analysis = analyze(runs)
    ok = sum(1 for r in runs if r.get("status") == "ok")
    settings["finished"] = f"{ok} of {len(specs)} planned runs" + ("" if ok == len(specs) else " (study in progress)")
    settings["mean_run_wall_s"] = {k: round(statistics.fmean(w), 1) for k in keys if (w := [
        float(r["wall_s"]) for r in runs if r["experiment"] == k and r.get("status") == "ok" and "wall_s" in r])}
    md = format_results_md(analysis, settings)
    slim = [{k: v for k, v in r.items() if k not in ("log", "history", "traceback")} for r in runs]
    write_json_atomic(out / "results.json", {"settings": settings, "analysis": analysis, "runs": slim})
    (out / "results.md").write_text(md)
    log(md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({len(runs)} runs, per-run files in {out}/<exp>/<row>/)")
    return {"settings": settings, "analysis": analysis, "runs": runs,
            "files": {"json": str(out / "results.json"), "md": str(out / "results.md")}}
