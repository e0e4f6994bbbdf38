"""The op-level vocabulary of the recorded analysis: what each ATen op does on the way from a
Pre-SVD layer to a meta-layer. Data only; ops are matched by their overload-packet name
(``aten.bmm.default`` → ``"bmm"``), so every overload of an op shares its role.

* :class:`MatFn`, ``KINDS`` - from :mod:`orthofx.vocab` (the one vocabulary).
* ``DECOMPOSITIONS`` - decomposition / solver ops and their kind.
* ``PRODUCTS`` - matrix products and the argument positions of their two operands.
* ``VIEWS`` - ops that only re-index, copy or cast one tensor (the operand strip crosses them).
* ``SLICES`` - ops that take a part of one tensor (cross-covariances of two halves).
* ``SCALES`` - elementwise ops that scale by a constant when the other operand is constant.
* ``REGION_STOPS`` - ops a covariance's region never crosses (attention's softmax).
* ``CONVOLUTIONS`` - ops that apply a weight as a convolution kernel (weight = argument 1).
* ``NORMS`` - vector norms (the mark of a power iteration).
"""

from __future__ import annotations

from enum import Enum
from types import MappingProxyType

from orthofx.vocab import KINDS, MatFn  # the shared vocabulary (re-exported here for the op tables)

__all__: list[str] = []  # internal module: import what you need by name


class NodeKind(str, Enum):
    """What a recorded node is."""

    OP = "op"            # an ATen op that ran
    PARAM = "param"      # an nn.Parameter of the model
    BUFFER = "buffer"    # a registered buffer of the model
    INPUT = "input"      # a tensor of the example inputs
    CONST = "const"      # any other tensor that no recorded op produced

    def __str__(self) -> str:
        return self.value


class CovForm(str, Enum):
    """How a covariance-like matrix is formed from features."""

    GRAM = "gram"                # X Xᵀ, Xᵀ X, X J Xᵀ (J a constant centring matrix)
    CROSS = "cross"              # q kᵀ of two projections / two slices of the same features
    CONGRUENCE = "congruence"    # Wᵀ S W with W a bare parameter (SPD networks)

    def __str__(self) -> str:
        return self.value


DECOMPOSITIONS: MappingProxyType[str, MatFn] = MappingProxyType({
    "_linalg_eigh": MatFn.EIGH, "linalg_eigh": MatFn.EIGH, "linalg_eigvalsh": MatFn.EIGH,
    "symeig": MatFn.EIGH,
    "_linalg_svd": MatFn.SVD, "linalg_svd": MatFn.SVD, "svd": MatFn.SVD, "linalg_svdvals": MatFn.SVD,
    "linalg_eig": MatFn.EIG, "_linalg_eig": MatFn.EIG, "linalg_eigvals": MatFn.EIG,
    "linalg_cholesky_ex": MatFn.CHOLESKY, "linalg_cholesky": MatFn.CHOLESKY, "cholesky": MatFn.CHOLESKY,
    "linalg_inv_ex": MatFn.INVERSE, "linalg_inv": MatFn.INVERSE, "inverse": MatFn.INVERSE,
    "cholesky_inverse": MatFn.INVERSE, "linalg_pinv": MatFn.INVERSE,
    "_linalg_solve_ex": MatFn.SOLVE, "linalg_solve_ex": MatFn.SOLVE, "linalg_solve": MatFn.SOLVE,
    "triangular_solve": MatFn.SOLVE, "linalg_solve_triangular": MatFn.SOLVE,
    "cholesky_solve": MatFn.SOLVE, "lu_solve": MatFn.SOLVE, "linalg_lu_solve": MatFn.SOLVE,
    "linalg_lu_factor_ex": MatFn.SOLVE, "linalg_lu": MatFn.SOLVE, "linalg_lstsq": MatFn.SOLVE,
    "_linalg_slogdet": MatFn.LOGDET, "linalg_slogdet": MatFn.LOGDET, "logdet": MatFn.LOGDET,
    "_linalg_det": MatFn.LOGDET, "linalg_det": MatFn.LOGDET, "det": MatFn.LOGDET,
    "linalg_matrix_exp": MatFn.EXPM, "matrix_exp": MatFn.EXPM,
})

# product op -> argument positions of its two matrix operands
PRODUCTS: MappingProxyType[str, tuple[int, int]] = MappingProxyType({
    "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "mv": (0, 1), "dot": (0, 1),
    "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2), "addmv": (1, 2),
    "_addmm_activation": (1, 2),
})

VIEWS: frozenset[str] = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
    "clone", "contiguous", "alias", "unsqueeze", "squeeze", "flatten", "unflatten", "_to_copy",
    "to", "detach", "lift_fresh", "lift_fresh_copy", "conj", "resolve_conj", "resolve_neg",
    "_conj", "view_as", "reshape_as", "expand_as", "movedim", "numpy_T", "mT", "adjoint",
    "type_as", "float", "double", "half", "bfloat16", "copy",
})

SLICES: frozenset[str] = frozenset({
    "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "index",
    "unsafe_split", "unsafe_chunk", "tensor_split",
})

SCALES: frozenset[str] = frozenset({"mul", "div", "true_divide", "multiply", "divide"})

REGION_STOPS: frozenset[str] = frozenset({
    "_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
})

CONVOLUTIONS: frozenset[str] = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution", "cudnn_convolution",
    "_slow_conv2d_forward", "thnn_conv2d", "conv_depthwise2d", "_conv_depthwise2d",
    "slow_conv3d", "slow_conv_transpose2d",
})

NORMS: frozenset[str] = frozenset({"linalg_vector_norm", "norm", "frobenius_norm", "linalg_norm"})

# ops that look a weight up rather than apply it: the producer walk ends there with no producer
TERMINALS: frozenset[str] = frozenset({"embedding", "embedding_bag", "_embedding_bag"})
