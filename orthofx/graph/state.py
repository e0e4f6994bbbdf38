"""The user's model while orthofx runs it to analyse it: one at a time, and left as it was.

* :data:`TRACE_LOCK` (and :func:`traces_one_at_a_time`): one trace or recording at a time,
  process-wide; both engines patch or hook process-wide state while they run a forward.
* :func:`kept_state`: restores training flags, attributes, reassigned parameters/buffers,
  buffer values and the RNGs (torch, CUDA, ``random``, NumPy) after the forward.
* :func:`quiet_user_hooks`: the user's own module hooks stay silent (torch's own stay on).

Used by the recorded engine (:mod:`orthofx.graph.recorded.record`), the symbolic tracer
(:mod:`orthofx.graph.symbolic.trace`) and the rewrite's verification runs.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__: list[str] = []  # internal module: import what you need by name

#: Held while orthofx traces or records a model. torch.fx patches ``nn.Module.__call__`` (and
#: orthofx's recorder installs process-wide hooks) for the duration of a trace, so two traces in
#: two threads would see each other's module calls; :func:`orthofx.transform`, :func:`analyze`
#: and :func:`orthofx.pipeline.replay` take this (re-entrant) lock, so concurrent calls run one
#: after the other.
TRACE_LOCK = threading.RLock()


def traces_one_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run while holding :data:`TRACE_LOCK`."""

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with TRACE_LOCK:
            return fn(*args, **kwargs)

    return locked


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _is_torch_hook(hook: Any) -> bool:
    owner = getattr(hook, "__module__", None) or type(hook).__module__
    return str(owner).startswith("torch.")


@contextlib.contextmanager
def quiet_user_hooks(model: nn.Module) -> Iterator[None]:
    """Within the block, the forward/backward (pre-)hooks the user registered on ``model``'s
    modules are switched off; torch's own hooks (``weight_norm``, parametrizations, ...) stay.
    Put back on exit, in their order."""
    saved: list[tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        for attr in _HOOK_DICTS:
            hooks = m.__dict__.get(attr)
            if hooks:
                saved.append((m, attr, hooks))
                m.__dict__[attr] = OrderedDict((k, h) for k, h in hooks.items() if _is_torch_hook(h))
    try:
        yield
    finally:
        for m, attr, hooks in saved:
            m.__dict__[attr] = hooks


@contextlib.contextmanager
def kept_state(model: nn.Module, keep_new: str | None = None, *, values: bool = False) -> Iterator[None]:
    """Restore training flags, module attributes (incl. reassigned buffers/params), the tensors
    behind parameters and buffers (``p.data = ...`` in forward is undone), RNGs.

    ``keep_new``: a prefix of new attribute names that are kept (the fx tracer stores tensor
    constants on the root as ``_tensor_constant<i>``). ``values``: also restore the values of
    buffers changed in place (symbolic tracing runs in-place updates of running statistics
    whose operands are not Proxies for real).
    """
    modules = list(model.modules())
    saved_values = [(b, b.detach().clone()) for b in model.buffers()] if values else []
    # the tensor behind every parameter and buffer: a forward that rebinds ``p.data = ...`` (as
    # spectral-norm GAN code does with a frozen weight) is undone by rebinding, without a copy
    datas = [(t, t.data) for t in (*model.parameters(), *model.buffers())]
    flags = [m.training for m in modules]
    attrs = [dict(m.__dict__) for m in modules]
    tables = [(dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in modules]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    try:
        import numpy as np
        np_rng: Any = np.random.get_state()
    except Exception:  # noqa: BLE001 - numpy is optional here
        np, np_rng = None, None
    try:
        yield
    finally:
        for m, flag, saved, (ps, bs, ms) in zip(modules, flags, attrs, tables):
            for k in [k for k in m.__dict__ if k not in saved]:
                if keep_new is None or not k.startswith(keep_new):
                    del m.__dict__[k]
            for k, v in saved.items():
                if m.__dict__.get(k) is not v:
                    m.__dict__[k] = v
            for table, old in ((m._parameters, ps), (m._buffers, bs), (m._modules, ms)):
                if table.keys() != old.keys() or any(table[k] is not v for k, v in old.items()):
                    table.clear()
                    table.update(old)
            m.training = flag
        for t, d in datas:
            if t.data_ptr() != d.data_ptr() or t.shape != d.shape or t.dtype != d.dtype:
                t.data = d
        with torch.no_grad():
            for b, v in saved_values:
                if b.shape == v.shape and b.dtype == v.dtype:
                    b.copy_(v)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np is not None and np_rng is not None:
            np.random.set_state(np_rng)
