"""κ of a meta-layer's covariance in the three conventions that matter, from the eigenvalues
the layer already computed (no second decomposition, no host sync).

Notation: the layer decomposes ``A = Σ + εI`` (ε ≥ 0 the layer's own shift, 0 when it has none
or it is unknown) and keeps ``λ_1 ≤ … ≤ λ_n``, the eigenvalues of ``A`` computed in some dtype
with unit roundoff ``u`` (``torch.finfo(dtype).eps``: 2.2e-16 float64, 1.2e-7 float32). The
eigenvalues of Σ are ``μ_i = λ_i − ε``.

* ``kappa = λ_n / λ_1``: κ(Σ + εI), what the solver decomposes; ``+inf`` when ``λ_1 ≤ 0``.
  With a rank-deficient Σ this is ``(μ_max + ε)/ε``.
* ``rank = #{i : μ_i > tol}``, ``tol = n·u·max(|λ_1|, |λ_n|)`` (numpy's ``matrix_rank``
  tolerance, taken relative to the decomposed matrix, whose norm bounds the absolute error of
  every computed eigenvalue, and with the ``u`` of the coarser of the dtype Σ was formed in and
  the dtype it was decomposed in).
* ``kappa_range = μ_max / μ_r``: κ of Σ on its numerical range (μ_r the smallest eigenvalue
  above ``tol``); ``1`` for rank 1, NaN for rank 0 (Σ = 0).
* ``kappa_paper = σ_max / max(σ_min, u·σ_max)`` with ``σ_i = |μ_i|``: the paper's eq. 1,
  ``κ(A) = σ_max(A)/σ_min(A)`` "where σ(·) denotes the eigenvalue", read as the singular values
  an SVD *in the layer's precision* returns for Σ **without** ε. For a full-rank Σ it equals
  ``kappa_range``; for a rank-deficient Σ an SVD's smallest singular value is rounding noise
  (somewhere in [0, ≈u·σ_max]); flooring it at ``u·σ_max`` makes the value deterministic, between
  about ``1/(n·u)`` and ``1/u`` (4.5e15 in float64, 8.4e6 in float32). Inference
  (docs/kappa.md): the paper reports ≈1e16 (SVD) and ≈1e15 (Newton–Schulz) for GCP, whose Σ
  (49 positions, 256 channels, float64) is always rank deficient — this floor; its
  decorrelated-BN baseline (1e12, with ε = 1e-2 in the authors' code) cannot be
  κ(Σ + 1e-2·I), so ε is excluded; no one convention fits all of its decorrelated-BN rows,
  hence the three fields.

For a batch of matrices (GCP: one per image; grouped whitening: one per group) every quantity
is computed per matrix and reported as the median over the batch (torch's lower median;
``kappa_max`` is the batch maximum of ``kappa``). Medians are taken separately per field. NaN
eigenvalues give NaN in every field of that matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orthofx.linalg import condition_number_from_eigenvalues

__all__ = ["SPECTRUM_FIELDS", "summarize_spectrum", "numerical_rank_tolerance"]

#: the order of the device-side summary vector returned by :func:`summarize_spectrum`
SPECTRUM_FIELDS = ("kappa", "kappa_max", "lambda_max", "lambda_min", "rank", "kappa_range", "kappa_paper")


def numerical_rank_tolerance(lam: Tensor, unit_roundoff: float) -> Tensor:
    """``n·u·max(|λ_1|, |λ_n|)`` per matrix for ascending eigenvalues ``lam`` (..., n)."""
    scale = torch.maximum(lam[..., 0].abs(), lam[..., -1].abs())
    return scale * (lam.shape[-1] * float(unit_roundoff))


def summarize_spectrum(lam: Tensor, eps: float | None, unit_roundoff: float) -> Tensor | None:
    """The (7,) float64 device tensor ``[kappa, kappa_max, lambda_max, lambda_min, rank,
    kappa_range, kappa_paper]`` (:data:`SPECTRUM_FIELDS`, module doc) of the ascending
    eigenvalues ``lam`` (..., n) of ``Σ + εI``; None for an empty spectrum.

    ``eps``: the ε the layer added (None or 0: none known, Σ is taken to be the decomposed
    matrix). ``unit_roundoff``: ``u`` of the coarser of the formation and decomposition dtypes.
    Computed on ``lam``'s device without a host sync.
    """
    if lam.dim() == 0 or lam.shape[-1] == 0 or lam.numel() == 0:
        return None
    with torch.no_grad():
        lam2 = lam.detach().to(torch.float64).reshape(-1, lam.shape[-1])
        kap = condition_number_from_eigenvalues(lam2)
        mu = lam2 - float(eps or 0.0)
        nan = torch.isnan(lam2).any(dim=-1)
        tol = numerical_rank_tolerance(lam2, unit_roundoff).unsqueeze(-1)
        above = mu > tol
        rank = above.sum(dim=-1).to(torch.float64)
        mu_max = mu[:, -1]
        mu_r = torch.where(above, mu, torch.inf).amin(dim=-1)
        k_range = torch.where(rank > 0, mu_max / torch.where(rank > 0, mu_r, 1.0), torch.nan)
        sigma = mu.abs()
        s_max = sigma.amax(dim=-1)
        s_min = torch.maximum(sigma.amin(dim=-1), s_max * float(unit_roundoff))
        k_paper = torch.where(s_max > 0, s_max / torch.where(s_max > 0, s_min, 1.0), torch.nan)
        rank = torch.where(nan, torch.nan, rank)
        k_range = torch.where(nan, torch.nan, k_range)
        k_paper = torch.where(nan, torch.nan, k_paper)
        return torch.stack([
            kap.median(), kap.max(), lam2[:, -1].max(), lam2[:, 0].min(),
            rank.median(), k_range.median(), k_paper.median(),
        ])
