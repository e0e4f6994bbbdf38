"""Global solver statistics and failure injection.

``solver_stats()`` returns the process-wide :class:`SolverStats`:

* ``failures``   - number of solver exceptions (``torch.linalg.LinAlgError`` and injected ones);
* ``fallbacks``  - which recovery step succeeded after a failure: ``"float64"``, ``"jitter"``,
  ``"cpu"`` (see :mod:`orthofx.linalg._solver`), plus ``"svd->eigh"`` when the SVD forward route
  rejected batch elements and recomputed them with eigh;
* ``nonfinite``  - number of batch elements whose result (eigenvalues, matrix function, polar
  factor) or custom-backward gradient (eigh, sqrtm/invsqrtm) was non-finite. It is accumulated **on the device** without a host sync, and only
  read (one sync per device) when the property is accessed.

The success path never syncs: ``failures``/``fallbacks`` only move inside an exception handler,
and ``nonfinite`` is a device-side running sum.

``inject_failures(n)`` makes the next ``n`` solver calls raise ``torch.linalg.LinAlgError``; it
exists so that tests (and the monitor's tests) can drive the recovery chain and the counters.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from orthofx.errors import ConfigError

__all__ = ["SolverStats", "solver_stats", "inject_failures"]


@dataclass
class SolverStats:
    """Failure / fallback / non-finite counters of the orthofx solvers (see module doc)."""

    failures: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    track_nonfinite: bool = True
    _nonfinite_acc: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _nonfinite_host: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- recording (called by the solvers) -------------------------------------------------
    def record_failure(self) -> None:
        """Count one solver exception."""
        with self._lock:
            self.failures += 1

    def record_fallback(self, name: str, count: int = 1) -> None:
        """Count ``count`` successful recoveries by strategy ``name``."""
        with self._lock:
            self.fallbacks[name] = self.fallbacks.get(name, 0) + count

    def record_nonfinite(self, x: Tensor, event_dims: int = 1) -> None:
        """Add the number of batch elements of ``x`` with a non-finite entry (no host sync).

        ``event_dims`` trailing dims form one element (1 for eigenvalues (..., n), 2 for
        matrices (..., m, n)).
        """
        if not self.track_nonfinite or x.numel() == 0 or _untracked(x):
            return
        with torch.no_grad():
            bad = ~torch.isfinite(x.detach())
            if event_dims > 0:
                bad = bad.flatten(-event_dims).any(-1) if x.dim() >= event_dims else bad.any()
            count = bad.sum(dtype=torch.int64)
            key = str(x.device)
            with self._lock:
                acc = self._nonfinite_acc.get(key)
                if acc is None:
                    self._nonfinite_acc[key] = count.clone()
                else:
                    acc.add_(count)

    # -- reading ----------------------------------------------------------------------------
    @property
    def nonfinite(self) -> int:
        """Non-finite batch elements seen so far (reads the device accumulators: one sync each)."""
        with self._lock:
            return self._nonfinite_host + sum(int(v.item()) for v in self._nonfinite_acc.values())

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.failures = 0
            self.fallbacks = {}
            self._nonfinite_acc = {}
            self._nonfinite_host = 0

    def as_dict(self) -> dict[str, Any]:
        """``{"failures": int, "fallbacks": {name: int}, "nonfinite": int}`` (syncs for nonfinite)."""
        nf = self.nonfinite
        with self._lock:
            return {"failures": self.failures, "fallbacks": dict(self.fallbacks), "nonfinite": nf}


def _untracked(x: Tensor) -> bool:
    """Tensors that must not reach the global accumulators: fake/meta tensors (shape
    propagation, ``torch.export`` tracing) and anything under ``torch.compile`` tracing
    (counters are not updated inside compiled regions)."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - private torch API
        return False
    return isinstance(x, FakeTensor)


_STATS = SolverStats()


def solver_stats() -> SolverStats:
    """The process-wide :class:`SolverStats` used by every orthofx solver."""
    return _STATS


_inject_lock = threading.Lock()
_inject_remaining = 0


@contextlib.contextmanager
def inject_failures(n: int) -> Iterator[None]:
    """Within the block, the next ``n`` solver calls raise ``torch.linalg.LinAlgError``.

    A "solver call" is one attempt of the recovery chain (the first try and each fallback count
    separately), so with a float32 input ``n=1`` is recovered by "float64", ``n=2`` by "jitter",
    ``n=3`` by "cpu" and ``n=4`` raises :class:`~orthofx.errors.SolverError`. Unused injections
    are dropped when the block exits. Not meant for production code.
    """
    global _inject_remaining
    if n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n!r}")
    with _inject_lock:
        previous = _inject_remaining
        _inject_remaining = n
    try:
        yield
    finally:
        with _inject_lock:
            _inject_remaining = previous


def maybe_inject_failure(what: str) -> None:
    """Raise LinAlgError if an injected failure is pending (called before every solver call)."""
    global _inject_remaining
    if _inject_remaining <= 0:  # fast path, no lock
        return
    with _inject_lock:
        if _inject_remaining <= 0:
            return
        _inject_remaining -= 1
    raise torch.linalg.LinAlgError(f"orthofx: injected failure in {what}")
