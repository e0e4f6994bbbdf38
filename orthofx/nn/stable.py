"""Stable drop-in replacements for raw ``torch.linalg`` meta-layer calls on a covariance.

The rewrite swaps a call such as ``torch.linalg.eigh(cov)`` for a ``StableDecomposition``
leaf module that computes the same forward with :func:`orthofx.linalg.eigh` and returns the
same structure as the original (``torch.return_types`` named tuples). The module remembers the
original callable so that ``orthofx.strip`` can put it back for export.

Exact by default: the backward is torch's own gradient, ``K_ij = 1/(λ_i − λ_j)``, for every
eigenvalue pair with relative gap ``|λ_i − λ_j|/max(|λ_i|, |λ_j|) ≥ δ`` (δ = 1e-6 in float64,
3.45e-4 in float32), and a bounded linear ramp only for near-ties (repeated eigenvalues, the
``+εI`` cluster of a rank-deficient covariance), so a healthy model trains exactly as with the
raw call while repeated eigenvalues no longer give inf/NaN gradients. ``taylor_degree=N`` selects
the Taylor-expanded K of the stable-SVD work instead (module doc of
:mod:`orthofx.linalg.eigh`). The SVD kinds are computed from the same eigendecomposition, so
they follow the same rule.

Non-finite input: ``on_nonfinite="raise"`` (default) raises
:class:`~orthofx.errors.InputError` naming the layer, where ``torch.linalg.eigh`` would fail or
return NaN that poisons the weights; ``"skip"`` decomposes the identity for those batch elements
(eigenvalues/singular values 1, zero gradient into them) and counts them in
``orthofx.linalg.solver_stats().nonfinite`` so an optimizer hook can skip the step. Neither adds
a host sync beyond the decomposition's own.

For a symmetric positive semi-definite covariance A = U Λ Uᵀ, the SVD is A = U Λ Uᵀ with
the eigenvalues in descending order; numerically negative eigenvalues λ give singular value
|λ| with the right singular vector's sign flipped (A = U |Λ| (U·sign Λ)ᵀ).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from orthofx import linalg
from orthofx.errors import ConfigError
from orthofx.vocab import TORCH_DECOMPOSITIONS
from orthofx.nn.meta import MetaLayer
from orthofx.vocab import MetaSpec

__all__ = ["StableDecomposition"]

# original callable -> (kind, return convention), from the one table of torch decompositions
_TARGETS: dict[Callable[..., Any], tuple[str, str]] = {
    f: (d.kind, d.returns) for f, d in TORCH_DECOMPOSITIONS.items()
}
_PUBLIC_NAMES = {f: d.name for f, d in TORCH_DECOMPOSITIONS.items()}
STABLE_KINDS = tuple(dict.fromkeys(d.kind for d in TORCH_DECOMPOSITIONS.values()))


def kind_of_target(target: Any) -> tuple[str, str] | None:
    """(kind, return convention) of a raw torch decomposition callable, or None."""
    try:
        return _TARGETS.get(target)
    except TypeError:  # unhashable
        return None


def _method_convention(name: str) -> tuple[str, str] | None:
    return {"svd": ("svd", "svd")}.get(name)


class StableDecomposition(MetaLayer):
    """A stable-gradient stand-in for ``torch.linalg.eigh/eigvalsh/svd/svdvals`` or ``torch.svd``
    applied to a symmetric PSD covariance.

    Args:
        kind: ``"eigh"``, ``"eigvalsh"``, ``"svd"`` or ``"svdvals"``.
        convention: how results are returned: ``"linalg_eigh"``, ``"linalg_svd"`` (U, S, Vh),
            ``"svd"`` (``torch.svd``'s U, S, V) or ``"tensor"``.
        original: the replaced callable (or method name), restored by ``orthofx.strip``.
        taylor_degree: ``None`` (default): exact ``K = 1/(λ_i − λ_j)`` except at near-ties;
            an int ``N``: the Taylor-expanded K of degree N (:func:`orthofx.linalg.eigh`).
        backend: forward backend of :func:`orthofx.linalg.eigh`.
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` (module doc).
        name: label used in error messages, e.g. the qualified name of the module or graph node
            this layer replaced; defaults to the replaced callable's name.

    Extra positional/keyword arguments of the original call (``UPLO``, ``full_matrices``,
    ``some``, ``driver``) are accepted: the input is symmetrised, so ``UPLO`` has no effect,
    and for a square input full and reduced SVDs coincide.
    """

    orthofx_meta = MetaSpec(kind="eigh", input="covariance")

    def __init__(
        self,
        kind: str,
        convention: str,
        original: Any = None,
        taylor_degree: int | None = None,
        backend: str = "auto",
        on_nonfinite: str = "raise",
        name: str | None = None,
    ) -> None:
        super().__init__()
        if kind not in STABLE_KINDS:
            raise ConfigError(f"StableDecomposition kind must be one of {STABLE_KINDS}, got {kind!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.kind = kind
        # per-instance marker: the class default says "eigh", an instance says what it replaces
        self.orthofx_meta = MetaSpec(kind=kind, input="covariance")
        self.convention = convention
        self.original = original
        self.taylor_degree = taylor_degree
        self.backend = backend
        self.on_nonfinite = on_nonfinite
        self.name = name

    @classmethod
    def for_target(cls, target: Any, **kwargs: Any) -> "StableDecomposition":
        """The stand-in for a raw callable (``torch.linalg.eigh`` ...) or method name (``"svd"``)."""
        spec = _method_convention(target) if isinstance(target, str) else kind_of_target(target)
        if spec is None:
            raise ConfigError(f"StableDecomposition: no stable replacement for {target!r}")
        return cls(spec[0], spec[1], original=target, **kwargs)

    def _label(self) -> str:
        """How messages name this layer: ``meta-layer 'name' (StableDecomposition(...))``."""
        if isinstance(self.original, str):
            replaced = f"Tensor.{self.original}"
        else:
            replaced = _PUBLIC_NAMES.get(self.original) if kind_of_target(self.original) else None
            replaced = replaced or getattr(self.original, "__name__", None)
        what = f"StableDecomposition(kind={self.kind!r}" + (f", replaces {replaced})" if replaced else ")")
        return f"meta-layer {self.name!r} ({what})" if self.name else what

    def forward(self, a: Tensor, *args: Any, **kwargs: Any) -> Any:
        traced = self._traced_as_leaf(a, *args, **kwargs)
        if traced is not None:
            return traced
        opts = {"backend": self.backend, "validate": False, "on_nonfinite": self.on_nonfinite, "name": self._label()}
        if self.kind == "eigvalsh":
            lam = linalg.eigvalsh(a, **opts)
            self._remember(lam)
            return lam
        lam, vec = linalg.eigh(a, taylor_degree=self.taylor_degree, **opts)
        self._remember(lam)
        if self.kind == "eigh":
            return torch.return_types.linalg_eigh((lam, vec))
        # SVD of a symmetric matrix from its eigendecomposition, descending singular values
        order = torch.argsort(lam.abs(), dim=-1, descending=True)
        s = torch.gather(lam.abs(), -1, order)
        u = torch.gather(vec, -1, order.unsqueeze(-2).expand_as(vec))
        if self.kind == "svdvals":
            return s
        sign = torch.where(torch.gather(lam, -1, order) < 0, -1.0, 1.0).to(u.dtype)
        v = u * sign.unsqueeze(-2)
        if self.convention == "svd":
            return torch.return_types.svd((u, s, v))
        return torch.return_types.linalg_svd((u, s, v.mT))

    def extra_repr(self) -> str:
        replaced = getattr(self.original, "__name__", self.original)
        backward = "exact" if self.taylor_degree is None else f"taylor_degree={self.taylor_degree}"
        label = f", name={self.name!r}" if self.name else ""
        return (f"kind={self.kind!r}, replaces={replaced!r}, backward={backward}, "
                f"on_nonfinite={self.on_nonfinite!r}{label}")
