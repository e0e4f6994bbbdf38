"""What a corpus case is (:class:`RealCodeCase`, :data:`KINDS`) and the seeded example inputs
both corpora use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["KINDS", "RealCodeCase"]

#: the kind strings a case's ``kinds`` is drawn from
KINDS: frozenset[str] = frozenset({
    "eigh", "svd", "eig", "cholesky", "inverse", "solve", "ns_sqrt", "ns_invsqrt", "pade",
    "power_iteration",
})


@dataclass(frozen=True)
class RealCodeCase:
    """One real-code-style model and its planted ground truth.

    Attributes:
        name: key in :data:`CASES` / :data:`NEGATIVE_CASES`.
        build: returns a fresh model; deterministic (seeds torch inside).
        inputs: returns fresh example inputs (a tuple); deterministic.
        producers: qualified names of the Pre-SVD modules (the module owning the weight; for a
            bare ``nn.Parameter`` the module owning that Parameter).
        producer_params: qualified names of the producers' weight parameters.
        n_meta_layers: number of distinct covariances that reach a matrix function.
        kinds: the kinds of matrix function those covariances reach (see :data:`KINDS`).
        description: what the model imitates and why the truth is what it is.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Tensor, ...]]
    producers: frozenset[str]
    producer_params: frozenset[str]
    n_meta_layers: int
    kinds: frozenset[str]
    description: str


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(seed: int, n: int = 4, c: int = 3, h: int = 16, w: int | None = None) -> Callable[[], tuple[Tensor, ...]]:
    def make() -> tuple[Tensor, ...]:
        return (torch.randn(n, c, h, w or h, generator=_gen(seed)),)
    return make
