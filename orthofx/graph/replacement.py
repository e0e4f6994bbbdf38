"""The orthofx.nn module that replaces a user's meta-layer that no swap can reach (pure).

``transform`` swaps only raw ``torch.linalg.eigh``/``svd`` calls for a stable decomposition.
A meta-layer computed in a user ``autograd.Function`` or by a Newton–Schulz loop keeps its own
backward; the analysis then names, per meta-layer (``MetaLayerEntry.notes``), the orthofx.nn
module with the same maths and its arguments, read from the module that runs it:

* a matrix square root of a covariance (iSQRT-COV's ``Sqrtm``, usage ``pooling``/``sqrtm``)
  → ``orthofx.nn.CovariancePooling(in_channels, reduced=, eps=, iters=)``;
* an inverse square root (ZCA / IterNorm, usage ``whitening``/``invsqrtm``)
  → ``orthofx.nn.DecorrelatedBatchNorm(num_features, groups=, eps=, momentum=, iters=)``.

The authors' argument names map to orthofx's (``iterNum``/``iterN``/``T`` → ``iters``,
``dimension_reduction``/``dr`` → ``reduced``, ``num_groups`` → ``groups``); a 1×1 reduction
convolution inside the module that runs the meta-layer (MPN-COV's ``conv_dr_block``) gives
``in_channels`` and ``reduced``, which CovariancePooling builds itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from orthofx.graph.result import AnalysisReport, MetaLayerEntry

__all__: list[str] = []  # internal module: import what you need by name

_ITERS = ("iters", "iterNum", "iterN", "iter_num", "num_iter", "n_iter", "num_iters", "T")
_REDUCED = ("dimension_reduction", "dr", "reduced")
_GROUPS = ("groups", "num_groups")
_SQRT = ("pooling", "sqrtm")
_INVSQRT = ("whitening", "invsqrtm")


def _attr(module: nn.Module, names: tuple[str, ...], kind: type) -> tuple[str, Any] | None:
    """The first of ``names`` that ``module`` holds as a plain ``kind`` value (not a bool)."""
    for name in names:
        v = module.__dict__.get(name)
        if isinstance(v, kind) and not isinstance(v, bool):
            return name, v
    return None


def _why_no_swap(e: MetaLayerEntry) -> str | None:
    if e.source == "orthofx":
        return None
    if e.source in ("autograd.Function", "config"):
        return f"{e.target} keeps its own backward"
    if e.kind not in ("eigh", "svd"):
        return f"its {e.kind} iteration keeps autograd's backward"
    return None  # a raw eigh/svd: transform swaps it where verified


def replacement_for(e: MetaLayerEntry, model: nn.Module) -> str | None:
    """``"orthofx.nn.<Class>(<args>)"`` plus where each argument came from, for meta-layer
    ``e`` of ``model`` (its module: ``e.scope``), or None when no orthofx.nn module has its
    maths (a power iteration, a Cholesky whitening, an SVD of unknown use)."""
    sqrt = e.usage in _SQRT or e.kind == "ns_sqrt"
    inv = e.usage in _INVSQRT or e.kind == "ns_invsqrt"
    if sqrt == inv:
        return None
    try:
        owner = model.get_submodule(e.scope) if e.scope else model
    except AttributeError:
        return None
    p = e.producer
    args: list[str] = []
    came: list[str] = []
    if sqrt:
        inside = bool(e.scope) and p.name.startswith(e.scope + ".") and p.type == "Conv2d" \
            and p.weight_shape[2:] == (1, 1)
        if inside:  # the reduction conv is part of the replaced module: CovariancePooling builds its own
            args += [str(p.weight_shape[1] * p.groups), f"reduced={p.weight_shape[0]}"]
            red = _attr(owner, _REDUCED, int)
            came.append(f"{red[0] + ' = ' if red else ''}{p.name}'s {args[0]} → {p.weight_shape[0]} channels "
                        f"→ in_channels, reduced")
        else:
            args.append(str(p.flat_shape[0]))
        cls = "CovariancePooling"
    else:
        args.append(str(p.flat_shape[0]))
        groups = _attr(owner, _GROUPS, int)
        if groups is not None:
            args.append(f"groups={groups[1]}")
            came.append(f"{groups[0]} → groups")
        cls = "DecorrelatedBatchNorm"
    for names, kind, arg in ((("eps",), float, "eps"), (("momentum",), float, "momentum"), (_ITERS, int, "iters")):
        if arg == "momentum" and sqrt or arg == "iters" and not e.kind.startswith("ns_"):
            continue
        hit = _attr(owner, names, kind)
        if hit is not None:
            args.append(f"{arg}={hit[1]!r}")
            if hit[0] != arg:
                came.append(f"{hit[0]} → {arg}")
    text = f"orthofx.nn.{cls}({', '.join(args)})"
    return text + (f" ({', '.join(came)})" if came else "")


def add_replacement_notes(report: AnalysisReport, model: nn.Module) -> None:
    """Give every entry of ``report`` that no swap can reach the note naming its orthofx.nn
    replacement (:func:`replacement_for`), in place."""
    for i, e in enumerate(report.entries):
        why = _why_no_swap(e)
        what = replacement_for(e, model) if why else None
        if what:
            note = f"no swap can be made ({why}); replacement with a stable backward: {what}"
            report.entries[i] = dataclasses.replace(e, notes=(*e.notes, note))
