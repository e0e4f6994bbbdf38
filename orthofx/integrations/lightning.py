"""Lightning integration: :class:`OrthofxCallback` (needs ``pip install 'orthofx[lightning]'``).

::

    import lightning as L
    from orthofx.integrations.lightning import OrthofxCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_network()               # the network orthofx transforms
            self.example_input_array = torch.randn(8, 3, 32, 32)
        def configure_optimizers(self):                # called after the transform
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        ...

    trainer = L.Trainer(callbacks=[OrthofxCallback()])   # "svd" (DEFAULT_PRESET); OrthofxCallback("ow") treats
    trainer.fit(Net(), loader)                         # trainer.fit(..., ckpt_path=...) resumes exactly

Where each step happens in Lightning's order (lightning 2.6, ``Trainer._run``):

* ``setup`` (before ``configure_model``, the checkpoint's model state, the strategy's device
  move / DDP wrap and ``configure_optimizers``): ``pl_module.<model_attr>`` is replaced by
  ``orthofx.transform(...)``'s model.
* resume, ``LightningModule.on_load_checkpoint`` (before the model state is loaded): when the
  checkpoint's plan differs from the one built at setup, the saved plan is replayed
  (:func:`orthofx.pipeline.replay`) so that the saved state dict fits.
* ``on_fit_start`` (after ``configure_optimizers``, before the optimizer and scheduler states
  are restored): NOG/OLR are attached to every optimizer that holds the producer parameters,
  and the :class:`~orthofx.monitor.ConditioningMonitor` is created and stepped by an optimizer
  post-hook.
* ``on_train_batch_end``: every ``every`` optimizer steps the monitor is flushed (one host
  sync) and κ, the producer-weight statistics, solver failures, NOG's zero/non-finite gradient
  counts and OLR's η*/lr per producer go to ``pl_module.log`` as ``orthofx/...`` metrics.
* ``on_save_checkpoint``: the plan is stored under ``checkpoint["orthofx"]``; the monitor's
  state (step numbering, records) is the callback's state.
* ``on_fit_end`` with ``strip_on_fit_end=True`` (like ``ModelPruning(make_pruning_permanent=True)``):
  ``pl_module.<model_attr>`` becomes :func:`orthofx.strip`'s plain model (OW/SN baked, no hook),
  ready to export or to load into the original class.

The transform's one-line summary goes through Lightning's ``rank_zero_info`` (shown once, on
rank 0, with Lightning's own messages).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from orthofx.config import DEFAULT_PRESET
from orthofx._optional import require
from orthofx.errors import ConfigError
from orthofx.integrations._common import (
    CallbackOptions,
    CHECKPOINT_KEY,
    attach_all,
    detach_all,
    get_target,
    log,
    plan_entry,
    resolve_inputs,
    restore_plan,
    set_target,
    training_metrics,
    transform_attr,
    transform_summary,
)
from orthofx.monitor import ConditioningMonitor
from orthofx.pipeline import plan_of

_pl = require("lightning.pytorch", "lightning", purpose="orthofx.integrations.lightning")
from lightning.pytorch.utilities.rank_zero import rank_zero_info  # noqa: E402

__all__ = ["OrthofxCallback"]

_HOOK = "on_load_checkpoint"


class OrthofxCallback(_pl.Callback, CallbackOptions):
    """Transform, attach, monitor and checkpoint orthofx treatments in a Lightning ``Trainer``.

    Args:
        config: an orthofx preset (default :data:`orthofx.config.DEFAULT_PRESET`, ``"svd"``: stable
            gradients, report and κ, no weight changed; e.g. ``"ow"``), :class:`~orthofx.OrthoConfig` or dict.
        example_inputs: a tensor or tuple of positional inputs of the network for the analysis.
        example_input_fn: ``fn(pl_module) -> inputs`` instead (e.g. a batch of the datamodule).
            Neither given: ``pl_module.example_input_array``; none at all: symbolic analysis.
        model_attr: dotted path of the network inside the LightningModule (``"model"`` for
            ``self.model = ...``); None transforms the LightningModule itself, in place (not
            possible when raw ``torch.linalg`` meta-layers would be swapped).
        monitor: create a :class:`~orthofx.monitor.ConditioningMonitor` (True), pass your
            own, or None/False for none. A model without meta-layer gets none.
        sinks: the created monitor's :mod:`orthofx.monitor.sinks` (TensorBoard, CSV, JSONL,
            logging, callable), besides ``pl_module.log``.
        every: record and log every ``every`` optimizer steps (default: the trainer's
            ``log_every_n_steps``); each logging step costs one host sync.
        prefix: metric name prefix.
        attach_options: keyword arguments of :func:`orthofx.attach` (``lr_mode``, ``chain``, ...).
        verify: :func:`orthofx.transform`'s ``verify``.
        strip_on_fit_end: at the end of ``fit``, replace ``pl_module.<model_attr>`` by
            :func:`orthofx.strip`'s plain model (needs ``model_attr``; not with ``ow_method="soc"``,
            which cannot be stripped).

    Attributes:
        report: the :class:`~orthofx.pipeline.TransformReport` of the setup (None when the
            network was already transformed). ``handles``: the attach handles.
        monitor: the monitor during fit. ``replayed``: True when a resume replayed the
            checkpoint's plan.
    """

    def __init__(
        self,
        config: Any = DEFAULT_PRESET,
        example_inputs: Any = None,
        *,
        example_input_fn: Callable[[nn.Module], Any] | None = None,
        model_attr: str | None = "model",
        monitor: bool | ConditioningMonitor | None = True,
        sinks: Sequence[Any] = (),
        every: int | None = None,
        prefix: str = "orthofx/",
        attach_options: Mapping[str, Any] | None = None,
        verify: bool = True,
        strip_on_fit_end: bool = False,
    ) -> None:
        super().__init__()
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ConfigError(f"model_attr must be a dotted attribute path or None, got {model_attr!r}")
        if strip_on_fit_end and model_attr is None:
            raise ConfigError("strip_on_fit_end=True needs model_attr: the stripped copy replaces the network held "
                              "in that attribute (the LightningModule itself cannot be replaced)")
        self.strip_on_fit_end = bool(strip_on_fit_end)
        self._init_options(config, example_inputs, example_input_fn, monitor, sinks, every, prefix, attach_options,
                           verify)
        self.model_attr = model_attr
        self.replayed = False
        self._pending_state: Mapping[str, Any] | None = None
        self._logged_at = -1

    # ------------------------------------------------------------------ helpers
    def network(self, pl_module: nn.Module) -> nn.Module:
        """The (transformed) network inside ``pl_module``."""
        return get_target(pl_module, self.model_attr)

    def _install_restore_hook(self, pl_module: nn.Module) -> None:
        """Wrap ``pl_module.on_load_checkpoint`` for this fit: Lightning calls it with the
        checkpoint before loading the model state, the only point where a saved plan can be
        replayed in time (callbacks' ``on_load_checkpoint`` runs after the model state)."""
        if getattr(pl_module.__dict__.get(_HOOK), "_orthofx_callback", None) is self:
            return
        user_hook = getattr(pl_module, _HOOK)

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            user_hook(checkpoint)
            entry = checkpoint.get(CHECKPOINT_KEY)
            if entry is None:
                log.warning("the checkpoint holds no orthofx plan (saved without OrthofxCallback); its state is "
                            "loaded into the network transformed at setup")
                return
            self.replayed = restore_plan(pl_module, self.model_attr, entry)

        on_load_checkpoint._orthofx_callback = self  # type: ignore[attr-defined]
        pl_module.__dict__[_HOOK] = on_load_checkpoint

    def _remove_restore_hook(self, pl_module: nn.Module) -> None:
        hook = pl_module.__dict__.get(_HOOK)
        if getattr(hook, "_orthofx_callback", None) is self:
            del pl_module.__dict__[_HOOK]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        inputs = None
        if plan_of(self.network(pl_module)) is None:
            inputs = resolve_inputs(pl_module, self.example_inputs, self.example_input_fn, "example_input_array")
        self.report = transform_attr(pl_module, self.model_attr, self.config, inputs, verify=self.verify)
        if self.report is not None:
            rank_zero_info(transform_summary(self.report, self.model_attr or type(pl_module).__name__))
        if self.strip_on_fit_end:
            plan = plan_of(self.network(pl_module))
            if plan is not None and plan.config.weight == "ow" and plan.config.ow_method == "soc":
                raise ConfigError("strip_on_fit_end=True: a model treated with ow_method='soc' cannot be stripped "
                                  "(the orthogonal convolution is not one kernel of the layer's shape)")
        self._install_restore_hook(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        net = self.network(pl_module)
        # Lightning's automatic optimization calls optimizer.step(closure): the closure (forward,
        # backward, on_before_optimizer_step, gradient clipping) is evaluated first, then the
        # treatments act on the gradient the update uses (as in a plain loop)
        self.handles = attach_all(list(trainer.optimizers), net, self.attach_options, closure_first=True)
        every = self.every if self.every is not None else max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        self.every = every
        self.monitor = self._make_monitor(net, every)
        if self.monitor is not None:
            if self._pending_state is not None:
                self.monitor.load_state_dict(self._pending_state)
                self._pending_state = None
            for opt in trainer.optimizers:
                self.monitor.attach_to(opt)
                break  # one step per training step: the first optimizer's

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not (self.handles or self.monitor is not None):
            return
        step = int(trainer.global_step)  # optimizer steps taken so far
        if step == 0 or step == self._logged_at or (step - 1) % int(self.every or 1) != 0:
            return  # log after the recorded steps 0, every, 2·every, ... (once: accumulation)
        self._logged_at = step
        metrics = training_metrics(self.monitor, self.handles, self.prefix)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.strip_on_fit_end or plan_of(self.network(pl_module)) is None:
            return
        from orthofx.export import strip

        detach_all(self.handles)  # the hooks act on the treated model's parameters
        self.handles = []
        set_target(pl_module, self.model_attr, strip(self.network(pl_module)))
        rank_zero_info(f"orthofx: pl_module.{self.model_attr} replaced by orthofx.strip's plain model")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = plan_entry(self.network(pl_module))

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        return {"monitor": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mon = state_dict.get("monitor")
        if mon is None:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(mon)
        else:  # Lightning restores callbacks before on_fit_start creates the monitor
            self._pending_state = mon

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._remove_restore_hook(pl_module)
        if stage != "fit":
            return
        detach_all(self.handles)
        self.handles = []
        if self.monitor is not None and self.monitor is not self._monitor_opt:
            self.monitor.close()

    def __repr__(self) -> str:
        name = self.config if isinstance(self.config, str) else getattr(self.config, "name", type(self.config).__name__)
        return f"OrthofxCallback(config={name!r}, model_attr={self.model_attr!r}, every={self.every})"
