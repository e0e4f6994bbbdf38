"""Small helpers shared by the treatments (private)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from orthofx.errors import TreatmentError

__all__: list[str] = []

from orthofx.vocab import POLAR_METHODS  # noqa: E402,F401  (polar methods accepted by NOG: the one list)


def flat_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(out, in·k·k) of a weight of shape (out, in, *k): dim 0 is the output dimension."""
    out = int(shape[0])
    return out, int(math.prod(shape[1:]))


def check_weight(t: Tensor, label: str, treatment: str) -> None:
    """Raise TreatmentError unless ``t`` is a floating-point tensor with at least 2 dims."""
    if not isinstance(t, Tensor):
        raise TreatmentError(f"{treatment}: {label} is not a tensor (got {type(t).__name__})")
    if not t.is_floating_point():
        raise TreatmentError(
            f"{treatment} cannot be applied to {label}: it has dtype {t.dtype}, "
            "a floating-point weight is needed"
        )
    if t.ndim < 2:
        raise TreatmentError(
            f"{treatment} cannot be applied to {label}: it has shape {tuple(t.shape)}, "
            "a weight with at least 2 dims (out, in, *kernel) is needed"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 in their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def polar(G: Tensor, method: str, deficient: str | None = None) -> Tensor:
    """``orthofx.linalg.polar`` without validation or non-finite tracking (no host sync; the
    caller has replaced NaN/Inf already). Zero input gives zero output."""
    from orthofx.linalg.polar import polar as _polar

    return _polar(G, method=method, validate=False, track_nonfinite=False, deficient=deficient)
