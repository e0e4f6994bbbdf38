"""Hand-written ZCA whitening of (N, C, H, W) features, as projects write it, shared by the
tests: X̄ the centred (C, N·H·W) features, Σ = X̄ X̄ᵀ / (N·H·W) + εI, the whitening matrix
W = U Λ^{-1/2} Uᵀ from ``torch.linalg.eigh(Σ)``, the output W X̄ back in (N, C, H, W).

* :class:`Whiten` — no parameters and no buffers: the batch statistics in training and eval;
* :class:`ZCA` — a running mean and a running W updated in place under ``torch.no_grad()`` on
  ``self.training`` and used in eval; ``how`` says what the gradient sees of W.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HOWS", "ZCA", "Whiten"]

#: ``ZCA(how=...)``: "live" (the gradient flows through W), "detach" (W.detach() is used),
#: "no_grad" (eigh and W formed under ``torch.no_grad()``, a constant of the step)
HOWS = ("live", "detach", "no_grad")


class Whiten(nn.Module):
    """ZCA whitening with the batch statistics only: centre, Σ = X̄ X̄ᵀ/M + εI, Σ^{-1/2} X̄."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xf = x.transpose(0, 1).reshape(c, -1)
        xc = xf - xf.mean(1, keepdim=True)
        cov = xc @ xc.t() / xc.shape[1] + self.eps * torch.eye(c, dtype=x.dtype)
        lam, u = torch.linalg.eigh(cov)
        return (u @ torch.diag(lam.rsqrt()) @ u.t() @ xc).reshape(c, n, h, w).transpose(0, 1)


class ZCA(nn.Module):
    """ZCA whitening with running statistics: in training Σ of the batch, W = U Λ^{-1/2} Uᵀ,
    and ``running ← (1 − momentum)·running + momentum·batch`` in place under no_grad (the
    running W takes ``W.detach()``); in eval the running mean and W. ``how`` is one of
    :data:`HOWS`."""

    def __init__(self, c: int, eps: float = 1e-3, momentum: float = 0.1, how: str = "live") -> None:
        super().__init__()
        if how not in HOWS:
            raise ValueError(f"how={how!r}: one of {HOWS}")
        self.how, self.eps, self.momentum = how, eps, momentum
        self.register_buffer("running_mean", torch.zeros(c, 1))
        self.register_buffer("running_wm", torch.eye(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xf = x.transpose(0, 1).reshape(c, -1)
        if self.training:
            mean = xf.mean(1, keepdim=True)
            xc = xf - mean
            cov = xc @ xc.t() / xc.shape[1] + self.eps * torch.eye(c, dtype=x.dtype)
            if self.how == "no_grad":  # the whitening matrix as a constant of the step
                with torch.no_grad():
                    lam, u = torch.linalg.eigh(cov)
                    wm = u @ torch.diag(lam.rsqrt()) @ u.t()
            else:
                lam, u = torch.linalg.eigh(cov)
                wm = u @ torch.diag(lam.rsqrt()) @ u.t()
                if self.how == "detach":
                    wm = wm.detach()
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_wm.mul_(1 - self.momentum).add_(self.momentum * wm.detach())
        else:
            xc, wm = xf - self.running_mean, self.running_wm
        return (wm @ xc).reshape(c, n, h, w).transpose(0, 1)
