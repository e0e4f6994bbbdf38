"""ConditioningMonitor: κ of each meta-layer's covariance over training (in three conventions),
the Pre-SVD weights' norm and conditioning, and failure counts (guide: docs/monitor.md).

κ (:mod:`orthofx.monitor.spectrum`, docs/kappa.md): ``kappa`` = κ(Σ + εI), the matrix the
solver decomposes; ``kappa_range`` = λ_max/λ_r of Σ on its numerical range (rank r);
``kappa_paper`` = the paper's eq. 1 as inferred (Σ without ε, σ_min at the rounding floor).
A batch of covariances gives the median (``kappa_max``: the maximum). Producer weights
(:mod:`orthofx.monitor.weights`): ``weight_norm`` = ‖W‖_F, ``weight_cond`` = σ_max/σ_min of
the flattened weight. Schema: :mod:`orthofx.monitor.records`.

Cost: no covariance is decomposed again (the meta-layers keep the eigenvalues they computed on
recorded steps, every ``every``-th; backend "ns" pays one float64 eigvalsh there), and no host
sync per step: summaries stay on the device until :meth:`ConditioningMonitor.flush` (one sync),
which also runs the float64 ``svdvals`` of the producer weight copies
(:mod:`orthofx.monitor.pending`). A flush also happens once those copies hold
:data:`PENDING_WEIGHT_BYTES`.

Meta-layers that are not orthofx modules are found by one analysis (on ``example_inputs`` or
inside the first training forward, skipped for a transformed model whose plan saw only
orthofx modules) and their covariance is captured where it is formed
(:mod:`orthofx.monitor.capture`; ε unknown: ``kappa`` = κ(Σ)). Labels are the meta-layers'
names of the analysis report (:func:`orthofx.report.meta_layer_name`). Output: CSV/JSONL and
``sinks=`` (:mod:`orthofx.monitor.sinks`) at each flush; logs go to ``orthofx.monitor``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from orthofx._log import logger as _root_logger
from orthofx.config import check_int
from orthofx.errors import ConfigError, InputError
from orthofx.linalg import solver_stats
from orthofx.monitor.capture import CaptureSite, CovarianceCapture, Discovery, discovery_from_plan, find_capture_sites
from orthofx.monitor.pending import Pending, formation_dtype, layer_eps, to_records, unit_roundoff
from orthofx.monitor.records import META, PRODUCER, write_csv, write_jsonl
from orthofx.monitor.sinks import CallableSink, MetricSink, TensorBoardSink, record_metrics
from orthofx.monitor.spectrum import summarize_spectrum
from orthofx.monitor.summary import summarize_records
from orthofx.monitor.weights import ProducerWeight, producer_weights
from orthofx.nn.meta import is_meta_layer

__all__ = ["ConditioningMonitor", "MonitorWarning", "STATE_VERSION"]

log = _root_logger.getChild("monitor")

#: version of :meth:`ConditioningMonitor.state_dict`'s layout
STATE_VERSION = 1

#: :meth:`ConditioningMonitor.step` flushes once the producer weight copies awaiting their
#: ``svdvals`` hold this many bytes (64 MiB), whatever ``max_pending`` says
PENDING_WEIGHT_BYTES = 64 * 2**20


class MonitorWarning(UserWarning):
    """The monitor has nothing to monitor, or skipped a meta-layer (the message says why)."""


@dataclass(eq=False, repr=False)
class ConditioningMonitor:
    """Records κ of every orthofx meta-layer module in ``model`` (and the Pre-SVD weights'
    norm and conditioning) every ``every`` steps.

    Usage::

        mon = ConditioningMonitor(gm, every=10, run="nog+ow+olr", sinks=[LoggingSink()])
        mon.attach_to(opt)                  # or call mon.step() after each optimizer step
        for batch in loader:
            loss = ...; loss.backward(); opt.step()
        mon.flush(); mon.to_csv("kappa.csv")

    Args:
        model: a module holding orthofx meta-layers (``orthofx.nn`` modules, or the stable
            stand-ins that ``orthofx.transform`` swaps in for raw ``torch.linalg`` calls).
        every: record every k-th step (k ≥ 1). Steps count from 0; step 0 is recorded.
        run: a label written into every record (one line per run in :func:`plot`).
        tensorboard_dir: shorthand for ``sinks=[TensorBoardSink(tensorboard_dir)]``; raises
            ``MissingExtraError`` (an ImportError naming ``orthofx[tensorboard]``) when
            tensorboard is not installed.
        layers: restrict to these meta-layers (qualified module names or labels; default: all).
        max_pending: records kept on the device before :meth:`step` flushes them by itself (one
            sync every ``max_pending`` records; :meth:`flush`, :meth:`summary`, :meth:`to_csv`...
            sync once as well).
        sinks: :class:`~orthofx.monitor.sinks.MetricSink` objects fed at every flush; a plain
            callable ``fn(metrics, step)`` (e.g. ``trainer.logger.log_metrics``) is wrapped in a
            :class:`~orthofx.monitor.sinks.CallableSink`.
        weights: record the producer weights' statistics (default True).
        producers: qualified parameter names of the producer weights (default: the plan's
            producers of a model returned by ``orthofx.transform``; none otherwise).
        example_inputs: inputs of one training forward (a tensor or a tuple): the analysis
            runs on them now and finds the meta-layers that are not orthofx modules. Without
            them it runs on the inputs of the first training-mode forward (one extra recorded
            forward, inside that call; the model is left as it was). Pass them when the model
            is compiled (the hooks must exist before ``torch.compile``).
        discover: find such meta-layers at all (default True); False monitors orthofx's
            meta-layer modules only.
    """

    model: nn.Module
    every: int = 1
    run: str = "run"
    tensorboard_dir: str | os.PathLike | None = None
    layers: Sequence[str] | None = None
    max_pending: int = 1024
    records: list[dict[str, Any]] = field(default_factory=list)
    sinks: Sequence[MetricSink] = ()
    weights: bool = True
    producers: Sequence[str] | None = None
    example_inputs: Any = field(default=None, repr=False)
    discover: bool = True

    def __post_init__(self) -> None:
        self.every = check_int(self.every, "every", min=1)
        self.max_pending = check_int(self.max_pending, "max_pending", min=1)
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(self.model).__name__}")
        found: dict[str, nn.Module] = {}
        qualified: dict[str, str] = {}
        for qname, m in self.model.named_modules():
            if is_meta_layer(m):
                label = getattr(m, "orthofx_label", None)
                label = label if isinstance(label, str) and label else qname
                if label in found:  # two swaps of one user path: keep them apart
                    label = qname
                found[label] = m
                qualified[label] = qname
        self._wanted: set[str] | None = None  # layers= names still to find by analysis
        discover = bool(self.discover)
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise ConfigError(f"layers must be a list of module names, got the string {self.layers!r}")
            by_qname = {q: lab for lab, q in qualified.items()}
            chosen = []
            missing = []
            for want in self.layers:
                lab = want if want in found else by_qname.get(want)
                (chosen if lab is not None else missing).append(lab if lab is not None else want)
            if missing and (not discover or self.example_inputs is None):
                raise ConfigError(
                    f"not meta-layers of the model: {sorted(missing)}; orthofx meta-layer modules: {sorted(found)}"
                    + ("" if not discover else "; to name a meta-layer that the analysis finds (not an orthofx "
                       "module), pass example_inputs="))
            found = {k: found[k] for k in chosen}
            self._wanted = set(missing)
            discover = discover and bool(missing)
        sinks: list[MetricSink] = []
        for s in self.sinks:
            if isinstance(s, MetricSink):
                sinks.append(s)
            elif callable(s):  # fn(metrics, step), e.g. a Lightning logger's log_metrics
                sinks.append(CallableSink(s))
            else:
                raise ConfigError(f"sinks: {type(s).__name__} has no log(metrics, step)/close() and is not "
                                  "callable (see orthofx.monitor.sinks)")
        self.sinks = sinks
        if self.tensorboard_dir is not None:
            self.sinks.append(TensorBoardSink(self.tensorboard_dir))
        self._modules: dict[str, nn.Module] = found
        self._qualified = {k: qualified[k] for k in found}
        self._producers: list[ProducerWeight] = (
            producer_weights(self.model, None if self.producers is None else list(self.producers))
            if self.weights else []
        )
        self._step = 0
        self._armed = False
        self._pending: list[Pending] = []
        self._pending_weight_bytes = 0
        self._nonfinite_out: dict[str, torch.Tensor] = {}
        self._input: dict[str, tuple[torch.dtype, torch.device]] = {}
        self._weight_seen: set[str] = set()
        self._handles = [m.register_forward_hook(self._make_hook(name)) for name, m in found.items()]
        for pw in self._producers:
            self._handles.append(pw.module.register_forward_pre_hook(self._make_weight_hook(pw)))
        self._opt_handles: list[Any] = []
        self._warned: dict[tuple[str, str], int] = {}
        self._solver_base = self._solver_snapshot()
        self._nonfinite_base: tuple[int, list[torch.Tensor]] | None = self._nonfinite_snapshot()
        self._sites: list[CaptureSite] = []
        self._capture: CovarianceCapture | None = None
        self._skipped: dict[str, str] = {}
        self._found = ""
        self._details: dict[str, str] = {}  # name → graph node (detail)
        self._lazy: Any = None
        self.empty_reason: str | None = None
        planned = discovery_from_plan(self.model, set(found)) if discover and self._wanted is None else None
        if discover and self.example_inputs is not None:
            self._install(self._analyse(self.example_inputs, {}))
        elif planned is not None:  # a transformed model holding only orthofx meta-layers: no analysis forward
            self._install(planned)
        elif discover:
            self._lazy = self.model.register_forward_pre_hook(self._first_forward, with_kwargs=True, prepend=True)
        else:
            self._found = "discover=False: only orthofx meta-layer modules are monitored"
            self._check_empty()
        self._handles.append(self.model.register_forward_pre_hook(self._capture_on))
        self._handles.append(self.model.register_forward_hook(self._capture_off, always_call=True))
        self._arm()

    # ------------------------------------------------------------------ discovery
    def _analyse(self, args: Any, kwargs: dict[str, Any]) -> Discovery:
        try:
            return find_capture_sites(self.model, args, kwargs=kwargs or None)
        except Exception as exc:  # noqa: BLE001 - the monitor never refuses the model
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return Discovery(found=f"the analysis of the model failed ({type(exc).__name__}: {first})")

    def _first_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook until the first training-mode forward: analyse it (its inputs are
        the example inputs), then start capturing in this very forward."""
        if not module.training:
            return
        self._lazy.remove()
        self._lazy = None
        self._install(self._analyse(args, kwargs))

    def _install(self, disc: Discovery) -> None:
        self._found = disc.found
        wanted = self._wanted
        for name, reason in disc.skipped.items():
            if wanted is None or name in wanted:
                self._skipped[name] = reason
        monitored = set(self._modules)
        sites = []
        for site in disc.sites:
            if site.name in monitored or (wanted is not None and site.name not in wanted):
                continue
            sites.append(site)
            self._details[site.name] = f"{site.node} -> {site.meta_node} ({site.kind})"
        if wanted is not None:
            missing = wanted - {s.name for s in sites} - set(self._skipped)
            if missing:
                raise ConfigError(f"not meta-layers of the model: {sorted(missing)}; the analysis found: {disc.found}")
        self._sites = sites
        self._capture = CovarianceCapture(sites) if sites else None
        for name, reason in self._skipped.items():
            log.warning("meta-layer %s is not monitored: %s", name, reason)
        self._check_empty()

    def _check_empty(self) -> None:
        if self._modules or self._sites:
            self.empty_reason = None
            return
        skipped = "; ".join(f"{k}: {v}" for k, v in self._skipped.items())
        self.empty_reason = ("ConditioningMonitor has nothing to monitor: the model holds no orthofx meta-layer "
                             "module and " + (self._found or "no analysis ran")
                             + (f"; not monitorable: {skipped}" if skipped else ""))
        warnings.warn(self.empty_reason, MonitorWarning, stacklevel=4)
        log.warning("%s", self.empty_reason)

    def _capture_on(self, module: nn.Module, args: Any) -> None:
        if self._capture is not None and self._armed and module.training:
            self._capture.enter()

    def _capture_off(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._capture is not None:
            self._capture.leave()

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not module.training:
                return
            if self._armed and args and isinstance(args[0], torch.Tensor):
                self._input[name] = (args[0].dtype, args[0].device)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                with torch.no_grad():
                    bad = (~torch.isfinite(first.detach())).sum(dtype=torch.int64)
                acc = self._nonfinite_out.get(name)
                self._nonfinite_out[name] = bad if acc is None else acc + bad

        return hook

    def _make_weight_hook(self, pw: ProducerWeight):
        def hook(module: nn.Module, args: Any) -> None:
            # the weight as this recorded step's forward uses it, once per recorded step
            if not (self._armed and module.training) or pw.label in self._weight_seen:
                return
            self._weight_seen.add(pw.label)
            # a parametrized weight runs ops: not counted by the covariance capture
            with torch.no_grad(), (self._capture.paused() if self._capture is not None else contextlib.nullcontext()):
                w = getattr(pw.module, pw.attr).detach().clone()  # the optimizer updates W in place
            self._pending.append(Pending(self._step, PRODUCER, pw.label, None, weight=w))
            self._pending_weight_bytes += w.numel() * w.element_size()

        return hook

    def _arm(self) -> None:
        on = self._step % int(self.every) == 0
        self._armed = on
        self._weight_seen.clear()
        for m in self._modules.values():
            m.orthofx_record = on
            if on:
                m.orthofx_last_eigenvalues = None

    @staticmethod
    def _nonfinite_snapshot() -> tuple[int, list[torch.Tensor]]:
        """The solver's non-finite counter now, kept on the device (read at a flush: no sync here)."""
        s = solver_stats()
        with s._lock:
            return s._nonfinite_host, [v.detach().clone() for v in s._nonfinite_acc.values()]

    def _solver_snapshot(self) -> dict[str, Any]:
        s = solver_stats()
        return {"failures": s.failures, "fallbacks": sum(s.fallbacks.values())}

    # ------------------------------------------------------------------ API
    @property
    def layer_names(self) -> list[str]:
        """Names of the monitored meta-layers (the module paths where they run, as in the
        analysis report): orthofx modules first, then captured covariances. Before the first
        training forward of a monitor without ``example_inputs``, only the orthofx modules."""
        return list(self._modules) + [s.name for s in self._sites]

    @property
    def skipped(self) -> dict[str, str]:
        """Meta-layers the analysis found but the monitor cannot monitor: name → reason."""
        return dict(self._skipped)

    @property
    def pending_discovery(self) -> bool:
        """True until the first training-mode forward runs the analysis (no ``example_inputs``)."""
        return self._lazy is not None

    @property
    def producer_names(self) -> list[str]:
        """Labels of the monitored producer weights (parameter names in the user's model)."""
        return [p.label for p in self._producers]

    @property
    def step_count(self) -> int:
        """How many steps :meth:`step` has counted (the next step's number)."""
        return self._step

    def step(self) -> None:
        """Call once per training step, after the forward (typically after ``optimizer.step()``;
        :meth:`attach_to` does it for you)."""
        if self._step % int(self.every) == 0:
            snap = self._solver_snapshot()
            for name, m in self._modules.items():
                lam = getattr(m, "orthofx_last_eigenvalues", None)
                if lam is None:
                    continue
                eps = layer_eps(m)
                spec = getattr(m, "orthofx_meta", None)
                spec_input = getattr(spec, "input", "covariance")
                dtype, device = self._input.get(name, (lam.dtype, lam.device))
                u = unit_roundoff(lam.dtype, formation_dtype(m, spec_input, dtype, device))
                summary = summarize_spectrum(lam, eps, u)
                if summary is not None:
                    self._pending.append(Pending(self._step, META, name, summary, snap,
                                                  self._nonfinite_out.get(name), eps, int(lam.shape[-1])))
            if self._capture is not None:
                for site in self._sites:
                    mats = self._capture.captured.get(site.name)
                    if not mats:
                        continue
                    p = torch.cat([m.reshape(-1, site.size, site.size) for m in mats])
                    self._pending.append(Pending(self._step, META, site.name, None, snap, size=site.size, matrix=p))
                    self._pending_weight_bytes += p.numel() * p.element_size()
        if self._capture is not None:
            self._capture.reset()
        self._step += 1
        self._arm()
        if len(self._pending) >= int(self.max_pending) or self._pending_weight_bytes >= PENDING_WEIGHT_BYTES:
            self.flush()

    def attach_to(self, optimizer: torch.optim.Optimizer) -> Any:
        """Step the monitor after every ``optimizer.step()`` (an optimizer step post-hook).
        Returns the removable handle (``handle.remove()``); :meth:`close` removes it too."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"attach_to needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        self._opt_handles.append(handle)
        return handle

    def flush(self) -> list[dict[str, Any]]:
        """Turn the pending device-side summaries into records (one host sync), send them to
        the sinks, and return them."""
        if not self._pending:
            return []
        if self._nonfinite_base is not None:  # since this monitor started, like failures/fallbacks
            host, accs = self._nonfinite_base
            self._nonfinite_base = None
            self._solver_base["nonfinite"] = host + sum(int(v.item()) for v in accs)
        solver_nonfinite = solver_stats().nonfinite - self._solver_base.get("nonfinite", 0)
        new = to_records(self._pending, run=self.run, solver_base=self._solver_base,
                         solver_nonfinite=solver_nonfinite, captured={s.name for s in self._sites})
        self._pending_weight_bytes = 0
        self._pending.clear()
        self.records.extend(new)
        self._emit(new)
        return new

    def _emit(self, new: list[dict[str, Any]]) -> None:
        """Send the new records to the sinks, one ``log`` per step; log problems once."""
        by_step: dict[int, dict[str, float]] = {}
        for r in new:
            by_step.setdefault(int(r["step"]), {}).update(record_metrics(r))
        for s in self.sinks:
            for step in sorted(by_step):
                s.log(by_step[step], step)
        # warn when a cumulative counter grew since the last warning (not at every flush)
        for r in sorted((r for r in new if r["kind"] == META), key=lambda r: r["step"]):
            nf, seen = r["nonfinite_outputs"], self._warned.get(("nonfinite", r["layer"]), 0)
            if nf is not None and nf > seen:
                log.warning("run %r: meta-layer %s produced non-finite outputs (%d values so far, step %d)",
                            self.run, r["layer"], nf, r["step"])
                self._warned[("nonfinite", r["layer"])] = nf
            fails = r["solver_failures"]
            if fails > self._warned.get(("failures", ""), 0):
                log.warning("run %r: %d solver failure(s) since the monitor started (step %d)", self.run, fails, r["step"])
                self._warned[("failures", "")] = fails
        log.debug("run %r: flushed %d record(s)", self.run, len(new))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per meta-layer, over the recorded steps (independent of the order of ``records``).
        The first two keys are the ones to read: ``kappa_median``, the median κ of the matrix
        the layer decomposes, and ``kappa_of``, which matrix that is (``"Σ + εI"`` for orthofx's
        modules: what the solver faces); the ε-free ``kappa_range_*`` / ``kappa_paper_*``
        compare with the paper's figures (docs/kappa.md). All keys:

        ``kappa_median`` / ``kappa_max``: NaN-ignoring median / max of κ (``+inf`` counts;
        NaN only when every record is NaN); ``kappa_final``: κ of the latest step;
        ``nan_records``: how many records have a NaN κ; ``records``: how many there are;
        solver and non-finite-output counters of the latest step (they are cumulative);
        ``kappa_range_median``/``_final``, ``kappa_paper_median``/``_final`` (NaN-ignoring
        median, latest; NaN for records without them) and ``rank_final``; ``eps`` (None:
        unknown), ``source`` (``"orthofx module"`` or ``"captured covariance"``), ``kappa_of``
        (which matrix ``kappa`` is of) and, for a captured covariance, ``node`` (its graph
        nodes, detail). A meta-layer that cannot be monitored: ``{"skipped": reason,
        "records": 0}``. Producer records are not summarised here.
        """
        self.flush()
        mismatched = self._capture.mismatched if self._capture is not None else {}
        captured = {site.name: self._details.get(site.name, "") for site in self._sites}
        return summarize_records(self.records, self.layer_names, captured=captured, mismatched=mismatched,
                                 skipped=self._skipped)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write all records as CSV (columns: :data:`orthofx.monitor.records.FIELDS`)."""
        self.flush()
        return write_csv(self.records, path)

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Write all records as JSON lines."""
        self.flush()
        return write_jsonl(self.records, path)

    def state_dict(self, *, records: bool = True) -> dict[str, Any]:
        """What a resume needs: the step counter, ``every``/``run``/``max_pending`` and (with
        ``records=True``) the records so far. Flushes first (one sync), so nothing pending is
        lost; plain Python values only (``torch.load(weights_only=True)`` reads them)."""
        self.flush()
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self._step,
            "every": int(self.every),
            "run": self.run,
            "max_pending": int(self.max_pending),
            "layers": self.layer_names,
            "producers": self.producer_names,
        }
        if records:
            state["records"] = [dict(r) for r in self.records]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: the next :meth:`step` continues the saved numbering
        (and recording schedule); saved records replace the current ones when present.
        Solver counters in later records count from this monitor's start. A state of another
        layout raises :class:`~orthofx.errors.InputError`."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise InputError(f"not a ConditioningMonitor state (version {got!r}, expected {STATE_VERSION})")
        self._pending.clear()
        self._pending_weight_bytes = 0
        self._step = check_int(state["step"], "step", min=0)
        self.every = check_int(state.get("every", self.every), "every", min=1)
        self.max_pending = check_int(state.get("max_pending", self.max_pending), "max_pending", min=1)
        self.run = str(state.get("run", self.run))
        if "records" in state:
            self.records = [dict(r) for r in state["records"]]
        saved = state.get("layers")
        if saved is not None and list(saved) != self.layer_names and not self.pending_discovery:
            log.warning("monitor state saved for meta-layers %s, loaded into a monitor of %s", list(saved),
                        self.layer_names)
        self._arm()

    def close(self) -> None:
        """Flush, remove the hooks (model and optimizer), stop recording and close the sinks."""
        self.flush()
        if self._capture is not None:
            self._capture.leave()
        if self._lazy is not None:
            self._lazy.remove()
            self._lazy = None
        for h in self._handles + self._opt_handles:
            h.remove()
        self._handles.clear()
        self._opt_handles.clear()
        self._armed = False
        for m in self._modules.values():
            m.orthofx_record = False
            m.orthofx_last_eigenvalues = None
        for s in self.sinks:
            s.close()

    def __repr__(self) -> str:
        return (f"ConditioningMonitor(run={self.run!r}, layers={len(self.layer_names)}, "
                f"producers={len(self._producers)}, every={self.every}, step={self._step}, "
                f"pending={len(self._pending)}, records={len(self.records)})")
