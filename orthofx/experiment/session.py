"""One training run's objects and its step, shared by :func:`orthofx.experiment.train.run`
and the demo's interleaved step timing.

:func:`build_session` builds the model, ``orthofx.transform``s it (as a user would), builds
SGD, ``orthofx.attach``es NOG/OLR and the LR schedule. :func:`train_step` runs one step; with
``guard_nonfinite`` it counts and neutralises non-finite steps on the device (no host sync)
and counts solver exceptions instead of crashing. :class:`WeightTracker` records ‖W‖_F and
σ_max/σ_min(W) of every Pre-SVD layer over training; :class:`RawKappaRecorder` records κ for
models that are not orthofx meta-layers (the raw ``torch.linalg.eigh`` baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.monitor.weights import weight_summary

__all__ = ["Session", "build_session", "train_step", "WeightTracker", "RawKappaRecorder", "SOLVER_ERRORS"]

#: exceptions counted as solver failures by a guarded step (LAPACK/cuSOLVER non-convergence)
SOLVER_ERRORS: tuple[type[BaseException], ...] = (torch.linalg.LinAlgError,)


@dataclass
class Session:
    """The live objects of one run (see :func:`build_session`)."""

    model: nn.Module  # the transformed model (or the model as written when transform=False)
    net: nn.Module  # what the forward calls (DDP wrapper or ``model``)
    opt: torch.optim.Optimizer
    handle: Any  # orthofx.attach handle or None
    sched: Any
    scaler: Any
    amp_dtype: torch.dtype | None
    report: Any
    producers: list[str]
    device: torch.device
    guard: bool
    nonfinite_steps: torch.Tensor  # device int64 counter (guarded steps skipped for NaN/Inf)
    solver_exceptions: int = 0  # forward/backward solver exceptions (host count; they sync anyway)
    params: list[nn.Parameter] = field(default_factory=list)


def build_session(cfg: Any, data: Any, device: torch.device, world: int = 1) -> Session:
    """Model → ``orthofx.transform`` → SGD → ``orthofx.attach`` → MultiStepLR for ``cfg``
    (an :class:`~orthofx.experiment.train.ExperimentConfig`)."""
    import orthofx
    from orthofx.models import build_model

    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.backend, cfg.eps, **cfg.model_kwargs)
    if cfg.transform:
        gm, report = orthofx.transform(model, (data.example,), config=cfg.ortho_config())
        producers = list(getattr(report, "producers", []))
    else:  # trained as written; the analysis (which changes nothing) still names the Pre-SVD layers
        gm, report = model, None
        producers = list(orthofx.analyze(model, (data.example,)).producers)
    gm.to(device)
    net: nn.Module = gm
    if world > 1:
        net = nn.parallel.DistributedDataParallel(gm, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(gm.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    handle = orthofx.attach(opt, gm) if cfg.transform else None
    if handle is not None and not handle.active:  # no NOG/OLR: no treatment statistics
        handle = None
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if cfg.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    return Session(
        gm, net, opt, handle, sched, scaler, amp_dtype, report, producers, device, bool(cfg.guard_nonfinite),
        torch.zeros((), dtype=torch.int64, device=device), 0, [p for p in gm.parameters() if p.requires_grad],
    )


def train_step(s: Session, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """One SGD step on ``(x, y)``; returns the detached loss (0 for a neutralised step), or
    None when a solver exception skipped the step (guarded sessions only).

    Guarded: a step whose loss or any gradient is not finite gets all-zero gradients before
    ``optimizer.step`` (momentum and weight decay still act; no host sync, the decision stays
    on the device) and is counted in ``s.nonfinite_steps``."""
    import orthofx

    try:
        with torch.autocast(s.device.type, dtype=s.amp_dtype or torch.float32, enabled=s.amp_dtype is not None):
            logits = s.net(x)
            loss = F.cross_entropy(logits.float(), y)
            if s.report is not None:
                loss = loss + orthofx.orthogonality_loss(s.model)
        s.opt.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
    except SOLVER_ERRORS:
        if not s.guard:
            raise
        s.solver_exceptions += 1
        s.opt.zero_grad(set_to_none=True)
        return None
    if s.guard:
        grads = [p.grad for p in s.params if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        s.nonfinite_steps += (~finite).to(torch.int64)
        keep = finite.to(grads[0].dtype) if grads else None
        for g in grads:
            g.nan_to_num_(0.0, 0.0, 0.0).mul_(keep)
        loss = torch.where(finite, loss.detach(), torch.zeros_like(loss))
    s.scaler.step(s.opt)
    s.scaler.update()
    return loss.detach()


def _weight(module: nn.Module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)  # a parametrized weight reads its effective value
    return w if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


class WeightTracker:
    """‖W‖_F and σ_max/σ_min(W) (float64 singular values of the flattened (out, in·k·k) weight,
    σ_min the smallest of min(out, in·k·k)) of every Pre-SVD layer, every ``every`` steps.
    Values stay on the device until :meth:`records` (one sync)."""

    def __init__(self, model: nn.Module, producers: list[str], every: int, run: str) -> None:
        mods = dict(model.named_modules())
        self.modules = {p: mods[p] for p in producers if p in mods}
        self.every, self.run, self._step = every, run, 0
        self._pending: list[tuple[int, str, torch.Tensor]] = []
        self._records: list[dict[str, Any]] = []

    def step(self) -> None:
        if self._step % self.every == 0:
            with torch.no_grad():
                for name, m in self.modules.items():
                    w = _weight(m)
                    if w is not None:  # [‖W‖_F, σ_max/σ_min, σ_max, σ_min], float64 (monitor's)
                        self._pending.append((self._step, name, weight_summary(w)[:2]))
        self._step += 1

    def records(self) -> list[dict[str, Any]]:
        if self._pending:
            values = torch.stack([v.cpu() for _, _, v in self._pending]).tolist()
            for (step, name, _), (norm, cond) in zip(self._pending, values):
                self._records.append({"run": self.run, "step": step, "producer": name,
                                      "weight_norm": norm, "weight_cond": cond})
            self._pending.clear()
        return self._records


def kappa_conventions(lam: torch.Tensor, eps: float, unit_roundoff: float) -> dict[str, float]:
    """κ of a batch of ascending eigenvalues ``lam`` (..., n) of Σ + εI in the monitor's
    conventions (:mod:`orthofx.monitor.spectrum` when it is available, the same definitions
    otherwise), medians over the batch: ``kappa`` = λ_max/λ_min of Σ + εI; ``rank`` r =
    #{μ > n·u·max|λ|} with μ = λ − ε; ``kappa_range`` = μ_max/μ_r; ``kappa_paper`` =
    σ_max/max(σ_min, u·σ_max) with σ = |μ| (Σ without ε, σ_min at the rounding floor)."""
    try:
        from orthofx.monitor.spectrum import SPECTRUM_FIELDS, summarize_spectrum
    except ImportError:
        SPECTRUM_FIELDS, summarize_spectrum = None, None
    lam2 = lam.detach().to(torch.float64).reshape(-1, lam.shape[-1])
    if summarize_spectrum is not None:
        vals = summarize_spectrum(lam2, eps, unit_roundoff).tolist()
        out = dict(zip(SPECTRUM_FIELDS, vals))
    else:
        kap = torch.where(lam2[:, 0] > 0, lam2[:, -1] / lam2[:, 0], torch.full_like(lam2[:, 0], math.inf))
        mu = lam2 - eps
        tol = torch.maximum(lam2[:, :1].abs(), lam2[:, -1:].abs()) * (lam2.shape[-1] * unit_roundoff)
        above = mu > tol
        rank = above.sum(-1).to(torch.float64)
        mu_r = torch.where(above, mu, torch.inf).amin(-1)
        kr = torch.where(rank > 0, mu[:, -1] / mu_r, torch.nan)
        sig = mu.abs()
        smax = sig.amax(-1)
        kp = smax / torch.maximum(sig.amin(-1), smax * unit_roundoff)
        out = {"kappa": float(kap.median()), "kappa_max": float(kap.max()), "lambda_max": float(lam2[:, -1].max()),
               "lambda_min": float(lam2[:, 0].min()), "rank": float(rank.median()),
               "kappa_range": float(kr.median()), "kappa_paper": float(kp.median())}
    out["eps"] = eps
    out["kind"] = "meta"
    return out


class RawKappaRecorder:
    """κ records (the monitor's record format) for modules that keep their own float64
    eigenvalues in ``last_eigenvalues`` and an ``eps`` (e.g. :class:`RawEighCovPool`); reads
    them every ``every`` steps (one host sync per recorded step: for the baseline row only)."""

    def __init__(self, model: nn.Module, every: int, run: str) -> None:
        self.modules = {n: m for n, m in model.named_modules() if hasattr(m, "last_eigenvalues")}
        self.every, self.run, self._step = every, run, 0
        self.records: list[dict[str, Any]] = []

    def step(self, solver_failures: int = 0) -> None:
        if self._step % self.every == 0:
            for name, m in self.modules.items():
                lam = m.last_eigenvalues
                if lam is not None:
                    rec = {"run": self.run, "step": self._step, "layer": name}
                    u = torch.finfo(getattr(m, "compute_dtype", torch.float32)).eps
                    rec.update(kappa_conventions(lam, float(m.eps), u))
                    rec["solver_failures"] = solver_failures
                    self.records.append(rec)
        self._step += 1

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name in self.modules:
            recs = [r for r in self.records if r["layer"] == name]
            if not recs:
                continue
            ks = [r["kappa"] for r in recs if not math.isnan(r["kappa"])]
            out[name] = {
                "kappa_median": float(torch.tensor(ks, dtype=torch.float64).median()) if ks else math.nan,
                "kappa_final": recs[-1]["kappa"],
                "kappa_max": max(ks) if ks else math.nan,
                "solver_failures": recs[-1]["solver_failures"],
                "records": len(recs),
                "nan_records": len(recs) - len(ks),
            }
        return out
