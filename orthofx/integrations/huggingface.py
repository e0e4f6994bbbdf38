"""Hugging Face ``Trainer`` integration: :class:`OrthofxTrainerCallback` (needs
``pip install 'orthofx[hf]'``).

::

    from transformers import Trainer
    from orthofx.integrations.huggingface import OrthofxTrainerCallback

    cb = OrthofxTrainerCallback("ow", example_inputs=(batch["pixel_values"],))
    trainer = OrthofxTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()                      # also trainer.train(resume_from_checkpoint=...)

With OLR use :class:`OrthofxTrainer` (a ``Trainer`` whose ``create_optimizer`` attaches), because
OLR gives each producer a param group of its own, and the Trainer builds its LR scheduler (one
entry per group) right after the optimizer, before any callback runs. Without OLR (``"nog"``,
``"nog+ow"``, ...) a plain ``Trainer`` with the callback is enough.

Where each step happens in the Trainer's order (transformers 5.x, ``Trainer.train``):

* ``on_init_end`` (end of ``Trainer.__init__``, before ``train()`` builds the optimizer): the
  model is transformed **in place** (``OrthoConfig(inplace=True)``): the Trainer keeps its
  model object, whose producers now carry OW/SN. A model whose raw ``torch.linalg``
  meta-layers would be swapped cannot be transformed in place: transform it yourself before
  building the Trainer (``model, _ = orthofx.transform(model, inputs, cfg)``).
* ``OrthofxTrainer.create_optimizer`` (before the scheduler and a resumed optimizer state):
  NOG/OLR are attached. With a plain ``Trainer`` they are attached in ``on_train_begin``
  (after the scheduler and the optimizer state); OLR is refused there (ConfigError), since
  the scheduler was built for the groups before OLR's split.
* ``on_log``: at each of the Trainer's logs (every ``args.logging_steps``) the
  :class:`~orthofx.monitor.ConditioningMonitor` (recording every ``every`` steps) is flushed
  (one host sync) and κ, weight statistics, solver failures, NOG counters and OLR's η*/lr are
  added to the log's ``logs`` — so every ``report_to`` backend (TensorBoard, W&B, MLflow, ...)
  and ``trainer.state.log_history`` get them — and sent to the monitor's ``sinks``. The
  backends are callbacks that the Trainer puts before yours: :class:`OrthofxTrainer` moves its
  OrthofxTrainerCallback first; with a plain ``Trainer`` do so yourself
  (``trainer.callback_handler.callbacks.insert(0, cb)`` instead of ``callbacks=[cb]``), or the
  backends called before it miss the metrics.
* ``on_save``: the plan is written as ``orthofx_plan.json`` next to the checkpoint.
* resuming: ``OrthofxTrainer.train(resume_from_checkpoint=...)`` compares the checkpoint's
  ``orthofx_plan.json`` with the live model's plan **before** anything is loaded, and raises
  :class:`~orthofx.errors.ConfigError` when they differ (the Trainer would otherwise load the
  weights non-strictly, leaving e.g. OW's generator at its initial value, and only log the
  missing keys). With a plain ``Trainer`` the same check runs in ``on_train_begin``, after the
  Trainer has loaded the state, and stops training.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from orthofx.config import DEFAULT_PRESET
from orthofx._optional import require
from orthofx.errors import ConfigError
from orthofx.integrations._common import (
    CallbackOptions,
    attach_all,
    detach_all,
    log,
    plan_entry,
    resolve_inputs,
    training_metrics,
    transform_attr,
)
from orthofx.monitor import ConditioningMonitor
from orthofx.pipeline import plan_of

_tf = require("transformers", "hf", purpose="orthofx.integrations.huggingface")

__all__ = ["OrthofxTrainerCallback", "OrthofxTrainer", "PLAN_FILE"]

#: file written next to each Trainer checkpoint
PLAN_FILE = "orthofx_plan.json"


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``step`` calls the
    inner optimizer's, whose hooks therefore fire)."""
    while type(optimizer).__name__ == "AcceleratedOptimizer":
        optimizer = optimizer.optimizer
    return optimizer


