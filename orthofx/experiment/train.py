"""The training loop behind ``orthofx demo`` and ``orthofx train``.

One function, :func:`run`, takes an :class:`ExperimentConfig` and does, in order: load data,
build the (unmodified) model, ``orthofx.transform`` it with the configured treatments, build
SGD + MultiStepLR, ``orthofx.attach`` NOG/OLR, train with the conditioning monitor on,
evaluate, and write a results JSON. It checkpoints every epoch and resumes from the last
checkpoint, and runs unchanged under ``torchrun`` (DDP; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ConfigError
# the run's configuration and data live in their own modules; these names stay importable from
# here (``_run`` looks ``_load_data`` up in this module, so patching ``train._load_data`` works)
from orthofx.experiment.config import ExperimentConfig, load_config
from orthofx.experiment.loaders import _Dist, _init_distributed, _load_data

__all__ = ["ExperimentConfig", "run", "load_config"]


# ---------------------------------------------------------------------------- run
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def _device(cfg: ExperimentConfig, d: _Dist) -> torch.device:
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = cfg.device
    if kind == "cuda":
        return torch.device("cuda", d.local_rank)
    return torch.device(kind)


@torch.no_grad()
def recalibrate_statistics(model: nn.Module, loader: Any, device: torch.device, batches: int) -> int:
    """Reset the running statistics of every BatchNorm / DecorrelatedBatchNorm in ``model`` and
    re-estimate them as the cumulative average over ``batches`` training batches (train-mode
    forwards without gradient). Returns the number of batches used."""
    from orthofx.nn import DecorrelatedBatchNorm

    norms = [
        m for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, DecorrelatedBatchNorm)) and m.track_running_stats
    ]
    if not norms or batches <= 0:
        return 0
    saved = {m: m.momentum for m in norms}
    was_training = model.training
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x, _ in loader:
            if used >= batches:
                break
            model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was_training)
    return used


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train()
    return {"test_error": 100.0 * (1 - correct / max(total, 1)), "test_loss": loss_sum / max(total, 1)}


def run(cfg: ExperimentConfig, *, log: Any = print, observer: Any = None) -> dict[str, Any]:
    """Train one configuration and return (and write to ``out/results.json``) its results:
    test error, κ summary (median/final), solver failures, ms per step, OLR/NOG statistics.

    ``observer``: optional ``session -> object`` with ``step()`` (called after every training
    step) and ``records()`` (called once at the end; its value is the result's ``"observer"``
    entry), e.g. :class:`orthofx.experiment.study.StepLogger`. None (default) changes nothing.

    Under torchrun, a process group that ``run`` created is torn down before it returns (a
    barrier, then a garbage collection and ``destroy_process_group``): a gloo group, or gloo work
    held by cyclic garbage, left to interpreter exit can abort a rank ("terminate called without
    an active exception")."""
    device_kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    owned = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = _init_distributed(device_kind)
    try:
        results = _run(cfg, d, log, observer)
        if owned:
            dist.barrier()  # on success only: a failed rank must not leave the others waiting
        return results
    finally:
        if owned and dist.is_initialized():
            # the training objects (DDP's reducer, optimizer hooks) sit in reference cycles; freed
            # at interpreter exit, gloo work they hold can abort the rank (SIGABRT while acquiring
            # the GIL of a finalising interpreter), so free them while it is alive
            gc.collect()
            dist.destroy_process_group()


def _run(cfg: ExperimentConfig, d: _Dist, log: Any, observer: Any = None) -> dict[str, Any]:
    from orthofx.experiment.session import WeightTracker, build_session, train_step
    from orthofx.monitor import ConditioningMonitor

    device = _device(cfg, d)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    data = _load_data(cfg, d)

    sess = build_session(cfg, data, device, d.world)
    gm, net, opt, handle, sched, scaler = sess.model, sess.net, sess.opt, sess.handle, sess.sched, sess.scaler
    report, amp_dtype = sess.report, sess.amp_dtype
    if cfg.transform:
        monitor: Any = ConditioningMonitor(gm, every=cfg.monitor_every, run=cfg.run_name)
    else:
        monitor = _RawMonitor(gm, cfg.monitor_every, cfg.run_name, sess)
    weights = WeightTracker(gm, sess.producers, cfg.monitor_every, cfg.run_name)
    obs = observer(sess) if observer is not None else None

    ckpt_path = out / "checkpoint.pt"
    start_epoch, history = 0, []
    if cfg.resume and ckpt_path.exists():
        try:  # the checkpoint holds plain data and tensors only: no pickled code runs on resume
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"cannot resume from {ckpt_path}: it is not a checkpoint of `orthofx train` that loads "
                f"with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "use another --out or delete it"
            ) from e
        if not isinstance(ck, dict) or not isinstance(ck.get("config"), dict):
            raise ConfigError(f"{ckpt_path} is not a checkpoint of `orthofx train` (it holds no run config); "
                              "use another --out or --no-resume")
        differ = [f"{f} {ck['config'].get(f)!r} there, {getattr(cfg, f)!r} here" for f in _RESUME_FIELDS
                  if ck["config"].get(f) != getattr(cfg, f)]
        if differ:  # only the fields that differ, not the whole config
            raise ConfigError(f"{ckpt_path} was written by a different run ({'; '.join(differ)}); "
                              "use another --out or --no-resume")
        gm.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        monitor.records.extend(ck["monitor"])
        start_epoch, history = ck["epoch"], ck["history"]
        monitor._step = ck["step"]
        if d.main:
            log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    use_tqdm = cfg.progress and d.main
    if use_tqdm:
        from orthofx._optional import require

        tqdm = require("tqdm.auto", "cli", purpose="the progress bar (or pass progress=False)").tqdm
    step_times: list[float] = []
    gm.train()
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        elif hasattr(getattr(data.train, "sampler", None), "set_epoch"):
            data.train.sampler.set_epoch(epoch)
        it = data.train
        if use_tqdm:
            it = tqdm(it, desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        loss_acc = torch.zeros((), device=device)
        nb = 0
        for x, y in it:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = train_step(sess, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            monitor.step()
            weights.step()
            if obs is not None:
                obs.step()
            if loss is None:  # a solver exception skipped this step (guarded runs)
                continue
            loss_acc += loss.detach()
            nb += 1
        sched.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            if cfg.recalibrate_batches:
                recalibrate_statistics(gm, data.train, device, cfg.recalibrate_batches)
            ev: dict[str, Any] = _evaluate(gm, data.test, device, amp_dtype)
        else:
            ev = {"test_error": math.nan, "test_loss": math.nan}
        ev.update(epoch=epoch + 1, train_loss=float(loss_acc) / max(nb, 1), lr=opt.param_groups[0]["lr"])
        history.append(ev)
        monitor.flush()
        if d.main:
            log(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs}: train loss {ev['train_loss']:.4f}, "
                f"test error {ev['test_error']:.2f}%")
            torch.save(
                {
                    "config": cfg.to_dict(),
                    "orthofx": getattr(gm, "_orthofx_meta", {}).get("orthofx"),
                    "model": gm.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "monitor": monitor.records,
                    "epoch": epoch + 1,
                    "step": monitor._step,
                    "history": history,
                },
                ckpt_path,
            )

    replicas_identical = None
    if d.world > 1:  # DDP: every rank must end with bit-identical weights
        flat = torch.cat([p.detach().reshape(-1).float() for p in gm.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        replicas_identical = bool(torch.equal(hi, lo))
    summary = monitor.summary()
    warm = step_times[min(5, len(step_times) // 4):] or step_times
    results = {
        "run": cfg.run_name,
        "config": cfg.to_dict(),
        "report": report.to_dict() if hasattr(report, "to_dict") else str(report),
        "history": history,
        "final_test_error": history[-1]["test_error"] if history else None,
        "kappa": summary,
        "kappa_records": [dict(r) for r in monitor.records],
        "weight_records": weights.records(),
        "nonfinite_steps": int(sess.nonfinite_steps),
        "solver_exceptions": sess.solver_exceptions,
        "steps": len(step_times),
        "ms_per_step": 1000.0 * sum(warm) / max(len(warm), 1) if warm else None,
        "treatment_stats": _treatment_stats(handle),
        "world_size": d.world,
        "replicas_identical": replicas_identical,
    }
    if obs is not None:
        results["observer"] = obs.records()
    if d.main:
        monitor.to_csv(out / "kappa.csv")
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    monitor.close()
    if handle is not None:
        handle.remove()
    return results


class _RawMonitor:
    """The monitor's interface for a model that holds no orthofx meta-layer (``transform=False``):
    κ from the modules' own ``last_eigenvalues`` (:class:`~orthofx.experiment.session.RawKappaRecorder`)."""

    def __init__(self, model: nn.Module, every: int, run: str, sess: Any) -> None:
        from orthofx.experiment.session import RawKappaRecorder

        self._rec, self._sess = RawKappaRecorder(model, every, run), sess
        self.records = self._rec.records

    @property
    def _step(self) -> int:
        return self._rec._step

    @_step.setter
    def _step(self, value: int) -> None:
        self._rec._step = value

    def step(self) -> None:
        self._rec.step(self._sess.solver_exceptions)

    def flush(self) -> list[dict[str, Any]]:
        return []

    def summary(self) -> dict[str, dict[str, float]]:
        return self._rec.summary()

    def to_csv(self, path: Path) -> None:
        import csv

        keys = sorted({k for r in self.records for k in r})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)

    def close(self) -> None:
        pass


#: the fields a checkpoint in ``out`` must share with the run that resumes from it
_RESUME_FIELDS = ("treatment", "model")


def _treatment_stats(handle: Any) -> dict[str, Any]:
    """The attach handle's counters plus an OLR summary: how often η* was used (0 < η* < lr)
    and its median, which shows whether OLR effectively freezes the Pre-SVD layer."""
    if handle is None:
        return {}
    stats = dict(handle.stats())
    if handle.olr:
        hist = handle.olr_history()
        eta, lr, base = (hist[k].double().cpu() for k in ("eta", "lr", "base"))
        if eta.numel():
            active = (eta > 0) & (eta < base)
            stats["olr_active_fraction"] = float(active.double().mean())
            stats["olr_eta_median"] = float(eta.nanmedian())  # η* is NaN where w = 0 (OW generator at step 0)
            stats["olr_eta_nan_fraction"] = float(torch.isnan(eta).double().mean())
            stats["olr_lr_over_scheduled_median"] = float((lr / base).median())
    return stats


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
