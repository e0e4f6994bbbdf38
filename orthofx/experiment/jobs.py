"""Run independent experiment tasks on every CPU core: one single-threaded worker per core.

The demo's runs are small models whose many tiny batched kernels gain nothing from a second
intra-op thread (measured: 2 threads are slower than 1), so a 2-core machine is used best by
two worker processes of one thread each, every run on its own core. Runs are seeded and
deterministic on the CPU, so a run's result does not depend on which worker ran it.

Workers are started with ``spawn`` (no ``fork`` of a process that already holds torch's
thread pools) and fed the tasks in decreasing ``cost`` (longest first: the last task to
finish is a short one). A failing task stops the pool and re-raises its exception.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

__all__ = ["Task", "default_jobs", "run_tasks", "usable_cores"]


@dataclass(frozen=True)
class Task:
    """``fn(*args)`` to run in a worker. ``fn`` must be a module-level function (pickled by
    name); ``key`` names the result; ``cost`` is a relative wall-time estimate used only to
    order the tasks (longest first)."""

    key: Hashable
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    cost: float = 1.0


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def default_jobs(device: str = "auto") -> int:
    """Worker processes for ``device``: one per usable core on the CPU, 1 on CUDA (one GPU
    shared by several processes gains nothing here)."""
    uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 1 if uses_cuda else usable_cores()


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _call(item: tuple[int, Callable[..., Any], tuple[Any, ...]]) -> tuple[int, Any, float]:
    i, fn, args = item
    t0 = time.perf_counter()
    out = fn(*args)
    return i, out, time.perf_counter() - t0


def run_tasks(
    tasks: Sequence[Task],
    *,
    jobs: int = 1,
    threads: int | None = 1,
    on_done: Callable[[Task, Any, float], None] | None = None,
) -> dict[Hashable, Any]:
    """Run ``tasks`` and return ``{task.key: result}``.

    ``jobs == 1`` runs them here, in the given order (``threads`` is then the caller's
    business); ``jobs > 1`` runs them in ``min(jobs, len(tasks))`` spawned worker processes
    with ``torch.set_num_threads(threads)``, longest first. ``on_done(task, result, seconds)``
    is called in this process as each task finishes."""
    if len({t.key for t in tasks}) != len(tasks):
        raise ValueError("task keys must be unique")
    results: dict[Hashable, Any] = {}
    if jobs <= 1 or len(tasks) <= 1:
        for t in tasks:
            t0 = time.perf_counter()
            results[t.key] = t.fn(*t.args)
            if on_done is not None:
                on_done(t, results[t.key], time.perf_counter() - t0)
        return results

    import multiprocessing

    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)  # stable: ties keep their order
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(min(jobs, len(tasks)), initializer=_init_worker, initargs=(threads,))
    try:
        for i, out, secs in pool.imap_unordered(_call, [(i, tasks[i].fn, tasks[i].args) for i in order], chunksize=1):
            results[tasks[i].key] = out
            if on_done is not None:
                on_done(tasks[i], out, secs)
        pool.close()
    except BaseException:
        pool.terminate()  # a failed task (or Ctrl-C) stops every worker now
        raise
    finally:
        pool.join()
    return results
