"""Step-time ratios of the demo's rows, measured side by side (:func:`interleaved_step_times`)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Sequence

import torch

from orthofx.experiment.config import ExperimentConfig

__all__ = ["interleaved_step_times"]


# ---------------------------------------------------------------------------- timing
def interleaved_step_times(
    cfgs: Sequence[ExperimentConfig], labels: Sequence[str], *, rounds: int = 5, steps: int = 2
) -> dict[str, dict[str, Any]]:
    """Seconds per training step of every config, measured fairly: all sessions are built
    first and warmed up by one untimed round (2 steps each), then each round times ``steps``
    steps of every row in turn (after one untimed step per row and round), on the same batch,
    in an order rotated every round.
    Returns per label ``{"seconds": [...per round...], "ratios": [...row/first row per round...],
    "ratio_median": ...}``; ratios are taken within a round, so load that changes between
    rounds cancels."""
    from orthofx.experiment.session import build_session, train_step
    from orthofx.experiment.train import _device, _Dist, _load_data

    d = _Dist()
    sessions = []
    batch = None
    for cfg in cfgs:
        device = _device(cfg, d)
        torch.manual_seed(cfg.seed)
        data = _load_data(cfg, d)
        if batch is None:
            batch = next(iter(data.train))
        sessions.append(build_session(cfg, data, device))
    assert batch is not None
    secs: list[list[float]] = [[] for _ in cfgs]
    n = len(sessions)
    for s in sessions:  # warm-up round: allocator, caches, lazily built optimizer state
        for _ in range(2):
            train_step(s, batch[0].to(s.device), batch[1].to(s.device))
    for rnd in range(rounds):
        for k in range(n):
            i = (k + rnd) % n
            s = sessions[i]
            x, y = batch[0].to(s.device), batch[1].to(s.device)
            train_step(s, x, y)  # warm-up (caches, lazily built state)
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(s, x, y)
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            secs[i].append((time.perf_counter() - t0) / steps)
    out = {}
    for label, ts in zip(labels, secs):
        ratios = [t / b for t, b in zip(ts, secs[0]) if b > 0]
        out[label] = {"seconds": ts, "ratios": ratios, "ratio_median": statistics.median(ratios) if ratios else math.nan}
    for s in sessions:
        if s.handle is not None:
            s.handle.remove()
    return out
