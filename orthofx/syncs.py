"""Host-synchronisation audit: which dispatched ops would stall a CUDA stream.

A training step that never synchronises lets the CPU queue kernels ahead of the GPU, so small
kernels (a 64×27 polar factor, OLR's dot products) hide behind the large ones. One
synchronising op in the step drains that queue. :func:`sync_audit` records, with a
``TorchDispatchMode``, every aten op dispatched inside the block — forward, backward (on the
calling thread) and optimizer code alike — and counts the ones that synchronise on CUDA:

* ``aten._local_scalar_dense`` — ``.item()``, ``float(t)``, ``bool(t)``, ``if t:``;
* ``aten._linalg_check_errors`` — the info check of ``linalg.solve/inv/cholesky`` (use the
  ``*_ex`` variants with ``check_errors=False``);
* ``aten._linalg_svd``, ``aten._linalg_eigh``, ``aten._linalg_eigvals``, ``aten.linalg_eig``
  — cuSOLVER info checks inside the op;
* ``aten.linalg_matrix_exp`` — degree and squarings chosen on the host;
* data-dependent shapes: ``aten.nonzero``, ``aten.masked_select``, ``aten._unique2``,
  ``aten.unique_consecutive``, ``aten.index`` with a bool mask (recorded as ``aten.nonzero``
  by torch), ``aten.repeat_interleave`` without ``output_size``;
* comparisons to the host: ``aten.equal``, ``aten.is_nonzero``, ``aten.allclose``;
* blocking copies between the CPU and a CUDA device in either direction (``aten._to_copy`` /
  ``aten.copy_``; torch synchronises the stream after a host→device copy with
  ``non_blocking=False`` too). Seen only where a CUDA device exists.

It runs on any device, so the sync-freedom of a code path is checked on the CPU too (the op
names are the same; CPU-only ops such as ``.tolist()`` that bypass dispatch are not seen).
Usage::

    with orthofx.syncs.sync_audit() as audit:
        train_step()
    assert not audit.syncs, audit.syncs     # {"aten._linalg_svd": 1, ...}

Device policy. Where orthofx picks an implementation by device (``polar(method="auto")``,
:func:`orthofx.linalg.expm.expm`'s squaring loop, ``attach(lr_mode="auto")``) it asks
:func:`sync_free_preferred`: true on CUDA, and everywhere inside ``with cuda_policy():``, which
makes the CPU run exactly the code CUDA would run — so the audit above checks the CUDA path
on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncAudit", "sync_audit", "SYNC_OPS", "cuda_policy", "sync_free_preferred"]

#: aten op packets that synchronise a CUDA stream with the host.
SYNC_OPS: frozenset[str] = frozenset(
    {
        "aten._local_scalar_dense",
        "aten._linalg_check_errors",
        "aten._linalg_svd",
        "aten._linalg_eigh",
        "aten._linalg_eigvals",
        "aten.linalg_eig",
        "aten.linalg_matrix_exp",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.equal",
        "aten.is_nonzero",
        "aten.allclose",
    }
)


def _is_transfer(func: Any, args: tuple, kwargs: dict) -> bool:
    """A blocking copy between the CPU and a CUDA device: torch synchronises the stream after
    it in both directions (``non_blocking=False``); device→host always waits for the data."""
    name = str(func.overloadpacket)
    if name == "aten._to_copy":
        src = args[0] if args else None
        dev = kwargs.get("device")
        if not isinstance(src, torch.Tensor) or dev is None:
            return False
        dst_cuda = torch.device(dev).type == "cuda"
        if src.is_cuda and not dst_cuda:
            return True
        return dst_cuda and not src.is_cuda and not kwargs.get("non_blocking", False)
    if name == "aten.copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)) or src.is_cuda == dst.is_cuda:
            return False
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return src.is_cuda or not non_blocking
    return False


class SyncAudit(TorchDispatchMode):
    """Dispatch mode recording every op (``ops``) and the synchronising ones (``syncs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        sync = name in SYNC_OPS or _is_transfer(func, args, kwargs)
        if name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            sync = True
        if sync:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        """Total number of synchronising ops recorded."""
        return sum(self.syncs.values())


def sync_audit() -> SyncAudit:
    """A fresh :class:`SyncAudit`; use as ``with sync_audit() as audit: ...``."""
    return SyncAudit()


_POLICY = threading.local()


@contextlib.contextmanager
def cuda_policy() -> Iterator[None]:
    """Inside the block, device-dependent choices resolve as on CUDA on every device."""
    prev = getattr(_POLICY, "cuda", False)
    _POLICY.cuda = True
    try:
        yield
    finally:
        _POLICY.cuda = prev


def sync_free_preferred(device: torch.device | str) -> bool:
    """True on CUDA devices, and on every device inside :func:`cuda_policy`."""
    return torch.device(device).type == "cuda" or bool(getattr(_POLICY, "cuda", False))
