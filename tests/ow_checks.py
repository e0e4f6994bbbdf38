"""Checks shared by the tests of the OW weight treatments whose generator is normalised by a
carried power iteration (σ̂ ≈ the largest singular value): flat OW with
``generator="normalized"`` (test_ow_normalized) and SOC (test_ow_soc)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["assert_invariant_to_generator_scale"]


def assert_invariant_to_generator_scale(m: nn.Module, x: torch.Tensor, c: float) -> nn.Module:
    """Assert ``m(x)`` is unchanged, to 1e-12 absolute (float64 ``m`` and ``x``), when the
    generator ``m.parametrizations.weight.original`` is multiplied by ``c``: first in training
    mode (one power iteration; a copy of ``m`` against a scaled copy, both starting from the
    same carried buffers), then in eval mode (pure; ``m`` itself scaled in place and left in
    eval). Returns the scaled copy after its training forward."""
    # training mode: one power iteration, the same buffers for both
    ref = copy.deepcopy(m)(x)
    scaled = copy.deepcopy(m)
    with torch.no_grad():
        scaled.parametrizations.weight.original.mul_(c)
    torch.testing.assert_close(scaled(x), ref, rtol=0, atol=1e-12)
    # eval mode (pure): the same module, its generator scaled in place
    m.eval()
    ref = m(x)
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(c)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-12)
    return scaled
