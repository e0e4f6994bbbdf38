"""A gradient treatment of your own on the Pre-SVD layer: Muon-style orthogonalised momentum.

    python examples/muon_chain.py

orthofx's gradient treatments are pure transforms (``init(params) -> state``,
``update(updates, state, params, ctx) -> (updates, new_state)``) that compose with
``named_chain``. ``orthofx.treatments.attach(..., chain=...)`` installs any chain as an
optimizer step pre-hook, so a new treatment needs no change to orthofx. Here:

    m ← β·m + g                      (momentum of the flattened (out, in·k·k) gradient)
    update direction = polar(m)      (U Vᵀ of m = U S Vᵀ: orthofx.linalg.polar)
                       · √max(1, rows/cols)   (optional, Muon's shape scaling)

chained after orthofx's ``guard()`` (NaN/Inf gradients become zero and are counted), and
handed to a plain SGD (no momentum of its own: the momentum lives in the chain).

The same chain in the optimizer form (no hooks to install):
``orthofx.optim.OrthoSGD(gm, lr, momentum=0, chain=muon_chain())`` — see the end of ``main``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import orthofx
import orthofx.optim
from orthofx.linalg import polar
from orthofx.pipeline import plan_of
from orthofx.treatments import GradientTransformation, Updates, as_updates, guard, named_chain


@dataclass(frozen=True)
class MuonState:
    momentum: tuple[Tensor, ...]  # one buffer per producer, in the gradient's shape


def muon(beta: float = 0.95, *, scale: bool = True, method: str = "auto") -> GradientTransformation:
    """Muon-style orthogonalised momentum, as an orthofx gradient transform.

    Args:
        beta: momentum coefficient (``m ← β m + g``).
        scale: multiply the polar factor by ``√max(1, rows/cols)`` of the flattened weight.
        method: ``orthofx.linalg.polar`` method (``"ns"`` / ``"polar_express"`` are the
            Newton–Schulz-type iterations; ``"auto"`` picks a sync-free one on CUDA).
    """

    def init(params: Sequence[Tensor]) -> MuonState:
        # the (global) shape: a sharded FSDP2 parameter's gradient reaches the chain gathered
        return MuonState(tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params))

    @torch.no_grad()
    def update(
        updates: Any, state: MuonState, params: Sequence[Tensor] | None = None, ctx: Mapping[str, Any] | None = None
    ) -> tuple[Updates, MuonState]:
        updates = as_updates(updates)
        grads, momentum = [], []
        for g, m in zip(updates.grads, state.momentum):
            if g is None:  # no gradient this step: nothing moves, the momentum is kept
                grads.append(None)
                momentum.append(m)
                continue
            m = beta * m + g  # a new tensor: the old state is left as it was
            rows, cols = m.shape[0], m[0].numel()
            # guard() ran first, so m is finite: no validation (and no host sync) needed
            o = polar(m.reshape(rows, cols), method=method, validate=False, track_nonfinite=False)
            if scale:
                o = o * math.sqrt(max(1.0, rows / cols))
            grads.append(o.reshape(g.shape).to(g.dtype))
            momentum.append(m)
        return updates._replace(grads=grads), MuonState(tuple(momentum))

    return GradientTransformation(init, update)  # sets_lr=False: the scheduled lr is used


def muon_chain(beta: float = 0.95, *, scale: bool = True, method: str = "auto") -> GradientTransformation:
    """orthofx's guard, then Muon; the state is read by name: ``state["muon"].momentum``."""
    return named_chain(("guard", guard()), ("muon", muon(beta, scale=scale, method=method)))


class Net(nn.Module):
    """The quickstart model: a GCP-style eigh head behind a 1×1 conv (the Pre-SVD layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.reduce = nn.Conv2d(32, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.reduce(torch.relu(self.conv(x)))))
        n, c, h, w = x.shape
        f = x.reshape(n, c, h * w)
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / (h * w) + 1e-5 * torch.eye(c)
        lam, u = torch.linalg.eigh(cov)
        root = u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)
        return self.fc(root.flatten(1))


def main() -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    gm, report = orthofx.transform(model, (x,), config="svd")  # find the Pre-SVD layers, change nothing
    plan = plan_of(gm)
    producers = {p.param: (gm.get_submodule(p.name), p.attr) for p in plan.producers}
    print("Pre-SVD layers:", list(producers))

    opt = torch.optim.SGD(gm.parameters(), lr=0.02)
    # the chain replaces the default one (NOG/OLR from the plan's config) on these producers
    handle = orthofx.treatments.attach(opt, producers, chain=muon_chain(beta=0.9))
    for step in range(5):
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    m = handle.state["muon"].momentum[0]
    print("momentum of", handle.names[0], "has norm", round(m.norm().item(), 4))
    print(handle.stats())

    # the optimizer form: a torch.optim.SGD whose producers (from gm's plan) run the chain
    gm2, _ = orthofx.transform(Net(), (x,), config="svd")
    opt2 = orthofx.optim.OrthoSGD(gm2, lr=0.02, momentum=0.0, chain=muon_chain(beta=0.9))
    for step in range(2):
        loss = F.cross_entropy(gm2(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    print("OrthoSGD + Muon chain:", opt2.handle.stats()["steps"], "steps, loss", round(loss.item(), 4))


if __name__ == "__main__":
    main()
