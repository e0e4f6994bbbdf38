"""orthofx.nn: meta-layer modules built on :mod:`orthofx.linalg`.

Every class here carries the ``orthofx_meta`` marker (an :class:`orthofx.vocab.MetaSpec`), so the graph pass
traces it as a leaf and reports it as a meta-layer.

``orthofx.nn.MetaLayerInfo``, the marker's earlier name, still resolves to
:class:`orthofx.vocab.MetaSpec` with a ``DeprecationWarning``.
"""

from typing import Any

from orthofx._deprecation import warn_deprecated
from orthofx.nn.covariance_pooling import CovariancePooling
from orthofx.nn.decorrelated_bn import DecorrelatedBatchNorm
from orthofx.nn.meta import MetaLayer, is_meta_layer
from orthofx.nn.stable import StableDecomposition

__all__ = ["CovariancePooling", "DecorrelatedBatchNorm", "StableDecomposition", "MetaLayer", "is_meta_layer"]

# earlier names: still importable from here with a DeprecationWarning naming the new place
_COMPAT: dict[str, str] = {"MetaLayerInfo": "orthofx.vocab.MetaSpec"}


def __getattr__(name: str) -> Any:
    if name in _COMPAT:
        warn_deprecated(f"orthofx.nn.{name}", _COMPAT[name], stacklevel=2)
        from orthofx.vocab import MetaSpec

        return MetaSpec
    raise AttributeError(f"module 'orthofx.nn' has no attribute {name!r}")
