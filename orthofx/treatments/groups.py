"""Param-group shaping for a chain that sets per-producer learning rates (OLR).

Each producer moves into a param group of its own (a copy of its original group's
hyperparameters) so that its lr can be set every step; :func:`unsplit_groups` puts it back.
No group is left empty: when every parameter of a group is a producer, the first of them keeps
that group (``own == orig``). :func:`split_saved_state` lays out an optimizer state dict saved
before the split the way the split lays out the groups (``load_state_dict`` pre-hook)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from orthofx.errors import AttachError

__all__ = ["Slot", "locate", "split_groups", "unsplit_groups", "check_groups", "split_saved_state", "scheduled"]


@dataclass
class Slot:
    name: str
    param: Tensor
    orig: int  # index of the param group that held the parameter
    pos: int  # its position in that group's "params" at attach time
    own: int | None = None  # index of its own group (after split_groups); == orig when the producer
    # was the last parameter of its group, which it then keeps (no empty group is left behind)
    pname: str | None = None  # entry of the original group's "param_names", if any


def locate(opt: torch.optim.Optimizer, items: Sequence[tuple[str, Tensor]]) -> list[Slot]:
    """A :class:`Slot` per producer: where the optimizer holds it. Raises AttachError for a
    producer the optimizer does not hold."""
    where: dict[int, tuple[int, int]] = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, q in enumerate(group["params"]):
            where.setdefault(id(q), (gi, pi))
    missing = [(n, p) for n, p in items if id(p) not in where]
    if missing:
        desc = ", ".join(f"{n!r} {tuple(p.shape)}" for n, p in missing)
        raise AttachError(
            f"{type(opt).__name__} does not hold the producer parameter(s) {desc}. Build the "
            "optimizer from the transformed model's parameters (a parametrized weight is "
            "optimized through `<module>.parametrizations.weight.original`)."
        )
    return [Slot(name=n, param=p, orig=where[id(p)][0], pos=where[id(p)][1]) for n, p in items]


def scheduled(opt: torch.optim.Optimizer, slots: Sequence[Slot]) -> dict[int, dict[str, Any]]:
    """The hyperparameters of each producer's original group, read before the step changes
    any (a kept group, own == orig, carries the chain's lr during the step only)."""
    return {
        s.orig: {k: v for k, v in opt.param_groups[s.orig].items() if k not in ("params", "param_names")}
        for s in slots
    }


def split_groups(opt: torch.optim.Optimizer, slots: Sequence[Slot]) -> None:
    """Move each producer into its own param group copying its original group's options.

    A group whose parameters are all producers is never left empty: its first producer keeps
    it as its own group (``own == orig``) and only the others move. Empty groups would confuse
    code that walks ``param_groups`` (torch's distributed checkpoint refuses more than one), and
    keeping the group, rather than deleting it, leaves every group index — and so the per-group
    lists of LR schedulers created before or after attach — where it was."""
    by_group: dict[int, list[Slot]] = {}
    for s in slots:
        by_group.setdefault(s.orig, []).append(s)
    for gi, ss in by_group.items():
        if len(ss) == len(opt.param_groups[gi]["params"]):
            keep = min(ss, key=lambda s: s.pos)
            keep.own = gi
            names = opt.param_groups[gi].get("param_names")
            if names is not None and keep.pos < len(names):
                keep.pname = names[keep.pos]
    moving = [s for s in slots if s.own is None]
    # remove from the original groups, highest position first so positions stay valid
    for s in sorted(moving, key=lambda s: (s.orig, -s.pos)):
        g = opt.param_groups[s.orig]
        assert g["params"][s.pos] is s.param
        del g["params"][s.pos]
        if "param_names" in g:
            s.pname = g["param_names"].pop(s.pos)
    for s in moving:
        g = opt.param_groups[s.orig]
        new = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        new["params"] = [s.param]
        if s.pname is not None:
            new["param_names"] = [s.pname]
        opt.add_param_group(new)
        s.own = len(opt.param_groups) - 1


def unsplit_groups(opt: torch.optim.Optimizer, slots: Sequence[Slot]) -> None:
    """Undo :func:`split_groups`: put every moved producer back at its place in its original
    group (its optimizer state, e.g. the momentum buffer, is kept) and drop its own group."""
    moved = [s for s in slots if s.own != s.orig]
    for s in sorted(moved, key=lambda s: -(s.own or 0)):
        if s.own is not None and s.own < len(opt.param_groups):
            if any(q is s.param for q in opt.param_groups[s.own]["params"]):
                del opt.param_groups[s.own]
    for s in sorted(moved, key=lambda s: (s.orig, s.pos)):
        g = opt.param_groups[s.orig]
        g["params"].insert(s.pos, s.param)
        if s.pname is not None and "param_names" in g:
            g["param_names"].insert(s.pos, s.pname)


def check_groups(opt: torch.optim.Optimizer, slots: Sequence[Slot]) -> None:
    """Raise AttachError unless every producer is still alone in its own group."""
    for s in slots:
        ok = s.own is not None and s.own < len(opt.param_groups)
        ok = ok and len(opt.param_groups[s.own]["params"]) == 1  # type: ignore[index]
        ok = ok and opt.param_groups[s.own]["params"][0] is s.param  # type: ignore[index]
        if not ok:
            raise AttachError(
                f"the param groups of {type(opt).__name__} changed after orthofx.attach "
                f"(producer {s.name!r} is no longer alone in group {s.own}); "
                "call handle.remove() before editing param groups, then attach again"
            )


def split_saved_state(opt: torch.optim.Optimizer, slots: Sequence[Slot], state_dict: Any) -> dict | None:
    """``optimizer.load_state_dict`` after the split: a state saved after it (same group
    count) loads as is (None); a state saved *before* it (or by an optimizer that was never
    split) is returned laid out as :func:`split_groups` lays out the groups — each producer
    taken out of its saved group into its own group, with the saved group's hyperparameters;
    anything else raises an :class:`AttachError` that says how the group counts came about."""
    saved = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if not isinstance(saved, list):
        return None
    moved = sorted((s for s in slots if s.own != s.orig), key=lambda s: s.own)  # type: ignore[arg-type,return-value]
    n_now = len(opt.param_groups)
    n_before = n_now - len(moved)
    if len(saved) == n_now:
        return None
    name = type(opt).__name__
    if len(saved) != n_before:
        raise AttachError(
            f"{name}.load_state_dict: the saved state has {len(saved)} param group(s); this {name} "
            f"has {n_now} since orthofx.attach with OLR moved {len(moved)} producer(s) into param "
            f"groups of their own ({n_before} before). A state saved after attach loads into an "
            "optimizer built the same way *after* orthofx.attach(opt, model) — call attach before "
            "opt.load_state_dict(...) — and a state saved before attach loads before or after it."
        )
    groups = [dict(g) for g in saved]
    for g in groups:
        g["params"] = list(g["params"])
        if "param_names" in g:
            g["param_names"] = list(g["param_names"])
    taken: dict[int, tuple[Any, Any]] = {}
    for s in sorted(moved, key=lambda s: (s.orig, -s.pos)):
        g = groups[s.orig]
        if s.pos >= len(g["params"]):
            raise AttachError(
                f"{name}.load_state_dict: saved param group {s.orig} has {len(g['params'])} "
                f"parameter(s); producer {s.name!r} was at position {s.pos} of it when orthofx.attach ran"
            )
        names = g.get("param_names")
        taken[id(s)] = (g["params"].pop(s.pos), names.pop(s.pos) if names and s.pos < len(names) else None)
    for s in moved:
        idx, pname = taken[id(s)]
        new = {k: v for k, v in saved[s.orig].items() if k not in ("params", "param_names")}
        new["params"] = [idx]
        if pname is not None:
            new["param_names"] = [pname]
        groups.insert(s.own, new)  # type: ignore[arg-type]
    return {**state_dict, "param_groups": groups}
