"""CovariancePooling trains: forward + backward in training mode with its reduction BatchNorm
(whose running statistics are guarded against non-finite batches), on the CPU path and on the
CUDA code path (``cuda_policy``), over several steps. Regression: the guard restored the
buffers in place after the BN node had saved them, and every backward raised
"modified by an inplace operation"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.syncs import cuda_policy


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.pool = orthofx.nn.CovariancePooling(16, reduced=8)
        self.fc = nn.Linear(8 * 9 // 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)))


@pytest.mark.parametrize("policy", ["host", "cuda"])
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_training_steps_backpropagate(policy: str, nonfinite: str, device: torch.device) -> None:
    torch.manual_seed(0)
    m = Head().to(device)
    m.pool.nonfinite = nonfinite
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g).to(device), torch.randint(0, 4, (8,), generator=g).to(device)
    ctx = cuda_policy() if policy == "cuda" else torch.enable_grad()
    before = m.pool.bn.running_mean.clone()
    with ctx:
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert not torch.equal(m.pool.bn.running_mean, before)  # the statistics did update
