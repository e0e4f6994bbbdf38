"""The plan of ``orthofx study``: its rows (:data:`STUDY_ROWS`), schedules, profiles and runs
(:func:`plan_study`), each keyed by a hash of its full configuration (:func:`config_hash`,
:func:`needs_run`).

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
* whole study (17 rows × 2 experiments × 6 seeds = 204 runs) on 2 workers: ≈ 1.9 h on idle
  cores, ≈ 3–4 h when the cores are shared (the start-up line prints the estimate).

GPU profile (``--profile gpu``; ``benchmarks/gpu_study.sh``): the same meta-layers in larger
models (widths (32, 64, 128), 2 blocks per stage), batch 128, 8000 steps, one run at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from orthofx.errors import ConfigError, OptionError
from orthofx.experiment.catalog import EXPERIMENTS, DemoRow
from orthofx.experiment.train import ExperimentConfig, _jsonable

__all__ = [
    "SCHEMA", "STUDY_ROWS", "CONTRASTS", "BASELINE", "ROW_COSTS", "SCHEDULES", "Profile", "PROFILES", "RunSpec", "config_hash",
    "row_slug", "plan_study", "needs_run",
]

SCHEMA = 1
BASELINE = "SVD"
_SOC = (("ow_method", "soc"),)
_SOC_A = (("ow_method", "soc"), ("ow_target", "generator"))
_EXPM = ("ow_method", "expm")
_CAYLEY = ("ow_method", "cayley")

#: the study's rows (both experiments): label, preset, backend, OrthoConfig overrides
STUDY_ROWS: tuple[DemoRow, ...] = (
    DemoRow("SVD", "svd"),
    DemoRow("NS", "svd", "ns"),
    DemoRow("NOG", "nog"),
    DemoRow("OLR", "olr"),
    DemoRow("SN", "sn"),
    DemoRow("OL", "ol"),
    DemoRow("OW(expm)", "ow", ortho=(_EXPM,)),
    DemoRow("OW(cayley)", "ow", ortho=(_CAYLEY,)),
    DemoRow("OW(soc)", "ow", ortho=_SOC),
    DemoRow("NOG+OW(soc)", "nog+ow", ortho=_SOC_A),
    DemoRow("NOG+OW+OLR(soc)", "nog+ow+olr", ortho=_SOC_A),
    DemoRow("NOG+OW(expm, A)", "nog+ow", ortho=(_EXPM, ("ow_target", "generator"))),
    DemoRow("NOG+OW(expm, W)", "nog+ow", ortho=(_EXPM, ("ow_target", "weight"))),
    DemoRow("NOG+OW(cayley, A)", "nog+ow", ortho=(_CAYLEY, ("ow_target", "generator"))),
    DemoRow("NOG+OW+OLR(cayley, A)", "nog+ow+olr", ortho=(_CAYLEY, ("ow_target", "generator"))),
    DemoRow("NOG+OW(cayley, W)", "nog+ow", ortho=(_CAYLEY, ("ow_target", "weight"))),
    DemoRow("NOG(‖G‖)", "nog", ortho=(("nog_scale", "frobenius"),)),
)

#: planned paired contrasts between rows (row, reference, what the contrast asks), reported by
#: ``orthofx study --report`` beside the comparisons with SVD: Δ = row − reference per seed
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("OW(cayley)", "OW(expm)", "the flat map alone: Cayley against the exponential"),
    ("OW(soc)", "OW(expm)", "OW alone: the authors' SOC against the flat exponential"),
    ("NOG+OW(cayley, A)", "NOG+OW(expm, A)", "the flat map under NOG"),
    ("NOG+OW(expm, W)", "NOG+OW(expm, A)", "NOG's target under the exponential: the weight against the generator"),
    ("NOG+OW(cayley, W)", "NOG+OW(cayley, A)", "NOG's target under the Cayley map: the weight against the generator"),
    ("NOG+OW+OLR(cayley, A)", "NOG+OW(cayley, A)", "OLR's share with the Cayley map"),
    ("NOG+OW+OLR(soc)", "NOG+OW(soc)", "OLR's share with SOC"),
    ("NOG+OW+OLR(cayley, A)", "NOG+OW+OLR(soc)", "the paper's best row: the flat Cayley map against the authors' SOC"),
    ("NOG(‖G‖)", "NOG", "NOG's step: the gradient's norm kept against unit singular values"),
)

#: wall time of a row relative to the experiment's SVD row (measured on this machine, one thread;
#: absent = 1.0), for the estimate and to run the longest rows of a seed first
ROW_COSTS: dict[str, dict[str, float]] = {
    "dbn": {"OW(expm)": 1.2, "OW(cayley)": 1.2, "OW(soc)": 3.0, "NOG+OW(soc)": 3.0, "NOG+OW+OLR(soc)": 3.1, "NOG+OW(expm, A)": 1.3,
            "NOG+OW(expm, W)": 2.05, "NOG+OW(cayley, A)": 1.3, "NOG+OW+OLR(cayley, A)": 1.35,
            "NOG+OW(cayley, W)": 1.6},
    "gcp": {"OW(expm)": 1.0, "OW(cayley)": 1.0, "OW(soc)": 2.1, "NOG+OW(soc)": 2.2, "NOG+OW+OLR(soc)": 2.3, "NOG+OW(expm, A)": 1.1,
            "NOG+OW(expm, W)": 1.16, "NOG+OW(cayley, A)": 1.1, "NOG+OW+OLR(cayley, A)": 1.15, "NOG+OW(cayley, W)": 1.15},
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


_NO_VALUE = object()
#: overrides that were defaults when the runs on disk were hashed, left out of the hash so that
#: pinning them keeps those runs: OW's map was ``"expm"`` until 2026-12-07 (now
#: :data:`orthofx.vocab.DEFAULT_OW_METHOD`), so the OW(expm) rows pin it and still match. A row
#: that uses OW must therefore name its ``ow_method`` (checked by :func:`plan_study`).
_IMPLICIT_WHEN_HASHED: dict[str, Any] = {"ow_method": "expm"}


def _hashed_overrides(items: Any) -> dict[str, Any]:
    return {k: v for k, v in items if _IMPLICIT_WHEN_HASHED.get(k, _NO_VALUE) != v}


def _check_pinned(row: DemoRow) -> None:
    """A study row that uses OW names its map (the hash leaves ``ow_method="expm"`` out, so a row
    relying on the default would share a hash with one that pins the old default)."""
    from orthofx.config import resolve_config

    if resolve_config(row.treatment).weight == "ow" and "ow_method" not in dict(row.ortho):
        raise ConfigError(f"study row {row.label!r} uses OW without naming ow_method; pin it in its overrides")


def config_hash(experiment: str, row: DemoRow, cfg: ExperimentConfig, log_every: int, smoke: bool) -> str:
    """16 hex digits of SHA-256 over everything that determines a run's result (the row, the
    full :class:`ExperimentConfig` except its output directory/progress/name and the folder of a
    named dataset, the log cadence), less the overrides that were implicit when the runs on disk
    were hashed (:data:`_IMPLICIT_WHEN_HASHED`)."""
    c = cfg.to_dict()
    for k in ("out", "progress", "name"):
        c.pop(k, None)
    if c.get("dataset") != "imagefolder":  # a named dataset: its folder is not part of the result
        c["data_dir"] = None
    ortho = _hashed_overrides(row.ortho)
    if isinstance(c.get("ortho"), Mapping):
        c["ortho"] = _hashed_overrides(c["ortho"].items())
    key = {"schema": SCHEMA, "experiment": experiment, "smoke": smoke, "log_every": log_every,
           "row": {"label": row.label, "treatment": row.treatment, "backend": row.backend,
                   "ortho": ortho, "model_kwargs": dict(row.model_kwargs), "transform": row.transform},
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
    for row in chosen:
        _check_pinned(row)
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
