r"""Gradient treatments of the paper (Sec. 5) as pure, composable transforms (optax style).

A transform is a :class:`GradientTransformation` ``(init, update, sets_lr)``:
``state = t.init(params)`` and ``updates, new_state = t.update(updates, state, params, ctx)``
with ``updates`` an :class:`Updates` ``(grads, lr)`` (``grads[i]`` the gradient of
``params[i]`` or None; ``lr`` a (P,) device tensor or None) and ``ctx`` a mapping such as
``{"lrs": [...]}``. ``update`` never modifies ``grads`` in place; device counters and the OLR
history are shared between old and new state and updated in place (no host sync, CUDA-graph
replayable). The protocol: :mod:`~orthofx.treatments.gradient.base`.

* :func:`nog` — ``G ← U Vᵀ`` of the flattened gradient ``G = U S Vᵀ``, batched per shape;
* :func:`guard` — zero (and count) non-finite gradients, count zero gradients;
* :func:`olr` — ``η* = (wᵀw·lᵀw) / (wᵀw·lᵀl + 2(lᵀw)²)`` per producer (the first-order
  minimiser of ‖W − ηG‖_F⁴, what the paper's eqs. 18–20 reduce to), returned as ``Updates.lr``;
* :func:`named_chain` / :func:`chain` — composition, state :class:`ChainState` read by name
  or position; :func:`default_chain` — the chain of a :class:`~orthofx.specs.GradientSpec`.

:func:`orthofx.treatments.attach` installs a chain on an optimizer (docs/attach.md). The
mutating form of orthofx 0.1, ``grads = t.update(grads, params, state, **ctx)``, still runs with
a DeprecationWarning until 0.3.0 (:mod:`~orthofx.treatments.gradient.legacy`).
"""

from __future__ import annotations

from orthofx.treatments.gradient.base import GradientTransformation, Updates, as_updates
from orthofx.treatments.gradient.combine import ChainState, chain, default_chain, named_chain
from orthofx.treatments.gradient.transforms import (
    DeviceHistory, GuardState, NOGState, OLRState, guard, nog, olr, olr_eta,
)

__all__ = [
    "GradientTransformation",
    "Updates",
    "ChainState",
    "GuardState",
    "NOGState",
    "OLRState",
    "DeviceHistory",
    "as_updates",
    "nog",
    "guard",
    "olr",
    "chain",
    "named_chain",
    "default_chain",
    "olr_eta",
]
