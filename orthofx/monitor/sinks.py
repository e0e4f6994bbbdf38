"""Where the monitor's numbers go: a small logger protocol and its sinks.

A sink is anything with ``log(metrics, step)`` and ``close()`` (:class:`MetricSink`). The
monitor calls ``log`` once per recorded step at each flush, with flat float metrics named
``"<field>/<label>"`` (``"kappa/layer1.whiten"``, ``"kappa_range/…"``, ``"weight_norm/conv1.weight"``;
:func:`record_metrics`), and ``close`` from :meth:`ConditioningMonitor.close`.

Sinks here: :class:`TensorBoardSink` (``SummaryWriter``), :class:`CSVSink` (long format:
``step,metric,value``), :class:`JSONLSink` (one ``{"step": …, metric: value}`` line per call),
:class:`LoggingSink` (Python ``logging``, the ``"orthofx.monitor"`` logger by default) and
:class:`CallableSink` (any ``fn(metrics, step)``).

Lightning: ``CallableSink(trainer.logger.log_metrics)`` (``Logger.log_metrics(metrics, step)``
has this signature), or, inside a LightningModule/Callback hook,
``CallableSink(lambda m, step: pl_module.log_dict(dict(m)))`` with ``monitor.flush()`` called
from that hook (``log_dict`` may only be called from hooks; the monitor logs at flushes).
A missing backend raises :class:`orthofx._optional.MissingExtraError` naming the extra to install.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from orthofx._log import logger as _root_logger
from orthofx._optional import require
from orthofx.errors import ConfigError

__all__ = [
    "MetricSink",
    "TensorBoardSink",
    "CSVSink",
    "JSONLSink",
    "LoggingSink",
    "CallableSink",
    "record_metrics",
    "METRIC_FIELDS",
]

#: record fields sent to sinks, per kind of record
METRIC_FIELDS = {
    "meta": ("kappa", "kappa_max", "kappa_range", "kappa_paper", "rank", "lambda_max", "lambda_min",
             "nonfinite_outputs", "solver_failures", "solver_fallbacks"),
    "producer": ("weight_norm", "weight_cond", "weight_sigma_max", "weight_sigma_min"),
}


@runtime_checkable
class MetricSink(Protocol):
    """Receives flat scalar metrics: ``log({"kappa/layer": 3e3, …}, step)``; ``close()`` at the end."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """``{"<field>/<layer>": float}`` of one monitor record (fields :data:`METRIC_FIELDS` of
    its kind; None values are left out, NaN and ±inf are kept)."""
    fields = METRIC_FIELDS.get(str(record.get("kind", "meta")), ())
    layer = record["layer"]
    return {f"{f}/{layer}": float(record[f]) for f in fields if record.get(f) is not None}


class TensorBoardSink:
    """Scalars to a ``torch.utils.tensorboard.SummaryWriter`` (non-finite values are skipped:
    TensorBoard cannot draw them). ``log_dir`` makes a writer; ``writer`` reuses the user's
    (not closed by :meth:`close` then). Needs the ``tensorboard`` extra."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None, prefix: str = "") -> None:
        if (log_dir is None) == (writer is None):
            raise ConfigError("TensorBoardSink: pass exactly one of log_dir= or writer=")
        if writer is None:
            tb = require("torch.utils.tensorboard", "tensorboard", purpose="the monitor's TensorBoard sink")
            writer = tb.SummaryWriter(str(log_dir))
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.prefix = prefix

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            if math.isfinite(v):
                self.writer.add_scalar(self.prefix + k, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


class CSVSink:
    """Long-format CSV ``step,metric,value`` (one row per metric), appended to ``path``
    (the header is written when the file is new or empty)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = self.path.open("a", newline="")
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(["step", "metric", "value"])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._w.writerow([int(step), k, repr(float(v))])
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class JSONLSink:
    """One JSON line per call, ``{"step": step, metric: value, …}``, appended to ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class LoggingSink:
    """One Python ``logging`` message per call, ``"step 120: kappa/1=3.01e+03 …"``, at ``level``
    on ``logger`` (default ``logging.getLogger("orthofx.monitor")``, which reaches the
    application only when it configures logging)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger if logger is not None else _root_logger.getChild("monitor")
        self.level = int(level)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.logger.isEnabledFor(self.level):
            text = " ".join(f"{k}={v:.3g}" for k, v in metrics.items())
            self.logger.log(self.level, "step %d: %s", int(step), text)

    def close(self) -> None:
        pass


class CallableSink:
    """Calls ``fn(metrics, step)`` (e.g. a Lightning logger's ``log_metrics``)."""

    def __init__(self, fn: Callable[[Mapping[str, float], int], Any], close: Callable[[], Any] | None = None) -> None:
        if not callable(fn):
            raise ConfigError(f"CallableSink needs a callable fn(metrics, step), got {type(fn).__name__}")
        self.fn = fn
        self._close = close

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.fn(dict(metrics), int(step))

    def close(self) -> None:
        if self._close is not None:
            self._close()
