"""How a recorded raw decomposition is used (orthofx.graph.recorded.usage): the values raised
to ±½ and recombined with the vectors make a matrix square root / inverse square root, written
the ways projects write it (``u @ diag(λ.rsqrt()) @ u.T``, ``(u * λ.clamp(ε).sqrt()) @ u.T``,
``U diag((S + ε)^-½) Vh`` of an SVD, ``u / λ.sqrt() @ u.T``); anything else stays unknown. With
the usage known, a raw decomposition that no swap reaches gets the named orthofx.nn module
with the arguments read from the user's module."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import orthofx
import test_graph_analysis as symbolic_cases
from corpora.zca import Whiten


def _centred_cov(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    xf = x.transpose(0, 1).reshape(c, -1)
    xc = xf - xf.mean(1, keepdim=True)
    return xc, xc @ xc.T / xc.shape[1] + eps * torch.eye(c)


class Head(nn.Module):
    """``fn(cov)`` of the centred conv features, pooled to a vector."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, cov = _centred_cov(x, 1e-3)
        return self.fn(cov).flatten()


def _eigh_sqrt(cov: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(cov)
    return (u * lam.clamp(min=1e-5).sqrt().unsqueeze(0)) @ u.T


def _eigh_pow(cov: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(cov)
    return u @ torch.diag((lam + 1e-5).pow(-0.5)) @ u.T


def _eigh_div(cov: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(cov)
    return (u / lam.sqrt()) @ u.T  # U diag(λ^{-1/2}) as a division


def _svd_invsqrt(cov: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(cov)
    return U @ torch.diag((S + 1e-5).pow(-0.5)) @ Vh


def _eigh_log(cov: torch.Tensor) -> torch.Tensor:  # a matrix logarithm: not a square root
    lam, u = torch.linalg.eigh(cov)
    return u @ torch.diag(lam.log()) @ u.T


def _eigh_inverse(cov: torch.Tensor) -> torch.Tensor:  # power −1
    lam, u = torch.linalg.eigh(cov)
    return u @ torch.diag(1.0 / lam) @ u.T


def _eigh_values_twice(cov: torch.Tensor) -> torch.Tensor:  # the values also leave on their own
    lam, u = torch.linalg.eigh(cov)
    return torch.cat([(u @ torch.diag(lam.rsqrt()) @ u.T).flatten(), lam])


@pytest.mark.parametrize("fn,usage", [
    (_eigh_sqrt, "sqrtm"), (_eigh_pow, "invsqrtm"), (_eigh_div, "invsqrtm"), (_svd_invsqrt, "invsqrtm"),
    (_eigh_log, "unknown"), (_eigh_inverse, "unknown"), (_eigh_values_twice, "unknown"),
])
def test_recorded_usage_of_a_raw_decomposition(fn: Callable, usage: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), Head(fn))
    report = orthofx.analyze(model, (torch.randn(4, 3, 7, 7),))
    assert [e.usage for e in report.entries] == [usage], report
    assert report.entries[0].producer.name == "0"


def test_zca_module_is_an_inverse_square_root() -> None:
    report = orthofx.analyze(nn.Sequential(nn.Conv2d(3, 8, 3), Whiten()), (torch.randn(4, 3, 6, 6),))
    assert [(e.kind, e.usage) for e in report.entries] == [("eigh", "invsqrtm")]


class Nested(nn.Module):
    """A whitening module with its own raw eigh and a submodule with another: the outer one
    cannot be swapped (a submodule of its scope has its own decomposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-2
        self.inner = Whiten(eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xc, cov = _centred_cov(x, self.eps)
        lam, u = torch.linalg.eigh(cov)
        y = (u @ torch.diag(lam.rsqrt()) @ u.T @ xc).reshape(c, n, h, w).transpose(0, 1)
        return y + self.inner(x)


def test_kept_raw_decomposition_names_its_replacement_with_the_users_arguments() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Nested())
    _, report = orthofx.transform(model, (torch.randn(4, 3, 6, 6),))
    kept = [n for n in report.notes if n.startswith("raw decompositions kept")]
    assert len(kept) == 1 and "its submodule 1.inner has its own" in kept[0], report.notes
    assert kept[0].endswith("use orthofx.nn.DecorrelatedBatchNorm(8, eps=0.01)"), kept[0]


_SYMBOLIC = next(m for m in symbolic_cases.test_usage_of_the_decomposition.pytestmark if m.name == "parametrize")


@pytest.mark.parametrize("body, usage", _SYMBOLIC.args[1])
def test_recorded_usage_matches_the_symbolic_path(body: Callable, usage: str) -> None:
    """The symbolic path's usage cases (tests/test_graph_analysis.py), analysed from a recorded
    run instead: the same label."""
    report = orthofx.analyze(symbolic_cases.Net(body), (torch.randn(2, 3, 6, 6),))
    assert [e.usage for e in report.entries] == [usage]
