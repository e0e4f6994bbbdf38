"""What a recorded step leaves on the device, and how a flush turns it into records.

At a recorded step the monitor stores, per meta-layer and per producer weight, a
:class:`Pending` entry holding device tensors only (no host sync): the κ summary of the
eigenvalues the layer already computed (:func:`~orthofx.monitor.spectrum.summarize_spectrum`
with the layer's ε from :func:`layer_eps` and the unit roundoff ``u`` of the coarser of the
eigenvalues' dtype and the dtype Σ was formed in, :func:`formation_dtype`), or a detached copy
of a producer weight or of a captured covariance. :func:`to_records` is the flush: it runs the
float64 ``svdvals`` of the weights and ``eigvalsh`` of the captured covariances (where the flush
synchronises anyway), then reads every summary with one device→host transfer per
(device, shape) (:func:`to_host`) and writes the records of :mod:`orthofx.monitor.records`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from orthofx.monitor.capture import covariance_eigenvalues
from orthofx.monitor.records import FIELDS, META
from orthofx.monitor.spectrum import SPECTRUM_FIELDS, summarize_spectrum
from orthofx.monitor.weights import WEIGHT_FIELDS, weight_summary

__all__ = ["Pending", "to_host", "to_records", "layer_eps", "formation_dtype", "unit_roundoff"]


@dataclass
class Pending:
    """One record awaiting its flush (device tensors; host values only where reading costs no sync)."""

    step: int
    kind: str
    layer: str
    summary: torch.Tensor | None  # float64 on the device: SPECTRUM_FIELDS or WEIGHT_FIELDS
    solver: dict[str, int] | None = None  # solver counters at this step (host ints: no sync)
    nonfinite: torch.Tensor | None = None  # running count of non-finite outputs (device tensor)
    eps: float | None = None
    size: int | None = None
    weight: torch.Tensor | None = None  # producer: a detached copy of W, summarised at flush
    matrix: torch.Tensor | None = None  # captured covariance copies (k, n, n), decomposed at flush


def to_host(tensors: list[torch.Tensor]) -> list[Any]:
    """``[t.tolist() for t in tensors]`` with one device→host transfer per (device, shape)."""
    out: list[Any] = [None] * len(tensors)
    groups: dict[tuple[torch.device, tuple[int, ...]], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, tuple(t.shape)), []).append(i)
    for idxs in groups.values():
        for i, v in zip(idxs, torch.stack([tensors[i] for i in idxs]).tolist()):
            out[i] = v
    return out


def layer_eps(module: nn.Module) -> float | None:
    """The ε a meta-layer adds to its covariance: ``orthofx_eps`` or ``eps`` when it is a real
    number, else None (e.g. a swapped-in decomposition: any ε is inside the user's matrix)."""
    for attr in ("orthofx_eps", "eps"):
        v = getattr(module, attr, None)
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            return float(v)
    return None


def formation_dtype(module: nn.Module, spec_input: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype Σ was formed in: the input's for a covariance input; for a features input, the
    layer's covariance dtype (``backend``/``compute_dtype``, as orthofx.nn forms it)."""
    if spec_input == "covariance":
        return dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    backend = getattr(module, "backend", None)
    if not isinstance(backend, str):
        return work
    try:
        from orthofx.nn.covariance_pooling import _covariance_dtype

        return _covariance_dtype(backend, getattr(module, "compute_dtype", None), work, device)
    except Exception:  # a layer outside orthofx.nn: assume it forms Σ in its working dtype
        return work


def unit_roundoff(*dtypes: torch.dtype | None) -> float:
    """``u`` of the coarsest floating dtype among ``dtypes``."""
    return max(torch.finfo(d).eps for d in dtypes if d is not None and d.is_floating_point)


def to_records(
    pending: Sequence[Pending],
    *,
    run: str,
    solver_base: Mapping[str, int],
    solver_nonfinite: int,
    captured: set[str],
) -> list[dict[str, Any]]:
    """The records of ``pending`` (one host sync): solver counters relative to
    ``solver_base`` (the monitor's start), ``solver_nonfinite`` as given, and no
    ``nonfinite_outputs`` for the ``captured`` covariances (their layer is not an orthofx
    module, whose outputs the monitor counts). Summarises the weight and covariance copies
    in place (and drops them)."""
    for p in pending:
        if p.summary is None and p.weight is not None:  # svdvals here, where we sync anyway
            p.summary, p.weight = weight_summary(p.weight), None
        elif p.summary is None and p.matrix is not None:  # float64 eigvalsh of Σ, ε unknown
            lam = covariance_eigenvalues(p.matrix)
            p.summary = summarize_spectrum(lam, None, unit_roundoff(p.matrix.dtype, torch.float64))
            p.matrix = None
    values = to_host([p.summary for p in pending])  # type: ignore[misc]
    zero = torch.zeros((), dtype=torch.int64)
    nonfinite = to_host([zero if p.nonfinite is None else p.nonfinite for p in pending])
    new: list[dict[str, Any]] = []
    for p, vals, nf in zip(pending, values, nonfinite):
        rec: dict[str, Any] = {k: None for k in FIELDS}
        rec.update(run=run, step=p.step, kind=p.kind, layer=p.layer)
        if p.kind == META:
            rec.update(zip(SPECTRUM_FIELDS, vals))
            rank = rec["rank"]
            rec["rank"] = int(rank) if math.isfinite(rank) else None
            rec.update(
                eps=p.eps,
                size=p.size,
                nonfinite_outputs=None if p.layer in captured else int(nf),
                solver_failures=p.solver["failures"] - solver_base["failures"],
                solver_fallbacks=p.solver["fallbacks"] - solver_base["fallbacks"],
                solver_nonfinite=solver_nonfinite,
            )
        else:
            rec.update(zip(WEIGHT_FIELDS, vals))
        new.append(rec)
    return new
