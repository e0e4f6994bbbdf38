"""Input validation and dtype policy shared by every ``orthofx.linalg`` function.

Conventions (docs/design.md, "Numerical conventions"):

* integer, bool and complex tensors raise :class:`~orthofx.errors.DTypeError`;
* fewer than two dims, or a non-square matrix where one is required, raise
  :class:`~orthofx.errors.InputError`;
* a tensor with zero elements (an empty batch) is *not* an error: callers return empty outputs;
* NaN/Inf raise :class:`~orthofx.errors.InputError` when ``validate=True`` (one host sync);
* float16/bfloat16 are computed in float32 (``working_dtype``) and autocast is disabled inside
  (``no_autocast``); outputs are cast back to the input dtype by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from orthofx.errors import ConfigError, DTypeError, InputError

__all__: list[str] = []  # internal module: import what you need by name

_HALF = (torch.float16, torch.bfloat16)


def check_float(x: Tensor, name: str = "input") -> None:
    """Raise DTypeError unless ``x`` is a real floating-point tensor (InputError if not a tensor)."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise DTypeError(
            f"{name} has dtype {x.dtype}; orthofx.linalg needs a real floating dtype "
            "(float16, bfloat16, float32 or float64). Cast with .float() first."
        )


def check_matrix(x: Tensor, name: str = "input") -> None:
    """Raise (DTypeError/InputError) unless ``x`` is a float tensor of shape (..., m, n)."""
    check_float(x, name)
    if x.dim() < 2:
        raise InputError(f"{name} must have shape (..., m, n); got shape {tuple(x.shape)}")


def check_square(x: Tensor, name: str = "input") -> None:
    """Raise unless ``x`` is a float tensor of shape (..., n, n)."""
    check_matrix(x, name)
    if x.shape[-1] != x.shape[-2]:
        raise InputError(f"{name} must be square (..., n, n); got shape {tuple(x.shape)}")


def is_empty(x: Tensor) -> bool:
    """True when ``x`` has no elements (zero-sized batch or 0×0 matrices)."""
    return x.numel() == 0


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise InputError if ``x`` holds NaN or ±Inf. Costs one host sync on accelerators."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(
            f"{name} contains NaN or Inf; pass validate=False to skip this check "
            "(non-finite batch elements then give NaN outputs and are counted in "
            "orthofx.linalg.solver_stats().nonfinite)"
        )


def symmetrize(a: Tensor) -> Tensor:
    """Return (A + Aᵀ)/2 (exact for an already symmetric A; its autograd gradient is symmetric)."""
    return (a + a.mT) * 0.5


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return torch.float32 if dtype in _HALF else dtype


def resolve_dtype(compute_dtype: torch.dtype | None, dtype: torch.dtype, default: torch.dtype | None = None) -> torch.dtype:
    """The dtype a decomposition runs in.

    ``compute_dtype`` if given (must be float32 or float64), else ``default`` if given, else
    ``working_dtype(dtype)``. Never lower than ``working_dtype(dtype)``'s precision is *not*
    enforced: an explicit ``compute_dtype=torch.float32`` on float64 input is honoured.
    """
    if compute_dtype is not None:
        if compute_dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        return compute_dtype
    if default is not None:
        return default
    return working_dtype(dtype)


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Disable torch.autocast for ``device_type`` (no-op where autocast does not exist)."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def eye_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Identity of size x.shape[-1] on x's device (broadcasts against the batch)."""
    return torch.eye(x.shape[-1], dtype=dtype or x.dtype, device=x.device)


def host_read_is_free(x: object) -> bool:
    """True when reading a value of ``x`` on the host (``bool(t)``, ``.item()``) costs no device
    synchronisation and breaks no trace: ``x`` is a plain CPU tensor, outside
    :func:`orthofx.syncs.cuda_policy` (which makes the CPU run the CUDA code path), and not
    inside ``torch.compile``/``torch.export``/``torch.jit.trace`` (fake, functional or proxy
    tensors are never read). Used for the checks orthofx makes only where they are free."""
    from orthofx.syncs import sync_free_preferred

    if type(x) not in (Tensor, torch.nn.Parameter) or x.device.type != "cpu":
        return False
    if sync_free_preferred(x.device) or torch.jit.is_tracing():
        return False
    compiler = torch.compiler
    return not (compiler.is_compiling() or compiler.is_exporting())
