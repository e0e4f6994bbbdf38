"""``orthofx demo``: the paper's decorrelated-BN experiment (Sec. 6.1) at CPU scale.

A small ResNet with ZCA whitening after its stem is trained on real Fashion-MNIST once per
row of the paper's tables: the SVD baseline, NOG, OLR, OW, NOG+OW, NOG+OW+OLR and the
Newton–Schulz baseline. For each row it prints test error, median and final κ of the
whitening covariance, solver failures, and time per step relative to the SVD baseline; it
writes ``results.json``, ``results.md`` and PNG plots of log10 κ into ``--out``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from orthofx.experiment.train import ExperimentConfig, _jsonable, run

__all__ = ["ROWS", "DemoRow", "demo", "format_table", "QUICK", "FULL"]


@dataclass(frozen=True)
class DemoRow:
    """One row of the paper's tables: a label, an orthofx preset and a meta-layer backend."""

    label: str
    treatment: str
    backend: str = "eigh"


ROWS: tuple[DemoRow, ...] = (
    DemoRow("SVD", "svd"),
    DemoRow("NOG", "nog"),
    DemoRow("OLR", "olr"),
    DemoRow("OW", "ow"),
    DemoRow("NOG+OW", "nog+ow"),
    DemoRow("NOG+OW+OLR", "nog+ow+olr"),
    DemoRow("Newton-Schulz", "svd", "ns"),
)

#: Full-length default: ≈ 10 minutes on 2 CPU cores for all seven rows and one seed.
FULL = dict(epochs=4, train_limit=30000, test_limit=10000, batch_size=128, milestones=(3,), monitor_every=10,
            recalibrate_batches=40)
#: ``--quick``: a smoke run (well under 50 s on 2 CPU cores) that still writes PNG + JSON.
QUICK = dict(epochs=1, train_limit=640, test_limit=500, batch_size=64, milestones=(), monitor_every=2,
             recalibrate_batches=5)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _fmt_kappa(xs: Sequence[float]) -> str:
    finite = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    if not finite:
        return "inf" if xs else "n/a"
    return f"{10 ** statistics.fmean(math.log10(x) for x in finite):.2e}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of aggregated rows (see :func:`demo`)."""
    head = "| row | test error % | κ median | κ final | solver failures | step time vs SVD |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['error']} | {r['kappa_median']} | {r['kappa_final']} | "
            f"{r['solver_failures']} | {r['time_ratio']} |"
        )
    return "\n".join(lines)


def demo(
    out: str | Path = "out/demo",
    *,
    quick: bool = False,
    seeds: int = 1,
    rows: Sequence[DemoRow] = ROWS,
    data_dir: str | None = None,
    download: bool = False,
    device: str = "auto",
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every row for ``seeds`` seeds; print and write the table, JSON and plots.

    Returns ``{"rows": [...aggregated...], "runs": [...per seed...], "files": {...}}``.
    """
    from orthofx.config import check_int
    from orthofx.monitor import plot

    seeds = check_int(seeds, "seeds", min=1)  # OptionError (a ConfigError) for 0, -1, 2.5, "2"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(QUICK if quick else FULL)
    base.update(overrides or {})
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        for row in rows:
            cfg = ExperimentConfig(
                dataset="fashion-mnist",
                data_dir=data_dir,
                download=download,
                model="small-resnet-dbn",
                treatment=row.treatment,
                backend=row.backend,
                seed=seed,
                out=str(out / "runs" / f"{row.label.lower()}-seed{seed}"),
                resume=False,
                device=device,
                progress=progress,
                name=row.label,
                **base,
            )
            res = run(cfg, log=lambda s: None)
            res["label"], res["seed"] = row.label, seed
            runs.append(res)
            k = next(iter(res["kappa"].values()), {})
            log(
                f"  {row.label:<14} seed {seed}: test error {res['final_test_error']:.2f}%  "
                f"κ median {k.get('kappa_median', math.nan):.3g}  {res['ms_per_step']:.1f} ms/step"
            )

    aggregated = []
    for row in rows:
        rs = [r for r in runs if r["label"] == row.label]
        base_rs = [r for r in runs if r["label"] == rows[0].label]
        ks = [next(iter(r["kappa"].values()), {}) for r in rs]
        ratios = [
            r["ms_per_step"] / b["ms_per_step"]
            for r, b in zip(rs, base_rs)
            if r["ms_per_step"] and b["ms_per_step"]
        ]
        err_m, err_s = _mean_std([r["final_test_error"] for r in rs])
        # the median over seeds: one step-time sample disturbed by a noisy neighbour must not
        # move the ratio (shared CPUs); the spread is reported as min–max
        rat_m = statistics.median(ratios) if ratios else math.nan
        aggregated.append(
            {
                "label": row.label,
                "treatment": row.treatment,
                "backend": row.backend,
                "seeds": len(rs),
                "test_error_mean": err_m,
                "test_error_std": err_s,
                "kappa_median": [k.get("kappa_median") for k in ks],
                "kappa_final": [k.get("kappa_final") for k in ks],
                "solver_failures": sum(int(k.get("solver_failures", 0)) for k in ks),
                "time_ratio_median": rat_m,
                "error": _fmt(err_m, err_s, len(rs)),
                "kappa_median_fmt": _fmt_kappa([k.get("kappa_median") for k in ks]),
                "kappa_final_fmt": _fmt_kappa([k.get("kappa_final") for k in ks]),
                "time_ratio": (f"{rat_m:.2f}×" if len(ratios) < 2 else
                               f"{rat_m:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"),
            }
        )
    table_rows = [
        dict(a, kappa_median=a["kappa_median_fmt"], kappa_final=a["kappa_final_fmt"]) for a in aggregated
    ]
    table = format_table(table_rows)
    elapsed = time.perf_counter() - t_start
    log("")
    log(table)
    log(f"\n({'quick' if quick else 'full'} run, {seeds} seed(s), {elapsed:.0f} s; κ: float64, of Σ + εI)")

    # plots: one line per row (seed 0), from the monitor records
    from orthofx.monitor import load_records

    curves = {}
    for r in runs:
        if r["seed"] == 0:
            csv_path = Path(r["config"]["out"]) / "kappa.csv"
            if csv_path.exists():
                curves[r["label"]] = load_records(csv_path)
    files = {"kappa_png": str(plot(curves, out / "kappa.png", title="Whitening covariance κ (Fashion-MNIST)"))}
    files["error_png"] = str(_error_plot(aggregated, out / "error.png"))
    result = {
        "quick": quick,
        "seeds": seeds,
        "elapsed_s": elapsed,
        "settings": _jsonable(base),
        "rows": aggregated,
        "runs": runs,
        "files": files,
    }
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=2))
    (out / "results.md").write_text(table + "\n")
    files["json"] = str(out / "results.json")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {files['kappa_png']}, {files['error_png']}")
    return result


def _error_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [r["label"] for r in rows]
    means = [r["test_error_mean"] for r in rows]
    stds = [r["test_error_std"] if r["seeds"] > 1 else 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, color="#4C72B0", capsize=3)
    ax.set_xticks(range(len(rows)), labels, rotation=20, fontsize=8)
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(max(0.0, lo - 2 * (hi - lo + 0.5)), hi + (hi - lo + 0.5))
    ax.set_ylabel("test error %")
    ax.set_title("Fashion-MNIST test error per treatment")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
