"""Sharded (FSDP2 ``DTensor``) gradients and weights for the gradient treatments (private).

NOG and OLR need each producer's whole (out, in·k·k) matrix: :func:`full` gathers a
``DTensor`` (every rank computes the same result from it) and :func:`write` puts back this
rank's shard of a whole result (a local split, no communication)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

try:  # torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import distribute_tensor as _distribute_tensor
except Exception:  # pragma: no cover - builds without torch.distributed
    _DTensor = None  # type: ignore[assignment,misc]
    _distribute_tensor = None  # type: ignore[assignment]

__all__: list[str] = []


def is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def full(t: Tensor | None) -> Tensor | None:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it, in
    the same order); a plain tensor as is."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[union-attr]


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (shares storage with it); a plain tensor as is."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[union-attr]


def write(g: Tensor, value: Tensor) -> None:
    """``g ← value`` where ``value`` is the whole (unsharded) tensor; a ``DTensor`` ``g`` takes
    its own shard of it (split locally: every rank holds the same ``value``)."""
    if is_dtensor(g):
        shard = _distribute_tensor(value, g.device_mesh, g.placements, src_data_rank=None)  # type: ignore[union-attr,misc]
        local(g).copy_(shard._local_tensor)
    else:
        g.copy_(value)
