r"""Gradient treatments of the paper (Sec. 5) as pure, composable transforms (optax style).

A transform is a :class:`GradientTransformation` ``(init, update, sets_lr)``:

* ``state = t.init(params)`` — ``params`` is the list of producer parameters (the tensors the
  optimizer updates; for an OW-parametrized layer that is ``parametrizations.weight.original``);
* ``updates, new_state = t.update(updates, state, params, ctx)`` — ``updates`` is an
  :class:`Updates` ``(grads, lr)`` (a plain list of gradients is read as ``Updates(grads)``):
  ``grads[i]`` is the gradient of ``params[i]`` (or ``None``: that producer is skipped and
  ``None`` is returned for it) and ``lr`` the per-producer learning rate chosen so far (a (P,)
  device tensor, or ``None``: the optimizer's scheduled lr). ``ctx`` is a mapping of context,
  e.g. ``{"lrs": [...]}`` (the scheduled lr of each producer, which :func:`olr` needs).
  ``update`` never modifies ``grads`` in place and returns a new state object. Device
  counters (the zero / non-finite counts) and the OLR history buffer are shared between
  the old and the new state and updated in place: that keeps the step free of host
  synchronisation and lets it replay in a CUDA graph.
* ``sets_lr``: whether ``update`` may return ``Updates.lr`` (:func:`orthofx.treatments.attach`
  then gives each producer its own param group so that its lr can be set).

Three modules, as ``optax`` splits its own: :mod:`~orthofx.treatments.gradient.base` (the
protocol), :mod:`~orthofx.treatments.gradient.transforms` (guard, NOG, OLR) and
:mod:`~orthofx.treatments.gradient.combine` (chains); every name is importable from here.

Transforms:

* :func:`nog` — Nearest Orthogonal Gradient: ``G ← U Vᵀ`` of the flattened gradient
  (``G = U S Vᵀ``), all producers of one shape in one batched ``orthofx.linalg.polar`` call
  (``scale``: unit singular values or ‖G‖_F; ``deficient``: partial isometry or lifted
  null space).
* :func:`guard` — zero (and count) non-finite gradients; count zero gradients.
* :func:`olr` — Optimal Learning Rate: computes
  ``η* = (wᵀw·lᵀw) / (wᵀw·lᵀl + 2(lᵀw)²)`` per producer (the first-order minimiser of
  ‖W − ηG‖_F⁴, which is what the paper's eqs. 18–20 reduce to) and returns the lr to use as
  ``Updates.lr``; the gradients pass through unchanged.
* :func:`named_chain` — compose named transforms; the state is a :class:`ChainState`, read
  by name (``state["olr"]``) or position. :func:`chain` is the same with names
  ``"0", "1", …``; :func:`default_chain` is the chain ``attach`` builds from a
  :class:`~orthofx.specs.GradientSpec`.

``orthofx.treatments.attach`` installs any chain as an optimizer step pre-hook.

The mutating form of orthofx 0.1, ``grads = t.update(grads, params, state, **ctx)`` (called
that way, or a transform written that way), is deprecated and removed in 0.3.0: it still runs,
with a DeprecationWarning naming the form above (:mod:`~orthofx.treatments.gradient.legacy`).
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
