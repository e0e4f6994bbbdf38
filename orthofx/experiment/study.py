"""``orthofx study``: a paired-seed study of the paper's treatments, sized to resolve its effects.

The demo (192 steps, 1–3 seeds) cannot resolve the paper's 0.2–0.9-point effects: seed SDs are
0.3–0.7 points. The study runs every row of both experiments for ≥ 2000 SGD steps and ≥ 6 seeds
and compares each row with SVD as **paired per-seed differences**: seed k gives every row the
same initial weights (same architecture ⇒ same ``torch.manual_seed(k)`` draws before the
transform; each run records a digest of them) and the same training subset and data order.

Schedule (paper, supplementary training details, mapped to the run length T):

* dbn — the paper's decorrelated BN: 350 epochs, lr 0.1 ÷ 10 at epochs 100, 200, 300. Here 7
  chunks ("epochs") of ⌈T/7⌉ steps over a fixed training subset, lr ÷ 10 after chunks 2, 4, 6:
  at 2/7, 4/7, 6/7 of the run = 100/350, 200/350, 300/350.
* gcp — the paper's GCP: 60 epochs, ÷ 10 at epochs 30 and 45. Here 4 chunks of ⌈T/4⌉ steps,
  ÷ 10 after chunks 2 and 3 (1/2 and 3/4 of the run).
* SGD lr 0.1, momentum 0.9, weight decay 5e-4 (as the demo; the paper's GCP used 1e-4).
  Test error on the full 10 000-image test set after re-estimating the normalisation statistics
  over 12 training batches (the demo's recalibration).

CPU profile (``--profile cpu``, the default; one single-threaded worker per core; see
:data:`PROFILES`), timed on this 2-core machine, one thread per run:

* dbn: 5×5 stride-2 stem 1→64 + ZCA (ε = 1e-2, rank ≤ 25 of 64), ResNet widths (8, 16, 32),
  1 block per stage, batch 32: 23.6 ms/step (SVD) on an idle core ⇒ ≈ 52 s per 2000-step run
  with κ/logs every 10 steps and evaluation (91 s measured while other jobs shared the cores).
* gcp: ResNet widths (8, 16, 64), 1×1 reduce 64→64 at 7×7 (49 positions, rank ≤ 48 of 64) →
  covariance pooling, batch 16: 20.8 ms/step (SVD) ⇒ ≈ 48 s per run (83 s on shared cores).
* treated rows cost 1–2.3× SVD (:data:`ROW_COSTS`), except the three SOC rows on DBN: ≈ 3×
  (SOC applies its Taylor series of 3×3 convolutions 64→64 to the zero-padded, 2×-downsampled
  stem input; 5.8× before the stride kernel became ⌈k/s⌉).
* whole study (13 rows × 2 experiments × 6 seeds = 156 runs) on 2 workers: ≈ 1.5 h on idle
  cores, ≈ 3–4 h when the cores are shared (the start-up line prints the estimate).

GPU profile (``--profile gpu``; ``benchmarks/gpu_study.sh``): the same meta-layers in larger
models (widths (32, 64, 128), 2 blocks per stage), batch 128, 8000 steps, one run at a time.

Statistics (:func:`analyze`, a pure function of the saved runs): per row, test error mean ± SD
over its finished seeds; against SVD, over the seeds where both finished, the paired differences
d_k = row_k − SVD_k: mean d̄, SD s_d, n, 95 % CI d̄ ± t_{0.975,n−1}·s_d/√n (Student t) and the
minimum detectable effect MDE = (t_{0.975,n−1} + t_{0.80,n−1})·s_d/√n (α = 0.05 two-sided, 80 %
power, from the observed s_d). Verdict: "better/worse than SVD" only when the CI excludes 0;
otherwise "no difference detected (effects below ±MDE cannot be excluded)"; "too few seeds"
below 3 pairs. The same for the final κ_range as paired differences of log10 κ.

Runs are resumable: each finished (or failed) run is written at once, atomically, to
``out/<experiment>/<row-slug>/seed<k>.json`` with a hash of its full configuration; a rerun
skips runs whose file holds the same hash and status "ok", and reruns changed or failed ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from orthofx.errors import OptionError
from orthofx.experiment.demo import EXPERIMENTS, KAPPA_FIELDS, DemoRow
from orthofx.experiment.train import ExperimentConfig, _jsonable

__all__ = [
    "STUDY_ROWS", "BASELINE", "row_slug", "Profile", "PROFILES", "SCHEDULES", "RunSpec", "plan_study", "config_hash",
    "needs_run", "write_json_atomic", "execute_run", "StepLogger", "t_quantile", "paired_comparison",
    "verdict", "analyze", "format_results_md", "study",
]

SCHEMA = 1
BASELINE = "SVD"
_SOC = (("ow_method", "soc"),)
_SOC_A = (("ow_method", "soc"), ("ow_target", "generator"))

#: the study's rows (both experiments): label, preset, backend, OrthoConfig overrides
STUDY_ROWS: tuple[DemoRow, ...] = (
    DemoRow("SVD", "svd"),
    DemoRow("NS", "svd", "ns"),
    DemoRow("NOG", "nog"),
    DemoRow("OLR", "olr"),
    DemoRow("SN", "sn"),
    DemoRow("OL", "ol"),
    DemoRow("OW(expm)", "ow"),
    DemoRow("OW(soc)", "ow", ortho=_SOC),
    DemoRow("NOG+OW(soc)", "nog+ow", ortho=_SOC_A),
    DemoRow("NOG+OW+OLR(soc)", "nog+ow+olr", ortho=_SOC_A),
    DemoRow("NOG+OW(expm, A)", "nog+ow", ortho=(("ow_target", "generator"),)),
    DemoRow("NOG+OW(expm, W)", "nog+ow", ortho=(("ow_target", "weight"),)),
    DemoRow("NOG(‖G‖)", "nog", ortho=(("nog_scale", "frobenius"),)),
)

#: wall time of a row relative to the experiment's SVD row (measured on this machine, one thread;
#: absent = 1.0), for the estimate and to run the longest rows of a seed first
ROW_COSTS: dict[str, dict[str, float]] = {
    "dbn": {"OW(expm)": 1.2, "OW(soc)": 3.0, "NOG+OW(soc)": 3.0, "NOG+OW+OLR(soc)": 3.1, "NOG+OW(expm, A)": 1.3,
            "NOG+OW(expm, W)": 2.05},
    "gcp": {"OW(expm)": 1.0, "OW(soc)": 2.1, "NOG+OW(soc)": 2.2, "NOG+OW+OLR(soc)": 2.3, "NOG+OW(expm, A)": 1.1,
            "NOG+OW(expm, W)": 1.16},
}

#: lr schedule per experiment: (chunks of the run, chunks after which lr ÷ 10) — see module doc
SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {"dbn": (7, (2, 4, 6)), "gcp": (4, (2, 3))}


@dataclass(frozen=True)
class Profile:
    """Model size and run settings of one study profile.

    ``model_kwargs``/``batch_size`` per experiment; ``seconds_per_run``: measured wall seconds of
    one SVD run of each experiment at ``steps`` on one thread (for the time estimate only)."""

    name: str
    steps: int
    batch_size: Mapping[str, int]
    model_kwargs: Mapping[str, Mapping[str, Any]]
    test_limit: int | None
    recalibrate_batches: int
    log_every: int
    device: str
    seconds_per_run: Mapping[str, float]
    seeds: int = 6
    smoke: bool = False
    dataset_limit_note: str = ""


_DBN_STEM = {"stem_kernel": 5, "stem_channels": 64, "stem_stride": 2}
PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        "cpu", 2000, {"dbn": 32, "gcp": 16},
        {"dbn": {**_DBN_STEM, "widths": (8, 16, 32)}, "gcp": {"reduced": 64, "widths": (8, 16, 64)}},
        test_limit=None, recalibrate_batches=12, log_every=10, device="cpu",
        seconds_per_run={"dbn": 52.0, "gcp": 48.0},  # idle core; 91 s and 83 s measured with the cores shared
    ),
    "gpu": Profile(
        "gpu", 8000, {"dbn": 128, "gcp": 128},
        {"dbn": {**_DBN_STEM, "widths": (32, 64, 128), "blocks": 2},
         "gcp": {"reduced": 64, "widths": (32, 64, 128), "blocks": 2}},
        test_limit=None, recalibrate_batches=12, log_every=20, device="auto",
        seconds_per_run={"dbn": 160.0, "gcp": 200.0},  # a guess until measured on the card
    ),
    "quick": Profile(
        "quick", 14, {"dbn": 8, "gcp": 8},
        {"dbn": {**_DBN_STEM, "widths": (8, 16, 32)}, "gcp": {"reduced": 64, "widths": (8, 16, 64)}},
        test_limit=64, recalibrate_batches=1, log_every=5, device="cpu",
        seconds_per_run={"dbn": 0.8, "gcp": 0.8}, seeds=2, smoke=True,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of the study: where its file goes, its config and the hash that keys it."""

    experiment: str
    row: DemoRow
    seed: int
    config: ExperimentConfig
    log_every: int
    profile: str
    smoke: bool
    path: str
    hash: str
    est_seconds: float


