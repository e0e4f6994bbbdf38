"""What an :class:`~orthofx.treatments.attach.AttachHandle` reports: the chain's state read by
member (the guard/NOG counters, the OLR values), ``stats()``, ``olr_history()`` and
``reset_stats()``. A mixin: the handle holds the state, this module only reads it.

Reading is the one place that leaves the device: ``stats()`` makes one host transfer per
value it reports (``int(counter)``, ``tensor.tolist()``), so call it when you log, not per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from orthofx.treatments.gradient import ChainState, GuardState, OLRState
from orthofx.treatments.ow_target import WeightTargetState

__all__ = ["HandleStats"]

_OLR_KEYS = ("eta", "lr", "base")


class HandleStats:
    """The reading side of an attach handle. Needs ``state`` (the chain's state), ``names``
    (producer names), ``options`` (a dict), ``_steps`` (an int) and ``_skipped`` (a device
    counter of steps undone by ``skip_nonfinite="model"``, or None)."""

    state: Any
    names: tuple[str, ...]
    _steps: int
    _skipped: Tensor | None
    options: dict[str, Any]  # a property of the handle

    @property
    def chain_state(self) -> Any:
        """The chain's own state (under ``ow_target="weight"`` the state of the wrapped chain)."""
        st = self.state
        return st.inner if isinstance(st, WeightTargetState) else st

    @property
    def chain_names(self) -> tuple[str, ...]:
        """The names of the chain's members (``()`` for a chain that is not named)."""
        st = self.chain_state
        return st.names if isinstance(st, ChainState) else ()

    def _member(self, names: tuple[str, ...], cls: type) -> Any:
        """The chain member first named in ``names`` that is a ``cls``, else the first ``cls``."""
        st = self.chain_state
        if isinstance(st, ChainState):
            for n in names:
                v = st.get(n)
                if isinstance(v, cls):
                    return v
            return next((v for v in st if isinstance(v, cls)), None)
        return st if isinstance(st, cls) else None

    @property
    def guard_state(self) -> GuardState | None:
        """The counters' state: the chain member named ``"nog"`` or ``"guard"`` (or the first
        :class:`GuardState`); None for a custom chain without one."""
        return self._member(("nog", "guard"), GuardState)

    @property
    def olr_state(self) -> OLRState | None:
        """The chain member named ``"olr"`` (or the first :class:`OLRState`); None without OLR."""
        return self._member(("olr",), OLRState)

    def stats(self) -> dict[str, Any]:
        """Host values (one sync): ``steps``, ``zero_grads``, ``nonfinite_grads`` (counted over
        all producers and steps; absent for a custom chain without a guard), options, names
        and, with OLR, the last ``eta``/``lr``/``base`` per producer name; under
        ``ow_target="weight"`` the pull-back's relative residual per producer (``ow_residual``)."""
        out: dict[str, Any] = {"producers": list(self.names), **self.options, "steps": self._steps}
        gs = self.guard_state
        if gs is not None:
            out["zero_grads"] = int(gs.zero)
            out["nonfinite_grads"] = int(gs.nonfinite)
        if self._skipped is not None:
            out["skipped_steps"] = int(self._skipped)
        st = self.olr_state
        if st is not None and st.lr is not None:
            for key in _OLR_KEYS:
                out[f"last_{key}"] = dict(zip(self.names, getattr(st, key).tolist()))
        if isinstance(self.state, WeightTargetState) and self.state.residual is not None:
            out["ow_residual"] = {n: v for n, v in zip(self.names, self.state.residual.tolist()) if v == v}
        return out

    def olr_history(self) -> dict[str, Tensor]:
        """``{"eta", "lr", "base"}`` → (steps, producers) tensors: η*, the lr used and the
        scheduled lr at every step (on the producers' device; empty without OLR/history)."""
        st = self.olr_state
        if st is None:
            return {k: torch.empty(0, 0) for k in _OLR_KEYS}
        return st.read_history()

    def reset_stats(self) -> None:
        """Zero the counters and clear the OLR history."""
        self._steps = 0
        gs = self.guard_state
        if gs is not None:
            gs.zero.zero_()
            gs.nonfinite.zero_()
            gs.steps = 0
        st = self.olr_state
        if st is not None and st.history is not None:
            st.history.clear()
