"""Tensors a forward builds from constants (``torch.eye(c)``, as real code writes a covariance's
ε·I) stay out of the traced model's state_dict, so the stable rewrite keeps the user's keys
and is applied (measured: the rewrite was refused with "extra ['_tensor_constant0']")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.graph.symbolic.trace import trace


class EyeGCP(nn.Module):
    """Covariance pooling as often written: ε·torch.eye(c) built inside forward, raw eigh,
    U √Λ Uᵀ."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.fc = nn.Linear(c * c, 4)
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).flatten(2)
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(self.c)
        lam, u = torch.linalg.eigh(cov)
        y = u @ torch.diag_embed(lam.clamp_min(1e-6).sqrt()) @ u.transpose(1, 2)
        return self.fc(y.flatten(1))


def _x(dtype=torch.float32):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_trace_keeps_constants_out_of_the_state_dict():
    torch.manual_seed(0)
    model = EyeGCP()
    gm = trace(model)
    assert list(gm.state_dict()) == list(model.state_dict())
    consts = [n for n, _ in gm.named_buffers() if n.startswith("_tensor_constant")]
    assert consts, "the trace should hold torch.eye's value as a constant"
    torch.testing.assert_close(gm(_x()), model(_x()), rtol=0, atol=0)
    gm.load_state_dict(model.state_dict(), strict=True)


def test_stable_rewrite_applies_with_a_constant_identity():
    torch.manual_seed(0)
    model = EyeGCP().double()
    gm, report = orthofx.transform(model, (_x(torch.float64),))
    assert report.modified
    assert any("verified" in n for n in report.notes), report.notes
    assert list(gm.state_dict()) == list(model.state_dict())
    x = _x(torch.float64)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-12)
    gm(x).square().sum().backward()
    model(x).square().sum().backward()
    for (name, p), q in zip(gm.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_constant_follows_to(dtype):
    torch.manual_seed(0)
    model = EyeGCP()
    gm, _ = orthofx.transform(model, (_x(),))
    gm.to(dtype)
    consts = [b for n, b in gm.named_buffers() if n.startswith("_tensor_constant")]
    assert consts and all(b.dtype == dtype for b in consts)
    assert gm(_x(dtype)).dtype == dtype
