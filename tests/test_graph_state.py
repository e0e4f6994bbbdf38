"""graph.state.kept_state: running the user's forward to analyse it leaves the model as it was,
also when the forward rebinds a parameter's tensor (``self.weight.data = ...``, as
spectral-norm GAN code renormalises a frozen weight), and ``transform``'s copy starts from the
user's values, not from one more renormalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import orthofx


class GanSpectralLinear(nn.Module):
    """A frozen weight renormalised in every training forward by reassigning ``.data``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin), requires_grad=False)
        self.register_buffer("u", F.normalize(torch.randn(cout), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                v = F.normalize(self.weight.t() @ self.u, dim=0)
                u = F.normalize(self.weight @ v, dim=0)
                sigma = u @ self.weight @ v
                self.weight.data = self.weight.data / sigma  # rebinds the Parameter's tensor
                self.u.copy_(u)
        return x @ self.weight.t()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sn = GanSpectralLinear(8, 16)
        self.proj = nn.Linear(16, 8, bias=False)  # the Pre-SVD layer
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.relu(self.sn(x)))
        hc = h - h.mean(0, keepdim=True)
        cov = hc.t() @ hc / h.shape[0] + 1e-3 * torch.eye(8)
        lam, U = torch.linalg.eigh(cov)
        return self.fc(h @ U @ torch.diag(lam.rsqrt()) @ U.t())


def test_analyze_and_transform_undo_a_rebound_parameter() -> None:
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(32, 8)
    w0, u0 = m.sn.weight.detach().clone(), m.sn.u.clone()
    obj, storage = m.sn.weight, m.sn.weight.data_ptr()
    a = orthofx.analyze(m, (x,))
    assert len(a.producers) == 1
    assert m.sn.weight is obj and m.sn.weight.data_ptr() == storage
    assert torch.equal(m.sn.weight, w0) and torch.equal(m.sn.u, u0)
    gm, _ = orthofx.transform(m, (x,), config="svd")
    assert torch.equal(m.sn.weight, w0) and torch.equal(m.sn.u, u0)  # the user's model
    assert torch.equal(dict(gm.named_parameters())["sn.weight"], w0)  # the copy starts where the user is