def config_hash(experiment: str, row: DemoRow, cfg: ExperimentConfig, log_every: int, smoke: bool) -> str:
    """16 hex digits of SHA-256 over everything that determines a run's result (the row, the
    full :class:`ExperimentConfig` except its output directory/progress/name, the log cadence)."""
    c = cfg.to_dict()
    for k in ("out", "progress", "name"):
        c.pop(k, None)
    key = {"schema": SCHEMA, "experiment": experiment, "smoke": smoke, "log_every": log_every,
           "row": {"label": row.label, "treatment": row.treatment, "backend": row.backend,
                   "ortho": dict(row.ortho), "model_kwargs": dict(row.model_kwargs), "transform": row.transform},
           "config": c}
    blob = json.dumps(_jsonable(key), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def row_slug(label: str) -> str:
    """File-system name of a row: lower case, runs of other characters → one "-"
    ("NOG+OW(expm, A)" → "nog-ow-expm-a")."""
    return re.sub(r"[^0-9a-z]+", "-", label.lower()).strip("-")


def _row_by_name(name: str) -> DemoRow:
    for r in STUDY_ROWS:
        if name == r.label or name.lower() == row_slug(r.label):
            return r
    raise OptionError("rows", name, f"unknown row; rows (label or slug): "
                      + ", ".join(f"{r.label!r} ({row_slug(r.label)})" for r in STUDY_ROWS))


def plan_study(
    out: str | Path,
    *,
    experiments: Sequence[str] = ("dbn", "gcp"),
    rows: Sequence[str] | None = None,
    seeds: int = 6,
    profile: str = "cpu",
    steps: int | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
) -> list[RunSpec]:
    """Every run of the study, **seed-major** (all rows of seed 0, then seed 1, …, so paired
    comparisons accumulate early), within a seed the longest rows first (load balance)."""
    prof = PROFILES[profile]
    steps = prof.steps if steps is None else steps
    chosen = list(STUDY_ROWS) if rows is None else [_row_by_name(r) for r in rows]
    chosen = list(dict.fromkeys(chosen))
    out = Path(out)
    specs: list[RunSpec] = []
    for seed in range(seeds):
        batch: list[RunSpec] = []
        for key in experiments:
            exp = EXPERIMENTS[key]
            chunks, drops = SCHEDULES[key]
            per_chunk = math.ceil(steps / chunks)
            bs = prof.batch_size[key]
            for row in chosen:
                slug = row_slug(row.label)
                cfg = ExperimentConfig(
                    dataset=dataset, data_dir=data_dir, model=exp.model,
                    model_kwargs={**dict(prof.model_kwargs[key]), **dict(row.model_kwargs)},
                    treatment=row.treatment, ortho=dict(row.ortho), transform=row.transform, backend=row.backend,
                    guard_nonfinite=True, epochs=chunks, milestones=drops, gamma=0.1, batch_size=bs, lr=0.1,
                    momentum=0.9, weight_decay=5e-4, train_limit=per_chunk * bs, test_limit=prof.test_limit,
                    seed=seed, monitor_every=prof.log_every, recalibrate_batches=prof.recalibrate_batches,
                    eval_every=chunks, resume=False, device=prof.device, progress=False, name=row.label,
                    out=str(out / key / slug / f"seed{seed}.work"),
                )
                h = config_hash(key, row, cfg, prof.log_every, prof.smoke)
                est = prof.seconds_per_run[key] * ROW_COSTS[key].get(row.label, 1.0) * (per_chunk * chunks) / prof.steps
                batch.append(RunSpec(key, row, seed, cfg, prof.log_every, prof.name, prof.smoke,
                                     str(out / key / slug / f"seed{seed}.json"), h, est))
        specs += sorted(batch, key=lambda s: -s.est_seconds)  # stable: ties keep the row order
    return specs


def needs_run(spec: RunSpec) -> str | None:
    """Why ``spec`` must run ("new", "changed", "failed", "unreadable"), or None when its file
    holds a finished run with the same config hash."""
    p = Path(spec.path)
    if not p.exists():
        return "new"
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return "unreadable"
    if rec.get("hash") != spec.hash:
        return "changed"
    if rec.get("status") != "ok":
        return "failed"
    return None


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
    S = aY₀ᵀ − Y₀aᵀ (a, Y₀ = ``base`` in tall form); for SOC ‖L‖_F of the kernel and
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
                elif hasattr(p0, "base") and hasattr(p0, "_to_tall"):
                    kind = "flat-ow"
                    a, y0 = p0._to_tall(A).double(), p0.base.double()
                    vals[3] = torch.linalg.matrix_norm(a @ y0.T - y0 @ a.T, ord=2)
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


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def final_kappa(klog: Mapping[str, Mapping[str, list]], tail: float = 0.1) -> dict[str, float]:
    """Final κ per convention: the median over the records of the last ``tail`` of the steps (all
    meta-layers); ``kappa_range`` over those at the smallest numerical rank among them (a rounding
    eigenvalue crossing the rank tolerance only adds to the rank, see the demo's ``_run_kappa``)."""
    out: dict[str, float] = {}
    for key in KAPPA_FIELDS:
        vals: list[float] = []
        for col in klog.values():
            steps = col["step"]
            if not steps:
                continue
            lo = max(steps) - tail * max(steps)
            idx = [i for i, s in enumerate(steps) if s >= lo]
            if key == "kappa_range":
                ranks = [_num(col["rank"][i]) for i in idx if math.isfinite(_num(col["rank"][i]))]
                if ranks:
                    idx = [i for i in idx if _num(col["rank"][i]) == min(ranks)]
            vals += [_num(col[key][i]) for i in idx if not math.isnan(_num(col[key][i]))]
        out[key] = statistics.median(vals) if vals else math.nan
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


# ---------------------------------------------------------------------------- statistics
def _t_abs_cdf(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (closed forms, Abramowitz & Stegun 26.7.3–4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        acc, term = 0.0, 1.0
        if df > 1:
            acc = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                acc += term
        return 2 / math.pi * (theta + (s * math.cos(theta) * acc if df > 1 else 0.0))
    acc, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        acc += term
    return s * acc


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer ``df`` ≥ 1 (bisection on the exact CDF to
    ~1e-12; no scipy needed)."""
    if not 0 < p < 1 or int(df) != df or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and integer df >= 1, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)  # P(|T| <= q)
    lo, hi = 0.0, 1.0
    while _t_abs_cdf(hi, int(df)) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_abs_cdf(mid, int(df)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    q = (lo + hi) / 2
    return q if p > 0.5 else -q


def verdict(n: int, ci_low: float, ci_high: float, mde: float, *, better: str = "better than SVD",
            worse: str = "worse than SVD", digits: int = 2) -> str:
    """Wording for a paired difference (row − SVD, lower is better): ``better``/``worse`` only
    when the 95 % CI excludes 0; "too few seeds" below 3 pairs; else no difference detected."""
    if n < 3:
        return f"too few seeds ({n} pair{'s' if n != 1 else ''} < 3)"
    if ci_high < 0:
        return better
    if ci_low > 0:
        return worse
    return f"no difference detected (effects below ±{mde:.{digits}f} cannot be excluded)"


def paired_comparison(row: Mapping[int, float], base: Mapping[int, float], **wording: Any) -> dict[str, Any]:
    """Paired differences d_k = row[k] − base[k] over the seeds k where both are finite: n, mean,
    sd (n − 1), 95 % CI mean ± t_{0.975,n−1}·sd/√n, MDE = (t_{0.975,n−1} + t_{0.80,n−1})·sd/√n and
    the :func:`verdict` (``wording`` goes to it)."""
    seeds = sorted(k for k in row if k in base and math.isfinite(_num(row[k])) and math.isfinite(_num(base[k])))
    d = [float(row[k]) - float(base[k]) for k in seeds]
    n = len(d)
    out: dict[str, Any] = {"n": n, "seeds": seeds, "diffs": d, "mean": math.nan, "sd": math.nan,
                           "ci_low": math.nan, "ci_high": math.nan, "mde": math.nan}
    if n >= 1:
        out["mean"] = statistics.fmean(d)
    if n >= 2:
        sd = statistics.stdev(d)
        se = sd / math.sqrt(n)
        t975, t80 = t_quantile(0.975, n - 1), t_quantile(0.80, n - 1)
        out.update(sd=sd, ci_low=out["mean"] - t975 * se, ci_high=out["mean"] + t975 * se, mde=(t975 + t80) * se)
    out["verdict"] = verdict(n, out["ci_low"], out["ci_high"], out["mde"], **wording)
    return out


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def _log10(x: Any) -> float:
    v = _num(x)
    return math.log10(v) if v > 0 and math.isfinite(v) else math.nan


def analyze(runs: Sequence[Mapping[str, Any]], baseline: str = BASELINE) -> dict[str, Any]:
    """Per experiment and row: test error mean ± SD over the finished seeds and the paired
    comparison with ``baseline`` (:func:`paired_comparison`), the same for log10 of the final
    κ_range (lower = better conditioned), failures with their first error line, non-finite steps,
    solver exceptions, and whether the paired seeds shared the initial weights. Pure."""
    order = {r.label: i for i, r in enumerate(STUDY_ROWS)}
    result: dict[str, Any] = {}
    for exp in sorted({r["experiment"] for r in runs}):
        rs = [r for r in runs if r["experiment"] == exp]
        ok = [r for r in rs if r.get("status") == "ok"]
        err = lambda label: {int(r["seed"]): _num(r.get("final_test_error")) for r in ok if r["label"] == label}  # noqa: E731
        kap = lambda label: {int(r["seed"]): _log10((r.get("final_kappa") or {}).get("kappa_range")) for r in ok if r["label"] == label}  # noqa: E731
        digest = {(r["label"], int(r["seed"])): r.get("init_digest") for r in ok}
        base_err, base_kap = err(baseline), kap(baseline)
        rows = []
        for label in sorted({r["label"] for r in rs}, key=lambda s: (order.get(s, len(order)), s)):
            mine = [r for r in rs if r["label"] == label]
            e = err(label)
            m, sd = _mean_sd(list(e.values()))
            k = kap(label)
            km, ksd = _mean_sd(list(k.values()))
            failed = [r for r in mine if r.get("status") != "ok"]
            entry: dict[str, Any] = {
                "label": label, "seeds_ok": sorted(e), "seeds_failed": sorted(int(r["seed"]) for r in failed),
                "test_error_mean": m, "test_error_sd": sd, "test_errors": e,
                "log10_kappa_range_mean": km, "log10_kappa_range_sd": ksd,
                "nonfinite_steps": sum(int(r.get("nonfinite_steps") or 0) for r in mine if r.get("status") == "ok"),
                "solver_exceptions": sum(int(r.get("solver_exceptions") or 0) for r in mine if r.get("status") == "ok"),
                "steps": sum(int(r.get("steps") or 0) for r in mine if r.get("status") == "ok"),
                "errors": sorted({str(r.get("error") or "").splitlines()[0] if r.get("error") else "unknown" for r in failed}),
            }
            if label != baseline:
                entry["vs_baseline"] = paired_comparison(e, base_err)
                entry["kappa_vs_baseline"] = paired_comparison(
                    k, base_kap, better="better conditioned than SVD", worse="worse conditioned than SVD")
                pairs = entry["vs_baseline"]["seeds"]
                entry["same_init_pairs"] = sum(
                    1 for s in pairs if digest.get((label, s)) and digest.get((label, s)) == digest.get((baseline, s)))
            rows.append(entry)
        result[exp] = {"rows": rows, "runs_ok": len(ok), "runs_failed": len(rs) - len(ok)}
    return result


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
                d = f"{_f(vs['mean'], sign=True)} [{_f(vs['ci_low'], sign=True)}, {_f(vs['ci_high'], sign=True)}]"
                dk = f"{_f(kv['mean'], sign=True)} [{_f(kv['ci_low'], sign=True)}, {_f(kv['ci_high'], sign=True)}]"
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
    return "\n".join(lines) + "\n"


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
