"""orthofx.nn: meta-layer modules built on :mod:`orthofx.linalg`.

Every class here carries the ``orthofx_meta`` marker (an :class:`orthofx.vocab.MetaSpec`), so the graph pass
traces it as a leaf and reports it as a meta-layer.
"""

from orthofx.nn.covariance_pooling import CovariancePooling
from orthofx.nn.decorrelated_bn import DecorrelatedBatchNorm
from orthofx.nn.meta import MetaLayer, MetaLayerInfo, is_meta_layer
from orthofx.nn.stable import StableDecomposition

__all__ = ["CovariancePooling", "DecorrelatedBatchNorm", "StableDecomposition", "MetaLayer", "is_meta_layer"]
