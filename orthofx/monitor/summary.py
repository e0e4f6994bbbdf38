"""κ statistics of the monitor's records, per meta-layer (:meth:`ConditioningMonitor.summary
<orthofx.monitor.core.ConditioningMonitor.summary>` states the keys).

Medians are torch's (the lower of the two middle values) and ignore NaN records (``+inf``
counts); "final" is the record of the latest step, ties broken by the record's content, so
the summary does not depend on the order the records arrived in.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from orthofx.monitor.records import META

__all__ = ["summarize_records", "median"]


def median(xs: list[float]) -> float:
    """Median of ``xs`` (torch's convention: the lower of the two middle values; NaN if empty)."""
    if not xs:
        return math.nan
    return float(torch.tensor(xs, dtype=torch.float64).median())


def _record_order(r: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of a record: its step, then its content (ties broken whatever the arrival order)."""
    return int(r["step"]), json.dumps(r, sort_keys=True, default=str)


def _layer_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """κ statistics of one meta-layer's records (sorted by :func:`_record_order`)."""
    ks = [float(r["kappa"]) for r in recs]
    finite_or_inf = [k for k in ks if not math.isnan(k)]
    last = recs[-1]
    out: dict[str, Any] = {
        "kappa_median": median(finite_or_inf),
        "kappa_final": ks[-1],
        "kappa_max": max(finite_or_inf) if finite_or_inf else math.nan,
        "solver_failures": last["solver_failures"],
        "solver_fallbacks": last["solver_fallbacks"],
        "nonfinite_outputs": last["nonfinite_outputs"],
        "records": len(ks),
        "nan_records": len(ks) - len(finite_or_inf),
    }
    for f in ("kappa_range", "kappa_paper"):  # the ε-free conventions (docs/kappa.md)
        kept = [v for v in (float(r[f]) for r in recs if r.get(f) is not None) if not math.isnan(v)]
        out[f"{f}_median"] = median(kept)
        out[f"{f}_final"] = float(last[f]) if last.get(f) is not None else math.nan
    out["rank_final"] = last.get("rank")
    out["eps"] = last.get("eps")
    return out


def summarize_records(
    records: Iterable[Mapping[str, Any]],
    names: Sequence[str],
    *,
    captured: Mapping[str, str],
    mismatched: Mapping[str, int],
    skipped: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """Per meta-layer of ``names`` that has records: :func:`_layer_summary` with its source
    (``captured``: name → graph nodes of a covariance captured where it is formed, with
    ``mismatched`` call counts) and which matrix ``kappa`` is of, those two keys
    (``kappa_median``, ``kappa_of``) first; then ``{"skipped": reason, "records": 0}`` per
    ``skipped`` meta-layer. Producer records are not summarised."""
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind", META) == META:
            by_layer.setdefault(r["layer"], []).append(dict(r))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        recs = by_layer.get(name)
        if not recs:
            continue
        recs.sort(key=_record_order)
        s = _layer_summary(recs)
        if name in captured:  # docs/monitor.md: a covariance captured where it is formed
            s["source"] = "captured covariance"
            s["kappa_of"] = "Σ (the layer's ε is unknown: kappa = κ(Σ), not κ(Σ + εI))"
            s["node"] = captured[name]
            if mismatched.get(name, 0):
                s["mismatched_calls"] = mismatched[name]
        else:
            s["source"] = "orthofx module"
            s["kappa_of"] = "Σ + εI" if s["eps"] is not None else "the decomposed matrix (ε unknown)"
        out[name] = {"kappa_median": s["kappa_median"], "kappa_of": s["kappa_of"], **s}
    for name, reason in skipped.items():
        out[name] = {"skipped": reason, "records": 0}
    return out
