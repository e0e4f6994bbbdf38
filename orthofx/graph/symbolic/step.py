"""What one fx node does on a walk back from a meta-layer: :class:`Step`.

The walk (:mod:`orthofx.graph.symbolic.walk`) classifies every node of a traced graph once, as
a :class:`Step`; the covariance recognition (:mod:`orthofx.graph.symbolic.covariance`) builds
the :class:`CovarianceOp` of a covariance step and reads the steps of a finished walk back into
a :class:`~orthofx.graph.result.CovarianceInfo`. Both import this module; neither imports the
other's types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from orthofx.graph.result import ProducerInfo

__all__: list[str] = []  # internal module: import what you need by name

#: the role of a placeholder (a graph input): the walk leaves the graph there
INPUT = "input"


@dataclass(frozen=True)
class CovarianceOp:
    """How one covariance op builds the decomposed matrix from the feature map X.

    Attributes:
        form: the op: ``"matmul"``, ``"bmm"``, ``"mm"``, ``"einsum"``, ``"torch.cov"``,
            ``"orthofx.linalg.covariance"`` or the name of a registered covariance function.
        expression: ``"X Xᵀ"``, ``"Xᵀ X"``, ``"X J Xᵀ"``, the einsum equation, or ``"<form>(X)"``.
        centered: the op removes the mean itself (a centring matrix J, torch.cov, ...).
        scaled: the op divides by the sample count itself (torch.cov, ...).
        eps: the ε of an ``ε·I`` the op adds itself (a keyword of a covariance function), or None.
    """

    form: str
    expression: str
    centered: bool = False
    scaled: bool = False
    eps: float | None = None


@dataclass(frozen=True)
class Step:
    """One fx node as the walk sees it: its role, and the one input the walk continues through.

    A step is made once per node (the walk graph has an edge ``source → node`` for every step
    with a ``source``); a walk from a meta-layer's input follows these edges back to a step
    without a source: a producer, a placeholder or a stop. Only the field of the step's role is
    set among ``producer``, ``cov``, ``eps`` and ``index``.

    Attributes:
        node: the fx node.
        role: a :class:`~orthofx.vocab.Role` value, or :data:`INPUT` for a placeholder.
        source: the input the walk continues through (None: the walk ends here).
        text: readable description of the op.
        reason: why the walk stops here (role ``stop``; for a placeholder, why reaching it
            outside an autograd.Function's forward stops the walk).
        producer: role ``producer``: the Pre-SVD layer this node applies.
        cov: role ``covariance``: how this node builds the matrix.
        eps: role ``shift``: the ε of the ``+ ε·I`` this node adds; True when a constant whose
            value cannot be read is added; None when not a shift.
        index: role :data:`INPUT`: the placeholder's position among the graph's inputs.
    """

    node: fx.Node
    role: str
    source: fx.Node | None = None
    text: str = ""
    reason: str = ""
    producer: ProducerInfo | None = None
    cov: CovarianceOp | None = None
    eps: float | bool | None = None
    index: int | None = None
