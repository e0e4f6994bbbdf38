"""One run of ``orthofx study`` (a worker's :class:`~orthofx.experiment.jobs.Task`): seed, record a
digest of the initial weights, train with per-step logs of every Pre-SVD producer
(:class:`StepLogger`) and write the record atomically (:func:`write_json_atomic`,
:func:`execute_run`)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from orthofx.experiment.catalog import KAPPA_FIELDS
from orthofx.experiment.study_plan import SCHEMA, RunSpec
from orthofx.experiment.study_stats import final_kappa
from orthofx.experiment.train import ExperimentConfig, _jsonable

__all__ = ["write_json_atomic", "StepLogger", "execute_run"]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temp file in the same directory, fsync,
    then ``os.replace`` (a reader sees the old file or the whole new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- per-step logs
def _sig(x: float, digits: int = 5) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


class StepLogger:
    """Per-step logs of every Pre-SVD producer, every ``every`` steps (an ``observer`` of
    :func:`orthofx.experiment.train.run`): ‖W‖_F of the effective weight, ‖ΔW‖_F/‖W_prev‖_F
    since the previous logged step, and under a weight parametrization ‖A‖_F of its trainable
    tensor (``parametrizations.weight.original``); for flat OW also ‖S‖₂ of the generator
    S = aY₀ᵀ − Y₀aᵀ (a, Y₀ = ``base`` in tall form; ``B − Bᵀ`` for a square weight, the same
    norm: ``FlatOrthogonal.skew``); for SOC ‖L‖_F of the kernel and
    β(M) = k·σ_max(M flattened), the operator-norm bound of the scaled skew kernel M it applies
    (≤ its ``radius``; ``module.weight`` reads M there, so ‖W‖_F and ‖ΔW‖_F are of M). Values stay
    on the device until :meth:`records` (one host sync)."""

    FIELDS = ("w_norm", "dw_rel", "gen_norm", "s_norm2", "soc_beta")

    def __init__(self, session: Any, every: int = 10) -> None:
        mods = dict(session.model.named_modules())
        self.modules = {p: mods[p] for p in session.producers if p in mods}
        self.every, self._step = int(every), 0
        self._prev: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[int, str, torch.Tensor]] = []
        self.kinds: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        self.errors: list[str] = []

    def step(self) -> None:
        if self._step % self.every == 0:
            with torch.no_grad():
                for name, m in self.modules.items():
                    self._pending.append((self._step, name, self._values(name, m)))
        self._step += 1

    def _values(self, name: str, m: torch.nn.Module) -> torch.Tensor:
        W = m.weight.detach()
        nan = torch.full((), math.nan, dtype=torch.float64, device=W.device)
        vals = [nan] * len(self.FIELDS)
        vals[0] = W.double().norm()
        prev = self._prev.get(name)
        if prev is not None:
            vals[1] = (W.double() - prev).norm() / prev.norm()
        self._prev[name] = W.double().clone()
        par = getattr(getattr(m, "parametrizations", None), "weight", None)
        kind = "plain"
        if par is not None:
            try:
                A, p0 = par.original.detach(), par[0]
                vals[2] = A.double().norm()
                if getattr(p0, "method", None) == "soc":
                    kind = "soc"
                    self.meta.setdefault(name, {"radius": getattr(p0, "radius", None), "terms": getattr(p0, "terms", None)})
                    vals[4] = W.shape[-1] * torch.linalg.matrix_norm(W.double().reshape(W.shape[0], -1), ord=2)
                elif hasattr(p0, "base") and hasattr(p0, "skew"):
                    kind = "flat-ow"
                    vals[3] = torch.linalg.matrix_norm(p0.skew(A.double()), ord=2)
                else:
                    kind = type(p0).__name__
            except Exception as e:  # a log must never end a run; say what failed
                if len(self.errors) < 3:
                    self.errors.append(f"{name}: {type(e).__name__}: {e}")
        self.kinds[name] = kind
        return torch.stack([v.to(torch.float64) for v in vals])

    def records(self) -> dict[str, Any]:
        """``{"every", "producers": {name: {"kind", "step": [...], field: [...]}}}`` (fields
        that are NaN at every step are left out), ``"meta"``, ``"errors"``."""
        out: dict[str, Any] = {"every": self.every, "producers": {}, "meta": self.meta, "errors": self.errors}
        if not self._pending:
            return out
        values = torch.stack([v.cpu() for _, _, v in self._pending]).tolist()
        for name in self.modules:
            idx = [i for i, (_, n, _) in enumerate(self._pending) if n == name]
            col: dict[str, Any] = {"kind": self.kinds.get(name, "plain"), "step": [self._pending[i][0] for i in idx]}
            for j, f in enumerate(self.FIELDS):
                xs = [values[i][j] for i in idx]
                if any(math.isfinite(x) for x in xs):
                    col[f] = [_sig(x) for x in xs]
            out["producers"][name] = col
        return out


def _kappa_log(kappa_records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """The monitor's κ records as columns per meta-layer: step, kappa, kappa_range, kappa_paper, rank."""
    out: dict[str, dict[str, list]] = {}
    for r in kappa_records:
        if r.get("kind", "meta") not in ("meta", None):
            continue
        col = out.setdefault(str(r.get("layer", "?")), {k: [] for k in ("step", *KAPPA_FIELDS, "rank")})
        col["step"].append(int(r["step"]))
        for k in (*KAPPA_FIELDS, "rank"):
            v = r.get(k)
            col[k].append(None if v is None or v == "" else (_sig(float(v)) if math.isfinite(float(v)) else str(float(v))))
    return out



# ---------------------------------------------------------------------------- one run (worker)
def _init_digest(cfg: ExperimentConfig) -> str:
    """Digest of the model's initial weights as :func:`run` draws them (seed, then build)."""
    from orthofx.models import build_model
    from orthofx.experiment.train import _seed_everything

    _seed_everything(cfg.seed)
    m = build_model(cfg.model, 10, 1, cfg.backend, cfg.eps, **cfg.model_kwargs)
    h = hashlib.sha256()
    for k, v in m.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Train ``spec`` (a :class:`~orthofx.experiment.jobs.Task` function), catch any failure as
    a record with status "failed" and its error text, write the record atomically to
    ``spec.path`` and return it."""
    from orthofx.experiment.train import run

    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "schema": SCHEMA, "hash": spec.hash, "experiment": spec.experiment, "label": spec.row.label,
        "seed": spec.seed, "treatment": spec.row.treatment, "backend": spec.row.backend, "ortho": dict(spec.row.ortho),
        "profile": spec.profile, "smoke": spec.smoke, "log_every": spec.log_every, "config": spec.config.to_dict(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    try:
        rec["init_digest"] = _init_digest(spec.config)
        res = run(spec.config, log=lambda s: None, observer=functools.partial(StepLogger, every=spec.log_every))
        klog = _kappa_log(res.get("kappa_records", []))
        rec.update(
            status="ok", error=None, final_test_error=res["final_test_error"], history=res["history"],
            nonfinite_steps=res["nonfinite_steps"], solver_exceptions=res["solver_exceptions"], steps=res["steps"],
            ms_per_step=res["ms_per_step"], treatment_stats=res["treatment_stats"], kappa_summary=res["kappa"],
            final_kappa=final_kappa(klog), log={**res["observer"], "kappa": klog},
        )
    except Exception as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=12))
    rec["wall_s"] = time.perf_counter() - t0
    write_json_atomic(spec.path, rec)
    shutil.rmtree(spec.config.out, ignore_errors=True)
    return rec
