"""A Pre-SVD weight used as a slice of a higher-dimensional Parameter (SPDNet-style BiMap
``Wᵀ X W`` with ``W = self.W[0, 0]`` of a (1, 1, n, m) Parameter, then ReEig by eigh): analysis
finds it like the 2-D form, the stable rewrite applies, and a treatment — which acts on the
flattened Parameter, not on the slice — is refused with a clear error instead of being applied
to the wrong matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import TreatmentError


class BiMapReEig(nn.Module):
    def __init__(self, n: int, m: int, four_d: bool) -> None:
        super().__init__()
        self.four_d = four_d
        w = torch.linalg.qr(torch.randn(n, m))[0]
        self.W = nn.Parameter(w[None, None].clone() if four_d else w)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        W = self.W[0, 0] if self.four_d else self.W
        P = W.t() @ X @ W
        lam, U = torch.linalg.eigh(P)
        return U @ torch.diag_embed(lam.clamp_min(1e-4)) @ U.transpose(-1, -2)


class Net(nn.Module):
    def __init__(self, four_d: bool) -> None:
        super().__init__()
        self.bimap = BiMapReEig(16, 8, four_d)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)
        X = xc @ xc.transpose(-1, -2) / x.shape[-1] + 1e-3 * torch.eye(16)
        return self.fc(self.bimap(X).flatten(1))


def test_slice_of_a_parameter_is_found_like_the_2d_form() -> None:
    x = torch.randn(4, 16, 30)
    found = []
    for four_d in (False, True):
        torch.manual_seed(0)
        a = orthofx.analyze(Net(four_d), (x,))
        assert a.producer_params == ["bimap.W"], (four_d, str(a))
        assert tuple(a.entries[0].producer.weight_shape) == (16, 8)
        e = a.entries[0]
        found.append((e.kind, e.scope, e.covariance.expression, e.producer.flat_shape))
    assert found[0] == found[1]


def test_slice_producer_stable_rewrite_and_refused_treatment() -> None:
    torch.manual_seed(0)
    model, x = Net(True), torch.randn(4, 16, 30)
    gm, report = orthofx.transform(model, (x,), config="svd")
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    for preset in ("ow", "nog"):
        with pytest.raises(TreatmentError, match=r"\(16, 8\) slice of a \(1, 1, 16, 8\) Parameter"):
            orthofx.transform(model, (x,), config=preset)
    # the 2-D form is treated as before
    gm2, _ = orthofx.transform(Net(False), (x,), config="ow")
    W = gm2.bimap.W.detach()
    torch.testing.assert_close(W.T @ W, torch.eye(8), atol=1e-5, rtol=0)
