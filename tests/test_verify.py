"""Issue 21: the stable-rewrite verification's tolerance follows the dtype
(``orthofx.verify.tolerance``: 2¹⁰·eps, capped at 1e-2). A float32 rounding difference (the
fused float64 eigh of (C + Cᵀ)/2 against the user's float32 eigh) is not a divergence; in
float64 a real change of the maths far below the old fixed 1e-4 is one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthofx
from orthofx.verify import tolerance, verify_rewrite

from corpora.zca import ZCA, Whiten


def _model(whiten: nn.Module, dtype: torch.dtype, mix: float = 0.9) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():  # near-collinear output channels: a moderately conditioned Σ
        conv.weight[1:] = mix * conv.weight[:1] + (1 - mix) * conv.weight[1:]
    return nn.Sequential(conv, whiten, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).to(dtype)


def _x(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_tolerance_is_stated_per_dtype() -> None:
    assert tolerance(torch.float32) == pytest.approx(1024 * 2.0 ** -23)
    assert tolerance(torch.float64) == pytest.approx(1024 * 2.0 ** -52)
    assert tolerance(torch.bfloat16) == tolerance(torch.float16) == 1e-2
    assert tolerance(torch.int64) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_rounding_is_not_a_divergence(dtype: torch.dtype) -> None:
    model, x = _model(Whiten(), dtype), _x(dtype)
    gm, report = orthofx.transform(model, (x,), config="svd")
    (note,) = [n for n in report.notes if n.startswith("stable rewrite")]
    # the fused graph (eigh + U Λ^-1/2 Uᵀ as one exact module) is taken, not refused as diverging
    assert [s.via for s in report.plan.swaps] == ["graph"] and "diverges" not in note, note
    assert f"tol {tolerance(dtype):.1e} rel" in note
    ref = copy.deepcopy(model).eval()
    tol = tolerance(dtype)
    torch.testing.assert_close(gm.eval()(x), ref(x), rtol=tol, atol=tol)


def test_running_buffers_are_compared_at_the_float64_tolerance() -> None:
    model, x = _model(ZCA(8), torch.float64), _x(torch.float64)
    assert verify_rewrite(model, copy.deepcopy(model), (x,)).ok
    # the running-statistics update off by a relative 1e-9 (momentum 0.1 → 0.1 + 1e-10): a real
    # change of the state in float64, which the old fixed tolerance (1e-4 rel) let through
    other = copy.deepcopy(model)
    other[1].momentum += 1e-10
    check = verify_rewrite(model, other, (x,))
    assert not check.ok and "buffer '1.running_" in check.reason, check.describe()


def test_a_real_divergence_is_still_caught_in_float32() -> None:
    model, x = _model(Whiten(), torch.float32), _x(torch.float32)
    other = copy.deepcopy(model)
    other[1].eps = 1.1e-3  # another ε: a different function, far above rounding
    check = verify_rewrite(model, other, (x,))
    assert not check.ok and "output 0 differs" in check.reason, check.describe()
