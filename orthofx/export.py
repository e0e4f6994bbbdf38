"""Leave orthofx behind: bake a transformed model into a plain one, and checkpoint/replay.

* :func:`strip` — a hook-free, parametrization-free copy whose state-dict keys are the
  original model's (``conv1.weight``, not ``conv1.parametrizations.weight.original``) and
  whose stable meta-layers are swapped back to the original ``torch.linalg`` calls (same
  forward). It loads into the original class and exports with ``torch.export``.
* :func:`save_checkpoint` / :func:`load_checkpoint` — ``{plan, state_dict}``; loading
  replays the plan on a fresh *unmodified* model (parametrized modules are never pickled).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from orthofx.errors import ConfigError
from orthofx.nn.stable import StableDecomposition
from orthofx.rewrite import META_KEY, STABLE_PREFIX, Plan
from orthofx.pipeline import plan_of, transform, unwrap
from orthofx.treatments.weight import bake_all

__all__ = ["strip", "save_checkpoint", "load_checkpoint", "checkpoint"]


def _unswap(gm: fx.GraphModule) -> int:
    """Put the original torch decomposition calls back in place of StableDecomposition modules."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(STABLE_PREFIX):
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, StableDecomposition) or mod.original is None:
            continue
        with gm.graph.inserting_before(node):
            if isinstance(mod.original, str):
                new = gm.graph.call_method(mod.original, node.args, node.kwargs)
            else:
                new = gm.graph.call_function(mod.original, node.args, node.kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def strip(model: nn.Module, *, keep_stable: bool = False) -> nn.Module:
    """A plain copy of a transformed model: parametrizations baked (OW/SN weights hold their
    current value under the original key), stable meta-layers swapped back to the original
    torch calls (unless ``keep_stable``), the orthofx plan removed. ``model`` is untouched.

    The result is hook-free: its ``state_dict()`` loads into the original model class
    (``strict=True`` whenever the original model uses all its submodules in ``forward``), and
    it exports with ``torch.export.export`` and ``torch.jit.trace``.
    """
    src = unwrap(model)
    if plan_of(src) is None:
        raise ConfigError("strip() expects a model returned by orthofx.transform")
    out = copy.deepcopy(src)
    bake_all(out)
    if isinstance(out, fx.GraphModule):
        if not keep_stable:
            _unswap(out)
        out.meta.pop(META_KEY, None)
    else:
        out.__dict__.pop("_orthofx_meta", None)
    return out


def checkpoint(model: nn.Module) -> dict[str, Any]:
    """``{"orthofx_plan": plan dict, "state_dict": ...}`` of a transformed model."""
    plan = plan_of(model)
    if plan is None:
        raise ConfigError("checkpoint() expects a model returned by orthofx.transform")
    return {"orthofx_plan": plan.to_dict(), "state_dict": unwrap(model).state_dict()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    """``torch.save`` of :func:`checkpoint` plus ``extra`` entries (optimizer state, epoch, ...)."""
    ck = checkpoint(model)
    ck.update(extra)
    torch.save(ck, path)


def load_checkpoint(
    model: nn.Module, ckpt: str | os.PathLike | Mapping[str, Any], *, map_location: Any = None
) -> nn.Module:
    """Replay a checkpoint's plan on a fresh, *unmodified* ``model`` and load its state.

    Returns the transformed module (as :func:`orthofx.transform` would), with the saved
    weights, OW bases and buffers. Raises :class:`ConfigError` when the checkpoint's producers
    do not match what the pass finds in ``model`` (a different architecture).
    """
    if not isinstance(ckpt, Mapping):
        ckpt = torch.load(ckpt, map_location=map_location, weights_only=False)
    if "orthofx_plan" not in ckpt:
        raise ConfigError("not an orthofx checkpoint (no 'orthofx_plan' entry)")
    saved = Plan.from_dict(ckpt["orthofx_plan"])
    gm, report = transform(model, config=saved.config)
    got = [p.param for p in plan_of(gm).producers]  # type: ignore[union-attr]
    want = [p.param for p in saved.producers]
    if got != want:
        raise ConfigError(f"checkpoint producers {want} do not match this model's producers {got}")
    unwrap(gm).load_state_dict(ckpt["state_dict"])
    return gm