class OrthofxTrainerCallback(_tf.TrainerCallback, CallbackOptions):
    """Transform, attach, monitor and store the plan of orthofx treatments in a ``Trainer``.

    Args:
        config: an orthofx preset (default :data:`orthofx.config.DEFAULT_PRESET`, ``"svd"``: stable
            gradients, report and κ, no weight changed; e.g. ``"ow"``), :class:`~orthofx.OrthoConfig` or dict.
        example_inputs: a tensor or tuple of positional inputs of the model for the analysis.
        example_input_fn: ``fn(model) -> inputs`` instead. Neither: symbolic analysis.
        monitor: create a :class:`~orthofx.monitor.ConditioningMonitor` (True), pass your own,
            or None/False.
        sinks: the monitor's :mod:`orthofx.monitor.sinks` (TensorBoard, CSV, logging, callable).
        every: record κ every ``every`` optimizer steps (default ``args.logging_steps``); each of
            the Trainer's logs carries the latest values.
        prefix: metric name prefix. ``attach_options``: keyword arguments of :func:`orthofx.attach`.
    """

    def __init__(
        self,
        config: Any = DEFAULT_PRESET,
        example_inputs: Any = None,
        *,
        example_input_fn: Callable[[nn.Module], Any] | None = None,
        monitor: bool | ConditioningMonitor | None = True,
        sinks: Sequence[Any] = (),
        every: int | None = None,
        prefix: str = "orthofx/",
        attach_options: Mapping[str, Any] | None = None,
        verify: bool = True,
    ) -> None:
        self._init_options(config, example_inputs, example_input_fn, monitor, sinks, every, prefix, attach_options,
                           verify)
        self._model: nn.Module | None = None
        self._opt: Any = None
        self._resume_checked = False
        self._logged_at = -1

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ConfigError("OrthofxTrainerCallback needs the Trainer's model (Trainer(model=...))")
        inputs = None
        if plan_of(model) is None:
            inputs = resolve_inputs(model, self.example_inputs, self.example_input_fn)
        self.report = transform_attr(model, None, self.config, inputs, verify=self.verify)
        self._model = model

    def attach(self, optimizer: Any, model: nn.Module | None = None) -> None:
        """Attach NOG/OLR to ``optimizer`` (idempotent); :class:`OrthofxTrainer` calls it from
        ``create_optimizer``, before the scheduler and the saved optimizer state."""
        if self.handles:
            return
        net = self._model if self._model is not None else model
        if net is None:
            raise ConfigError("OrthofxTrainerCallback: no model to attach (the Trainer passed none)")
        self._opt = _inner(optimizer)
        self.handles = attach_all([self._opt], net, self.attach_options)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise ConfigError("OrthofxTrainerCallback: the Trainer passed no optimizer to on_train_begin")
        net = self._model if self._model is not None else model
        if not self._resume_checked and int(state.global_step) > 0:  # a plain Trainer resumed: check late
            for folder in (getattr(args, "resume_from_checkpoint", None),
                           os.path.join(args.output_dir, f"checkpoint-{state.global_step}")):
                if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
                    self.check_resume(folder)
                    break
        if not self.handles:  # a plain Trainer: attach now, after the scheduler and state load
            self.attach(optimizer, net)
            n_groups = len(self._opt.param_groups)
            base = getattr(lr_scheduler, "base_lrs", None)
            if any(h.olr for h in self.handles) and base is not None and len(base) != n_groups:
                detach_all(self.handles)
                self.handles = []
                raise ConfigError(
                    "OLR gives each producer a param group of its own, and the Trainer built its LR scheduler "
                    f"for {len(base)} group(s) before any callback could attach; use "
                    "orthofx.integrations.huggingface.OrthofxTrainer (attaches in create_optimizer), or a config "
                    "without OLR")
        self.every = self.every or max(1, int(getattr(args, "logging_steps", 50) or 50))
        if net is not None:
            self.monitor = self._make_monitor(net, self.every)
        if self.monitor is not None:
            self.monitor.load_state_dict({**self.monitor.state_dict(records=False), "step": int(state.global_step)})
            self.monitor.attach_to(_inner(optimizer))

    def check_resume(self, folder: str | os.PathLike[str]) -> None:
        """Raise :class:`ConfigError` when the checkpoint ``folder`` holds an orthofx plan that
        differs from the live model's (a missing plan file only logs a warning)."""
        path = os.path.join(os.fspath(folder), PLAN_FILE)
        if self._model is None or plan_of(self._model) is None:
            return
        if not os.path.isfile(path):
            log.warning("checkpoint %s holds no %s (saved without OrthofxTrainerCallback): its weights are "
                        "loaded into the transformed model as they are", os.fspath(folder), PLAN_FILE)
            return
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable orthofx plan ({e})") from None
        live = plan_entry(self._model)
        if not isinstance(saved, Mapping) or saved.get("plan") != live["plan"]:
            def name(entry: Any) -> str:
                try:
                    return repr(entry["plan"]["config"].get("preset") or entry["plan"]["config"].get("name"))
                except (KeyError, TypeError, AttributeError):
                    return "an unreadable plan"
            raise ConfigError(
                f"the checkpoint {os.fspath(folder)!r} was saved with the orthofx plan {name(saved)}, this Trainer's "
                f"model carries {name(live)}: its weights would load non-strictly into other parameters. Build the "
                "callback with the checkpoint's config (or start a new run)")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        step = int(state.global_step)
        if logs is None or step == 0 or step == self._logged_at or not (self.handles or self.monitor is not None):
            return
        self._logged_at = step  # once per step (the final summary and eval logs come at a logged step)
        metrics = training_metrics(self.monitor, self.handles, self.prefix)
        if metrics:
            logs.update(metrics)  # the callbacks after this one: report_to backends, printer
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == step:  # the Trainer stored a copy before on_log
                last.update(metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._model is None or plan_of(self._model) is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, PLAN_FILE), "w") as f:
                json.dump(plan_entry(self._model), f, indent=1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        detach_all(self.handles)
        self.handles = []
        if self.monitor is not None and self.monitor is not self._monitor_opt:
            self.monitor.close()


class OrthofxTrainer(_tf.Trainer):
    """``transformers.Trainer`` that attaches NOG/OLR (of its :class:`OrthofxTrainerCallback`)
    in ``create_optimizer``: before the LR scheduler is built and before a resumed optimizer
    state is loaded, as OLR's param-group split needs. Pass the callback in ``callbacks=``; it is
    moved first in the callback list, so that its metrics reach every ``report_to`` backend."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handler = self.callback_handler
        ours = [c for c in handler.callbacks if isinstance(c, OrthofxTrainerCallback)]
        handler.callbacks = ours + [c for c in handler.callbacks if not isinstance(c, OrthofxTrainerCallback)]

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        cbs = [c for c in self.callback_handler.callbacks if isinstance(c, OrthofxTrainerCallback)]
        if not cbs:
            raise ConfigError("OrthofxTrainer needs an OrthofxTrainerCallback in callbacks=")
        cbs[0].attach(self.optimizer, self.model)
        return opt

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed checkpoint's orthofx plan is checked against the live
        model's before anything is loaded (:meth:`OrthofxTrainerCallback.check_resume`)."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = require("transformers.trainer_utils", "hf").get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, os.PathLike)):
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, OrthofxTrainerCallback):
                    cb.check_resume(folder)
                    cb._resume_checked = True
        return super().train(resume_from_checkpoint, *args, **kwargs)
