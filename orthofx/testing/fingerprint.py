"""Fingerprints of a model: everything an analysis must leave unchanged."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["ModelFingerprint", "model_fingerprint", "close"]


@dataclass
class ModelFingerprint:
    """State, structure, outputs and gradients of a model at one moment.

    Attributes:
        state: cloned ``state_dict``.
        training: ``{module name: training flag}``.
        structure: ``{module name: (class, id, #forward hooks, #pre-hooks, #backward hooks)}``.
        params: ``{name: id(parameter)}`` (a parametrization or a swapped tensor changes it).
        output: the model's output on the example inputs (computed on a deep copy).
        grads: gradients of ``output.sum()`` w.r.t. the copy's parameters, by name.
    """

    state: dict[str, torch.Tensor]
    training: dict[str, bool]
    structure: dict[str, tuple[Any, ...]]
    params: dict[str, int]
    output: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]

    def diff(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable differences (empty when identical)."""
        out: list[str] = []
        if self.state.keys() != other.state.keys():
            out.append(f"state keys differ: {sorted(self.state.keys() ^ other.state.keys())}")
        for k in self.state.keys() & other.state.keys():
            if not _same(self.state[k], other.state[k]):
                out.append(f"state {k} changed")
        for name, d in (("training flags", (self.training, other.training)),
                        ("module structure", (self.structure, other.structure)),
                        ("parameter identities", (self.params, other.params))):
            if d[0] != d[1]:
                out.append(f"{name} changed")
        if not close(self.output, other.output):
            out.append("outputs changed")
        if self.grads.keys() != other.grads.keys():
            out.append("gradient keys changed")
        for k in self.grads.keys() & other.grads.keys():
            if not close(self.grads[k], other.grads[k]):
                out.append(f"gradient of {k} changed")
        return out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        torch.nan_to_num(a, nan=1.2345e-7), torch.nan_to_num(b, nan=1.2345e-7))


def close(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float = 1e-3) -> bool:
    """Equal up to run-to-run noise: CPU kernels may reduce in a different order between
    two runs, and gradients through an eigendecomposition with (nearly) repeated eigenvalues
    amplify that noise; the tolerance is relative to the largest entry. NaN == NaN."""
    if a is None or b is None:
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    fa, fb = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    scale = float(torch.maximum(fa.abs().max(), fb.abs().max())) if fa.numel() else 0.0
    return bool(torch.allclose(fa, fb, rtol=rtol, atol=rtol * scale + 1e-12))


def model_fingerprint(model: nn.Module, example_inputs: Sequence[Any] | None = None
                      ) -> ModelFingerprint:
    """Fingerprint ``model``; outputs and gradients are computed on a deep copy (so that
    running it does not touch the model's running statistics), with a fixed RNG seed."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    training = {n: m.training for n, m in model.named_modules()}
    structure = {
        n: (type(m), id(m), len(m._forward_hooks), len(m._forward_pre_hooks),
            len(m._backward_hooks))
        for n, m in model.named_modules()
    }
    params = {n: id(p) for n, p in model.named_parameters()}
    output, grads = None, {}
    if example_inputs is not None:
        twin = copy.deepcopy(model)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = twin(*example_inputs)
        output = out.detach().clone()
        named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
        gs = torch.autograd.grad(out.sum(), [p for _, p in named], allow_unused=True)
        grads = {n: (g.detach().clone() if g is not None else None) for (n, _), g in zip(named, gs)}
    return ModelFingerprint(state, training, structure, params, output, grads)
