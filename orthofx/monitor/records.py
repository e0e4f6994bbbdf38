"""The monitor's record schema, and reading/writing records as CSV or JSON lines.

A record is a flat dict. Two kinds share one schema (:data:`FIELDS`; fields that do not
apply to a kind are ``None``, an empty cell in CSV):

``kind == "meta"`` — one per monitored meta-layer and recorded step:
    ``run``, ``step``, ``layer`` (the user's module path), ``kappa`` = κ(Σ + εI) (median over
    the batch of matrices), ``kappa_max`` (batch max), ``lambda_max`` / ``lambda_min`` (of
    Σ + εI, over the batch), ``eps`` (the ε the layer adds; None when it adds none it knows
    of, e.g. a swapped-in ``torch.linalg.eigh``), ``size`` (n of the n×n matrix), ``rank``
    (numerical rank of Σ), ``kappa_range`` (κ of Σ on its numerical range), ``kappa_paper``
    (the paper's eq. 1 as inferred: Σ without ε, σ_min at the rounding floor),
    ``nonfinite_outputs``, ``solver_failures``, ``solver_fallbacks``, ``solver_nonfinite``
    (counters since the monitor started). Definitions: :mod:`orthofx.monitor.spectrum`.

``kind == "producer"`` — one per Pre-SVD weight and recorded step:
    ``run``, ``step``, ``layer`` (the weight's parameter name in the user's model),
    ``weight_norm`` = ‖W‖_F, ``weight_cond`` = σ_max/σ_min of the flattened (out, in·k·k)
    weight, ``weight_sigma_max``, ``weight_sigma_min`` (:mod:`orthofx.monitor.weights`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from orthofx.errors import InputError

__all__ = ["FIELDS", "META", "PRODUCER", "write_csv", "write_jsonl", "load_records"]

META = "meta"
PRODUCER = "producer"

FIELDS = (
    "run",
    "step",
    "kind",
    "layer",
    "kappa",
    "kappa_max",
    "lambda_max",
    "lambda_min",
    "eps",
    "size",
    "rank",
    "kappa_range",
    "kappa_paper",
    "nonfinite_outputs",
    "solver_failures",
    "solver_fallbacks",
    "solver_nonfinite",
    "weight_norm",
    "weight_cond",
    "weight_sigma_max",
    "weight_sigma_min",
)

_FLOATS = ("kappa", "kappa_max", "lambda_max", "lambda_min", "eps", "kappa_range", "kappa_paper",
           "weight_norm", "weight_cond", "weight_sigma_max", "weight_sigma_min")
_INTS = ("step", "size", "rank", "nonfinite_outputs", "solver_failures", "solver_fallbacks", "solver_nonfinite")
#: a meta-layer record must carry these (older files lack the newer fields)
_REQUIRED_META = ("kappa", "kappa_max", "lambda_max", "lambda_min")


def write_csv(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``records`` as CSV with the columns :data:`FIELDS` (None → empty cell)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    return p


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``records`` as JSON lines (NaN/inf as Python's json writes them)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w") as f:
        for r in records:
            f.write(json.dumps(dict(r)) + "\n")
    return p


def _parse(r: dict[str, Any]) -> dict[str, Any]:
    """Types of a CSV row: empty → None, numbers parsed; ``kind`` defaults to "meta"."""
    out: dict[str, Any] = dict(r)
    if not out.get("kind"):
        out["kind"] = META
    for k in _FLOATS:
        v = out.get(k)
        out[k] = None if v is None or v == "" else float(v)
    for k in _INTS:
        v = out.get(k)
        if v is None or v == "":
            out[k] = None
        else:
            f = float(v)
            out[k] = int(f) if math.isfinite(f) else None
    if out["step"] is None:
        raise KeyError("step")
    if out["kind"] == META:
        for k in _REQUIRED_META:
            if out.get(k) is None:
                raise KeyError(k)
    return out


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by ``to_csv`` or ``to_jsonl`` (``.jsonl``: JSON lines; anything
    else: CSV; files of earlier versions without the newer fields load with ``kind="meta"``).
    A missing file, bad JSON, a missing column or a non-numeric value raises
    :class:`~orthofx.errors.InputError` naming the file and row."""
    p = Path(path)
    try:
        if p.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{p}: line {i} is not JSON ({e.msg})") from None
            for r in rows:
                r.setdefault("kind", META)
            return rows
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read monitor records {p}: {e}") from None
    out = []
    for i, r in enumerate(rows, 2):
        try:
            out.append(_parse(r))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{p}: row {i} is not a monitor record ({type(e).__name__}: {e})") from None
    return out
