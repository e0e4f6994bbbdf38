"""Conditioning monitor: κ of each meta-layer's covariance over training, plus failure counts.

κ convention (the paper's eq. 1): ``κ = λ_max / λ_min`` of the **float64** eigenvalues of
exactly the matrix the meta-layer decomposed, εI included (a whitening layer with ε on a
rank-deficient Σ has ``κ = (λ_max + ε)/ε``); ``λ_min ≤ 0`` gives ``+inf``. For a batch of
covariances (GCP: one per image; grouped whitening: one per group) the monitor records the
median and the maximum over the batch; ``kappa`` is the median.

Cost: the meta-layer modules keep the eigenvalues they already computed
(``orthofx_record``), so the monitor never decomposes a matrix again for the spectral
backends ("ns" pays one extra float64 eigvalsh on the recorded steps only). Recording is
switched on only for the forward of every ``every``-th step. κ stays on the device until
:meth:`ConditioningMonitor.flush` (one host sync per flush, not per step).

Sinks: CSV and JSONL (``to_csv``/``to_jsonl``), and TensorBoard when it is installed
(``tensorboard_dir``). :func:`plot` writes a PNG of log10 κ against step, one line per run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from orthofx.config import check_int
from orthofx.errors import ConfigError, InputError
from orthofx.linalg import condition_number_from_eigenvalues, solver_stats
from orthofx.nn.meta import is_meta_layer

__all__ = ["ConditioningMonitor", "plot", "load_records"]

FIELDS = (
    "run",
    "step",
    "layer",
    "kappa",
    "kappa_max",
    "lambda_max",
    "lambda_min",
    "nonfinite_outputs",
    "solver_failures",
    "solver_fallbacks",
    "solver_nonfinite",
)


@dataclass
class _Pending:
    step: int
    layer: str
    summary: torch.Tensor  # (4,) float64 on the device: κ median, κ max, λ_max, λ_min
    solver: dict[str, int]  # solver counters at this step (host ints: no sync)
    nonfinite: torch.Tensor | None  # running count of non-finite outputs (device tensor)


def _to_host(tensors: list[torch.Tensor]) -> list[Any]:
    """``[t.tolist() for t in tensors]`` with one device→host transfer per device."""
    out: list[Any] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idxs in by_device.values():
        for i, v in zip(idxs, torch.stack([tensors[i] for i in idxs]).tolist()):
            out[i] = v
    return out


def _summarize(lam: torch.Tensor) -> torch.Tensor | None:
    """(4,) float64 device tensor [κ median, κ max, λ_max, λ_min] over the batch of ascending
    eigenvalues ``lam`` (..., n); computed on the device (no host sync), so a pending record
    holds 4 numbers instead of the whole spectrum."""
    if lam.dim() == 0 or lam.shape[-1] == 0:
        return None
    with torch.no_grad():
        lam2 = lam.detach().to(torch.float64).reshape(-1, lam.shape[-1])
        kap = condition_number_from_eigenvalues(lam2)
        return torch.stack([kap.median(), kap.max(), lam2[:, -1].max(), lam2[:, 0].min()])


def _record_order(r: Mapping[str, Any]) -> tuple[int, str]:
    """Sort key of a record: its step, then its full content (ties broken the same way
    whatever order the records arrived in)."""
    return int(r["step"]), json.dumps(r, sort_keys=True, default=str)


def _median(xs: list[float]) -> float:
    """Median of ``xs`` (torch's convention: the lower of the two middle values; NaN if empty)."""
    if not xs:
        return math.nan
    return float(torch.tensor(xs, dtype=torch.float64).median())


@dataclass
class ConditioningMonitor:
    """Records κ of every orthofx meta-layer module in ``model`` every ``every`` steps.

    Usage::

        mon = ConditioningMonitor(gm, every=10, run="nog+ow+olr")
        for batch in loader:
            loss = ...; loss.backward(); opt.step()
            mon.step()                      # after each training step
        mon.flush(); mon.to_csv("kappa.csv")

    Args:
        model: a module holding orthofx meta-layers (``orthofx.nn`` modules, or the stable
            stand-ins that ``orthofx.transform`` swaps in for raw ``torch.linalg`` calls).
        every: record every k-th step (k ≥ 1). Steps count from 0; step 0 is recorded.
        run: a label written into every record (one line per run in :func:`plot`).
        tensorboard_dir: also log ``kappa/<layer>`` scalars there when tensorboard is installed.
        layers: restrict to these qualified module names (default: every meta-layer).
        max_pending: records kept on the device (4 numbers each) before :meth:`step` flushes
            them to the host by itself (one sync every ``max_pending`` records; reading with
            :meth:`flush`, :meth:`summary`, :meth:`to_csv`... syncs once as well).
    """

    model: nn.Module
    every: int = 1
    run: str = "run"
    tensorboard_dir: str | os.PathLike | None = None
    layers: Sequence[str] | None = None
    max_pending: int = 1024
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.every = check_int(self.every, "every", min=1)
        self.max_pending = check_int(self.max_pending, "max_pending", min=1)
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(self.model).__name__}")
        found = {name: m for name, m in self.model.named_modules() if is_meta_layer(m)}
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ConfigError(f"layers must be a list of module names, got the string {self.layers!r}")
            missing = sorted(set(self.layers) - set(found))
            if missing:
                raise ConfigError(f"not meta-layers of the model: {missing}; meta-layers: {sorted(found)}")
            found = {k: found[k] for k in self.layers}
        if not found:
            raise ConfigError(
                "the model holds no orthofx meta-layer to monitor (use orthofx.nn modules, or "
                "orthofx.transform a model with torch.linalg meta-layers first)"
            )
        self._modules: dict[str, nn.Module] = found
        self._step = 0
        self._pending: list[_Pending] = []
        self._nonfinite_out: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._make_hook(name)) for name, m in found.items()]
        self._solver_base = self._solver_snapshot()
        self._writer = None
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.tensorboard_dir))
            except Exception:  # tensorboard not installed: CSV/JSONL still work
                self._writer = None
        self._arm()

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not module.training:
                return
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                with torch.no_grad():
                    bad = (~torch.isfinite(first.detach())).sum(dtype=torch.int64)
                acc = self._nonfinite_out.get(name)
                self._nonfinite_out[name] = bad if acc is None else acc + bad

        return hook

    def _arm(self) -> None:
        on = self._step % int(self.every) == 0
        for m in self._modules.values():
            m.orthofx_record = on
            if on:
                m.orthofx_last_eigenvalues = None

    def _solver_snapshot(self) -> dict[str, Any]:
        s = solver_stats()
        return {"failures": s.failures, "fallbacks": sum(s.fallbacks.values())}

    # ------------------------------------------------------------------ API
    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the monitored meta-layers."""
        return list(self._modules)

    def step(self) -> None:
        """Call once per training step, after the forward (typically after ``optimizer.step()``)."""
        if self._step % int(self.every) == 0:
            snap = self._solver_snapshot()
            for name, m in self._modules.items():
                lam = getattr(m, "orthofx_last_eigenvalues", None)
                summary = None if lam is None else _summarize(lam)
                if summary is not None:
                    self._pending.append(_Pending(self._step, name, summary, snap, self._nonfinite_out.get(name)))
        self._step += 1
        self._arm()
        if len(self._pending) >= int(self.max_pending):
            self.flush()

    def flush(self) -> list[dict[str, Any]]:
        """Turn the pending device-side summaries into records (one host sync) and return them."""
        new: list[dict[str, Any]] = []
        stats = solver_stats()
        solver_nonfinite = stats.nonfinite
        if not self._pending:
            return new
        values = _to_host([p.summary for p in self._pending])
        zero = torch.zeros((), dtype=torch.int64)
        nonfinite = _to_host([zero if p.nonfinite is None else p.nonfinite for p in self._pending])
        for p, (kappa, kappa_max, lam_max, lam_min), nf in zip(self._pending, values, nonfinite):
            rec = {
                "run": self.run,
                "step": p.step,
                "layer": p.layer,
                "kappa": kappa,
                "kappa_max": kappa_max,
                "lambda_max": lam_max,
                "lambda_min": lam_min,
                "nonfinite_outputs": int(nf),
                "solver_failures": p.solver["failures"] - self._solver_base["failures"],
                "solver_fallbacks": p.solver["fallbacks"] - self._solver_base["fallbacks"],
                "solver_nonfinite": solver_nonfinite,
            }
            new.append(rec)
            if self._writer is not None and math.isfinite(rec["kappa"]):
                self._writer.add_scalar(f"kappa/{p.layer}", rec["kappa"], p.step)
        self._pending.clear()
        self.records.extend(new)
        if self._writer is not None:
            self._writer.flush()
        return new

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer, over the recorded steps (independent of the order of ``records``):

        ``kappa_median`` / ``kappa_max``: NaN-ignoring median / max of κ (``+inf`` counts;
        NaN only when every record is NaN); ``kappa_final``: κ of the latest step;
        ``nan_records``: how many records have a NaN κ; ``records``: how many there are;
        solver and non-finite-output counters of the latest step (they are cumulative).
        """
        self.flush()
        out: dict[str, dict[str, float]] = {}
        for name in self._modules:
            recs = [r for r in self.records if r["layer"] == name]
            if not recs:
                continue
            recs.sort(key=_record_order)
            ks = [float(r["kappa"]) for r in recs]
            finite_or_inf = [k for k in ks if not math.isnan(k)]
            last = recs[-1]
            out[name] = {
                "kappa_median": _median(finite_or_inf),
                "kappa_final": ks[-1],
                "kappa_max": max(finite_or_inf) if finite_or_inf else math.nan,
                "solver_failures": last["solver_failures"],
                "solver_fallbacks": last["solver_fallbacks"],
                "nonfinite_outputs": last["nonfinite_outputs"],
                "records": len(ks),
                "nan_records": len(ks) - len(finite_or_inf),
            }
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write all records as CSV (columns: :data:`FIELDS`)."""
        self.flush()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.records)
        return p

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Write all records as JSON lines."""
        self.flush()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")
        return p

    def close(self) -> None:
        """Remove the hooks and stop recording (flushes first)."""
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._modules.values():
            m.orthofx_record = False
            m.orthofx_last_eigenvalues = None
        if self._writer is not None:
            self._writer.close()


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by ``to_csv`` or ``to_jsonl``; a missing file, bad JSON, a missing
    column or a non-numeric value raises :class:`InputError` naming the file and row."""
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
            return rows
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read monitor records {p}: {e}") from None
    for i, r in enumerate(rows, 2):
        try:
            r["step"] = int(r["step"])
            for k in ("kappa", "kappa_max", "lambda_max", "lambda_min"):
                r[k] = float(r[k])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{p}: row {i} is not a monitor record ({type(e).__name__}: {e})") from None
    return rows


def plot(
    runs: Mapping[str, Iterable[Mapping[str, Any]]] | Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    title: str = "Covariance conditioning",
) -> Path:
    """PNG of log10 κ against step, one line per run (and per layer when several).

    ``runs``: ``{run name: records}`` or a flat list of records carrying a ``"run"`` field.
    ``layer`` restricts the plot to one meta-layer. Needs matplotlib (the ``demo`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(runs, Mapping):
        grouped: dict[str, list[Mapping[str, Any]]] = {}
        for r in runs:
            grouped.setdefault(str(r.get("run", "run")), []).append(r)
        runs = grouped
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, recs in runs.items():
        by_layer: dict[str, list[tuple[int, float]]] = {}
        for r in recs:
            if layer is not None and r["layer"] != layer:
                continue
            k = float(r["kappa"])
            by_layer.setdefault(r["layer"], []).append((int(r["step"]), math.log10(k) if k > 0 and math.isfinite(k) else math.nan))
        for lname, pts in by_layer.items():
            pts.sort()
            label = run if len(by_layer) == 1 else f"{run} · {lname}"
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=label, linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("log10 κ")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
