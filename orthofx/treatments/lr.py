"""Delivery of a chain's per-producer learning rate (``Updates.lr``, e.g. OLR's) to the optimizer.

Modes (:func:`resolve_lr_mode`; the lr itself is a device tensor computed without host sync):

* ``"float"``: one host transfer per step for all producers (``lr.tolist()``), then plain
  float lrs — works with every optimizer;
* ``"tensor"``: a persistent 0-d float32 tensor per producer group, updated on the device;
* ``"fold"`` (``torch.optim.SGD`` only): sync-free. The group keeps the float scheduled lr
  and ``c = lr / lr_sched`` is folded into the gradient (``grad ← c·(grad + wd·w)``, the
  group's weight decay set to 0) and the momentum buffer (``buf ← c·buf`` before the step,
  ``buf ← buf / c`` after it).

Every step :meth:`LRDelivery.apply` also re-copies the original group's hyperparameters into
each producer's own group (so schedulers of e.g. momentum apply), and a producer that kept its
original group gets that group's values back after the step (:meth:`LRDelivery.after_step`)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from orthofx.errors import ConfigError
from orthofx.syncs import sync_free_preferred
from orthofx.treatments.groups import Slot
from orthofx.treatments.sharding import local

__all__ = ["LRMode", "LR_MODES", "resolve_lr_mode", "warn_if_syncing", "LRDelivery"]

LRMode = Literal["auto", "float", "tensor", "fold"]
LR_MODES = ("auto", "float", "tensor", "fold")

_FOLD_MIN_RATIO = math.sqrt(torch.finfo(torch.float32).tiny)  # ≈ 1.1e-19
_GROUP_SKIP = ("params", "param_names", "lr")


def resolve_lr_mode(opt: torch.optim.Optimizer, slots: Sequence[Slot], lr_mode: str, sets_lr: bool) -> str:
    """The mode for ``lr_mode`` (``"auto"`` resolved; raises ConfigError for a mode the
    optimizer cannot take). Without a chain that sets lrs the mode is inert."""
    if not sets_lr:
        return "float" if lr_mode == "auto" else lr_mode
    groups = [opt.param_groups[s.orig] for s in slots]
    for s, g in zip(slots, groups):
        if "lr" not in g:
            raise ConfigError(f"OLR: the param group of producer {s.name!r} has no 'lr' hyperparameter")
    is_sgd = isinstance(opt, torch.optim.SGD)
    if lr_mode == "fold":
        if not is_sgd:
            raise ConfigError(f"lr_mode='fold' needs torch.optim.SGD, got {type(opt).__name__}")
        if any(g.get("differentiable", False) for g in groups):
            raise ConfigError("lr_mode='fold' does not support differentiable=True")
        return "fold"
    if lr_mode != "auto":
        return lr_mode
    if any(g.get("fused") or g.get("capturable") for g in groups):
        return "tensor"
    if is_sgd and all(sync_free_preferred(s.param.device) for s in slots) and not any(
        g.get("differentiable", False) for g in groups
    ):
        return "fold"
    return "float"


def warn_if_syncing(opt: torch.optim.Optimizer, slots: Sequence[Slot], lr_mode: str, mode: str, sets_lr: bool) -> None:
    """Warn when ``lr_mode="auto"`` fell back to ``"float"`` where a sync-free step is preferred."""
    if sets_lr and lr_mode == "auto" and mode == "float" and any(sync_free_preferred(s.param.device) for s in slots):
        warnings.warn(
            f"orthofx.attach: OLR with {type(opt).__name__} on CUDA hands the learning rate to the "
            "optimizer as a float, one host sync per step. For a sync-free step use torch.optim.SGD "
            "(lr_mode='fold') or an optimizer with fused=True / capturable=True (lr_mode='tensor'); "
            "pass lr_mode='float' to silence this.",
            stacklevel=3,
        )


class LRDelivery:
    """Puts ``Updates.lr`` into the producers' own param groups, in one of the modes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._lr_tensors: list[Tensor] = []
        self._fold_pending: list[tuple[Tensor, Tensor]] = []
        # (group, {key: value}) to put back after the step: the hyperparameters of a kept group
        # (own == orig) that the step changes (lr; weight decay for "fold")
        self._restore: list[tuple[dict, dict[str, Any]]] = []

    def restore_groups(self) -> None:
        for group, values in self._restore:
            group.update(values)
        self._restore.clear()

    @torch.no_grad()
    def apply(
        self,
        opt: torch.optim.Optimizer,
        slots: Sequence[Slot],
        lr: Tensor | None,
        grads: Sequence[Tensor | None],
        scale: Tensor | None,
        hyper: dict[int, dict[str, Any]],
    ) -> None:
        """Before the step. ``lr``: (P,) device tensor, or None for the scheduled lrs;
        ``grads``: the optimizer's gradients (written in place for "fold"); ``scale``: a fused
        optimizer's ``grad_scale`` under GradScaler; ``hyper``: :func:`groups.scheduled`."""
        for s in slots:
            own = opt.param_groups[s.own]  # type: ignore[index]
            if s.own == s.orig:  # the producer kept its group: put back what the step changes
                keys = ("lr", "weight_decay") if self.mode == "fold" else ("lr",)
                self._restore.append((own, {k: own[k] for k in keys if k in own}))
                continue
            for k, v in hyper[s.orig].items():
                if k not in _GROUP_SKIP:
                    own[k] = v
        if self.mode == "float":
            vals = lr.tolist() if lr is not None else [hyper[s.orig]["lr"] for s in slots]  # one host transfer
            for s, v in zip(slots, vals):
                opt.param_groups[s.own]["lr"] = v  # type: ignore[index]
        elif self.mode == "tensor":
            if not self._lr_tensors:
                self._lr_tensors = [torch.zeros((), dtype=torch.float32, device=s.param.device) for s in slots]
            for i, s in enumerate(slots):
                t = self._lr_tensors[i]
                v = lr[i] if lr is not None else hyper[s.orig]["lr"]
                t.copy_(v) if isinstance(v, Tensor) else t.fill_(v)
                opt.param_groups[s.own]["lr"] = t  # type: ignore[index]
        else:
            self._fold(opt, slots, lr, grads, scale, hyper)

    def _fold(
        self,
        opt: torch.optim.Optimizer,
        slots: Sequence[Slot],
        lr: Tensor | None,
        grads: Sequence[Tensor | None],
        scale: Tensor | None,
        hyper: dict[int, dict[str, Any]],
    ) -> None:
        self._fold_pending.clear()
        for i, s in enumerate(slots):
            orig, own = hyper[s.orig], opt.param_groups[s.own]  # type: ignore[index]
            own["lr"] = orig["lr"]
            if lr is None:  # the scheduled lr: nothing to fold
                continue
            own["weight_decay"] = 0.0
            g = grads[i]
            if g is None:
                continue
            base = orig["lr"]
            if isinstance(base, Tensor):
                b = base.to(device=lr.device, dtype=lr.dtype)
                ratio = torch.where(b > 0, lr[i] / b, torch.ones_like(lr[i]))
            else:
                ratio = lr[i] / base if base > 0 else torch.ones_like(lr[i])
            ratio = ratio.clamp_min(_FOLD_MIN_RATIO)
            # c is one number per producer: a DTensor's shards are scaled in place
            g, p = local(g), local(s.param)
            buf = opt.state.get(s.param, {}).get("momentum_buffer")
            c = ratio.to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
            wd = orig.get("weight_decay", 0.0)
            sign = -1.0 if orig.get("maximize", False) else 1.0
            if scale is None:  # in place: g ← c·(g + wd·w), two kernels
                if wd:
                    g.add_(p, alpha=sign * wd)
                g.mul_(c)
            else:
                gu = g.float() / scale.to(g.device)
                folded = c * (gu + (sign * wd) * p) if wd else c * gu
                g.copy_(folded * scale.to(g.device))
            if buf is not None:
                local(buf).mul_(c)
            self._fold_pending.append((s.param, c))

    @torch.no_grad()
    def after_step(self, opt: torch.optim.Optimizer) -> None:
        """After the step: undo the momentum fold and put back the kept groups' values."""
        for p, c in self._fold_pending:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                local(buf).div_(c)
        self._fold_pending.clear()
        self.restore_groups()
