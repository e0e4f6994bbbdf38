"""log10 of a monitor field (κ by default) against step, one line per run (and layer).

Builds a ``matplotlib.figure.Figure`` with an Agg canvas directly: no ``pyplot``, so the
global backend, the pyplot figure registry and notebooks' inline display are untouched.
Lines that overlap stay distinguishable: each line gets its own (colour, line style, marker)
from cycles of 10 colours, 4 line styles and 8 markers.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from orthofx._optional import require
from orthofx.errors import ConfigError
from orthofx.monitor.records import FIELDS, META, PRODUCER

__all__ = ["plot", "line_styles"]

_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")
_LABELS = {
    "kappa": "log10 κ(Σ + εI)",
    "kappa_range": "log10 κ of Σ on its range",
    "kappa_paper": "log10 κ, the paper's convention",
    "weight_norm": "log10 ‖W‖_F",
    "weight_cond": "log10 σ_max/σ_min(W)",
}


def line_styles() -> Iterator[dict[str, Any]]:
    """Endless ``{"color", "linestyle", "marker"}`` keyword sets, all distinct for the first
    40 lines (colour and line style change together, the marker separately)."""
    colours = [f"C{i}" for i in range(10)]
    for i in itertools.count():
        yield {
            "color": colours[i % 10],
            "linestyle": _LINESTYLES[(i // 10 + i) % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }


def _group(runs: Mapping[str, Iterable[Mapping[str, Any]]] | Iterable[Mapping[str, Any]]) -> dict[str, list]:
    if isinstance(runs, Mapping):
        return {str(k): list(v) for k, v in runs.items()}
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        grouped.setdefault(str(r.get("run", "run")), []).append(r)
    return grouped


def plot(
    runs: Mapping[str, Iterable[Mapping[str, Any]]] | Iterable[Mapping[str, Any]],
    path: str | os.PathLike | None = None,
    *,
    layer: str | None = None,
    field: str = "kappa",
    title: str = "Covariance conditioning",
) -> Any:
    """A ``matplotlib.figure.Figure`` of log10 ``field`` against step.

    ``runs``: ``{run name: records}`` or a flat list of records carrying a ``"run"`` field.
    ``field``: any numeric record field (``"kappa"``, ``"kappa_range"``, ``"kappa_paper"``,
    ``"weight_norm"``, ``"weight_cond"``, …); records without it (the other kind) are skipped.
    ``layer`` restricts to one layer label. ``path``: also save a PNG there (dpi 120).
    Non-positive and non-finite values leave gaps. Needs matplotlib (extra ``plot``); without
    it raises :class:`orthofx._optional.MissingExtraError` naming ``pip install 'orthofx[plot]'``.
    """
    if field not in FIELDS or field in ("run", "kind", "layer", "step"):
        raise ConfigError(f"plot: field must be a numeric record field, got {field!r}")
    figure = require("matplotlib.figure", purpose="orthofx.monitor.plot")
    agg = require("matplotlib.backends.backend_agg", purpose="orthofx.monitor.plot")
    fig = figure.Figure(figsize=(7, 4.2))
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = line_styles()
    grouped = _group(runs)
    want = PRODUCER if field.startswith("weight_") else META
    for run, recs in grouped.items():
        by_layer: dict[str, list[tuple[int, float]]] = {}
        for r in recs:
            if r.get("kind", META) != want or r.get(field) is None:
                continue
            if layer is not None and r["layer"] != layer:
                continue
            v = float(r[field])
            by_layer.setdefault(str(r["layer"]), []).append(
                (int(r["step"]), math.log10(v) if v > 0 and math.isfinite(v) else math.nan))
        for lname, pts in by_layer.items():
            pts.sort()
            label = run if len(by_layer) == 1 else f"{run} · {lname}"
            n = len(pts)
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, linewidth=1.2,
                    markersize=4, markevery=max(1, n // 12), **next(styles))
    ax.set_xlabel("training step")
    ax.set_ylabel(_LABELS.get(field, f"log10 {field}"))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    return fig
