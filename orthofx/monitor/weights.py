"""Statistics of the Pre-SVD (producer) weights, as the treatments see them.

For a producer weight W (``getattr(module, attr)``: the effective weight, e.g. ``f(A − Aᵀ)``
under OW, ``W/σ_max`` under SN) flattened to ``(out, in·k·k)``, with float64 singular values
``σ_1 ≥ … ≥ σ_p`` (``p = min(out, in·k·k)``):

* ``weight_norm = ‖W‖_F``;
* ``weight_cond = σ_max / σ_min`` (``+inf`` when ``σ_min = 0``, NaN for a zero or non-finite W);
* ``weight_sigma_max``, ``weight_sigma_min``.

They show NOG's step-size effect: the polar factor ``U Vᵀ`` has ``‖·‖_F = √p`` whatever the
gradient's size, so NOG moves W by ``lr·√p`` per step and, under a scale-invariant layer (ZCA
whitening), ``‖W‖`` grows — κ(Σ + εI) grows with ``‖W‖²`` while ``weight_cond`` improves.

Cost in the monitor: on recorded steps, one detached device copy of each producer weight
(no sync); at the flush, one float64 ``svdvals`` per copy (a cuSOLVER call, which synchronises
on CUDA — the flush synchronises anyway). ``ConditioningMonitor(..., weights=False)`` skips them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from orthofx.errors import ConfigError

__all__ = ["WEIGHT_FIELDS", "ProducerWeight", "weight_summary", "producer_weights"]

#: the order of the device-side summary vector returned by :func:`weight_summary`
WEIGHT_FIELDS = ("weight_norm", "weight_cond", "weight_sigma_max", "weight_sigma_min")


class ProducerWeight(NamedTuple):
    """A producer weight to watch: ``getattr(module, attr)``, labelled ``label`` (the
    parameter's qualified name in the user's model, e.g. ``"head.reduce.weight"``)."""

    label: str
    module: nn.Module
    attr: str


def weight_summary(weight: Tensor) -> Tensor:
    """(4,) float64 device tensor ``[‖W‖_F, σ_max/σ_min, σ_max, σ_min]`` of ``weight``
    flattened to ``(out, rest)`` (module doc)."""
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64) if weight.dim() > 1 else \
            weight.detach().reshape(1, -1).to(torch.float64)
        finite = torch.isfinite(w).all()
        w_safe = torch.where(finite, w, torch.zeros((), dtype=w.dtype, device=w.device))
        s = torch.linalg.svdvals(w_safe)
        s_max, s_min = s[0], s[-1]
        cond = torch.where(s_min > 0, s_max / torch.where(s_min > 0, s_min, 1.0), torch.inf)
        cond = torch.where(s_max > 0, cond, torch.nan)
        norm = torch.linalg.vector_norm(w)
        nan = torch.full((), torch.nan, dtype=torch.float64, device=w.device)
        out = torch.stack([norm, cond, s_max, s_min])
        return torch.where(finite, out, torch.cat([norm.reshape(1), nan.expand(3)]))


def producer_weights(model: nn.Module, names: list[str] | tuple[str, ...] | None = None) -> list[ProducerWeight]:
    """The producer weights of ``model``.

    ``names=None``: those of the orthofx plan (``orthofx.pipeline.plan_of``) of a transformed
    model, labelled by the parameter's name in the user's model; none for an untransformed
    model. Otherwise the given qualified parameter names (``"0.weight"``), each resolved on
    ``model`` (a parametrized weight resolves to its effective value); an unknown name raises
    :class:`~orthofx.errors.ConfigError`.
    """
    if names is None:
        from orthofx.pipeline import plan_of, unwrap

        plan = plan_of(model)
        if plan is None:
            return []
        root = unwrap(model)
        return [ProducerWeight(p.param, root.get_submodule(p.name) if p.name else root, p.attr)
                for p in plan.producers]
    if isinstance(names, str):
        raise ConfigError(f"producers must be a list of parameter names, got the string {names!r}")
    out = []
    for name in names:
        owner, _, attr = str(name).rpartition(".")
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            mod = None
        value = getattr(mod, attr, None) if mod is not None else None
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ConfigError(f"producers: {name!r} is not a floating-point weight of the model")
        out.append(ProducerWeight(str(name), mod, attr))
    return out
