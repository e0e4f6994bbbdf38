"""orthofx.linalg: batched, device-agnostic numerics for SVD meta-layers (no nn.Module).

Every function takes ``(..., n, n)`` (or ``(..., m, n)``) batches of any float dtype
(float16/bfloat16 are computed in float32, also under autocast, and returned in their dtype),
rejects integer/bool/complex dtypes (DTypeError) and non-square input (InputError), returns empty
outputs for an empty batch, and raises InputError on NaN/Inf when ``validate=True`` (the
default; one host sync). Symmetric functions symmetrise their input, ``(A + Aᵀ)/2``.

* :func:`eigh`, :func:`eigvalsh`     - stable eigendecomposition (Taylor-K backward)
* :func:`sqrtm`, :func:`invsqrtm`    - ``(A + εI)^{±1/2}``: exact Daleckii–Krein backward, or
  Newton–Schulz
* :func:`polar`                      - polar factor ``U Vᵀ`` (svd / eigh / ns / polar_express)
* :func:`expm`                       - ``exp(A)``, squarings decided on the device (no host sync)
* :func:`covariance`                 - ``Xc Xcᵀ/M + εI``
* :func:`covariance_sqrtm`           - ``(Σ + εI)^{±1/2}`` of features through the M×M Gram matrix
  (exact, cheap when M < C: covariance pooling)
* :func:`condition_number`           - float64 ``λ_max/λ_min``
* :func:`solver_stats`, :func:`inject_failures` - failure/fallback/non-finite counters
"""

from __future__ import annotations

from orthofx.linalg.conditioning import condition_number, condition_number_from_eigenvalues
from orthofx.linalg.covariance import covariance
from orthofx.linalg.eigh import eigh, eigvalsh, stable_k
from orthofx.linalg.expm import expm
from orthofx.linalg.gram import covariance_sqrtm
from orthofx.linalg.polar import polar
from orthofx.linalg.spectral import invsqrtm, sqrtm
from orthofx.linalg.stats import SolverStats, inject_failures, solver_stats

__all__ = [
    "eigh",
    "eigvalsh",
    "stable_k",
    "sqrtm",
    "invsqrtm",
    "covariance_sqrtm",
    "expm",
    "polar",
    "covariance",
    "condition_number",
    "condition_number_from_eigenvalues",
    "SolverStats",
    "solver_stats",
    "inject_failures",
]
