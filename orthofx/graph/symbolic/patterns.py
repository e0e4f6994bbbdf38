"""Registries the analysis matches graph nodes against.

Everything here is data: which call targets are meta-layers (and of which kind), which build
a covariance, which act per channel or only reshape (the walk crosses them), which are
weighted linear maps (the walk ends there), and which stop the walk for a known reason.

Functions are matched **by identity** (``node.target is torch.linalg.eigh``), methods by
name (``call_method`` nodes carry a string), modules by ``isinstance``. :class:`Patterns`
merges these tables with the extras of an :class:`~orthofx.graph.config.AnalysisConfig` and
with orthofx's own ``orthofx.linalg`` functions (imported lazily; absent is fine).
"""

from __future__ import annotations

import builtins
import importlib
import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from orthofx.graph.config import AnalysisConfig
from orthofx.vocab import TORCH_DECOMPOSITIONS, MetaSpec, Role, meta_spec_of

__all__: list[str] = []  # internal module: import what you need by name


# --------------------------------------------------------------------------- meta-layers
_EIGH = MetaSpec("eigh")
_EIGVALSH = MetaSpec("eigvalsh")
_SVD = MetaSpec("svd")
_SVDVALS = MetaSpec("svdvals")


_SPEC_OF_KIND = {"eigh": _EIGH, "eigvalsh": _EIGVALSH, "svd": _SVD, "svdvals": _SVDVALS}

#: torch functions that decompose their first argument.
META_FUNCTIONS: Mapping[Callable[..., Any], MetaSpec] = MappingProxyType({
    f: _SPEC_OF_KIND[d.kind] for f, d in TORCH_DECOMPOSITIONS.items()
})
#: Tensor methods that decompose ``self``.
META_METHODS: Mapping[str, MetaSpec] = MappingProxyType({"svd": _SVD})

#: For tuple-valued decompositions: which output (by index or attribute name) holds the
#: eigen/singular values ("values") and which the vectors ("vectors").
OUTPUT_FIELDS: Mapping[str, Mapping[Any, str]] = MappingProxyType({
    "eigh": MappingProxyType({0: "values", 1: "vectors", "eigenvalues": "values",
                              "eigenvectors": "vectors", "L": "values", "Q": "vectors"}),
    "svd": MappingProxyType({0: "vectors", 1: "values", 2: "vectors", "U": "vectors",
                             "S": "values", "Vh": "vectors", "V": "vectors"}),
})

# --------------------------------------------------------------------------- covariance
MATMUL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {operator.matmul, torch.matmul, torch.bmm, torch.mm}
)
MATMUL_METHODS: frozenset[str] = frozenset({"matmul", "bmm", "mm", "__matmul__"})
EINSUM_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({torch.einsum})
TORCH_COV_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({torch.cov})

# --------------------------------------------------------------------------- modules
#: Weighted linear maps that end the walk (the Pre-SVD layer).
PRODUCER_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Hardtanh, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
    nn.RReLU,
)
_NORM_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_DROPOUT_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)

#: (module classes, role) pairs the walk crosses.
TRANSPARENT_MODULES: tuple[tuple[tuple[type, ...], str], ...] = (
    (_NORM_MODULES, Role.NORM),
    (_ACTIVATION_MODULES, Role.ACTIVATION),
    (_DROPOUT_MODULES, Role.DROPOUT),
    ((nn.Identity,), Role.IDENTITY),
    ((nn.Flatten, nn.Unflatten), Role.RESHAPE),
    (_POOL_MODULES, Role.POOL),
)

#: (module classes, reason) pairs that stop the walk with a known reason.
STOP_MODULES: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.LayerNorm,), "LayerNorm normalises across channels (it mixes them)"),
    ((nn.GroupNorm,), "GroupNorm normalises across the channels of a group (it mixes them)"),
    ((nn.LocalResponseNorm,), "LocalResponseNorm mixes neighbouring channels"),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Softmin),
     "softmax normalises across a dimension and may mix channels"),
    ((nn.MultiheadAttention,), "attention mixes tokens and channels"),
    ((nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
     "it moves values between channels and positions"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear, nn.Embedding,
      nn.EmbeddingBag, nn.RNNBase),
     "this weighted layer is not a supported Pre-SVD layer (only Conv1d/2d/3d and Linear)"),
)

# --------------------------------------------------------------------------- functions
_RESHAPE_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.t, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis, torch.ravel,
    torch.adjoint,
)
_CAST_FUNCTIONS = (torch.clone, torch.detach)
_ACTIVATION_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.softplus, F.softsign, F.hardtanh, F.logsigmoid, F.prelu, F.rrelu, F.threshold,
    torch.abs, torch.square,
)
_NORM_FUNCTIONS = (F.batch_norm, F.instance_norm)
_DROPOUT_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
)
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample, F.pad,
)

#: function -> role, for ops of one tensor (the first argument is the data).
TRANSPARENT_FUNCTIONS: Mapping[Callable[..., Any], str] = MappingProxyType({
    **{f: Role.RESHAPE for f in _RESHAPE_FUNCTIONS},
    **{f: Role.CAST for f in _CAST_FUNCTIONS},
    **{f: Role.ACTIVATION for f in _ACTIVATION_FUNCTIONS},
    **{f: Role.NORM for f in _NORM_FUNCTIONS},
    **{f: Role.DROPOUT for f in _DROPOUT_FUNCTIONS},
    **{f: Role.POOL for f in _POOL_FUNCTIONS},
})

#: method name -> role, for methods of one tensor (``self`` is the data).
TRANSPARENT_METHODS: Mapping[str, str] = MappingProxyType({
    **{m: Role.RESHAPE for m in (
        "view", "reshape", "flatten", "permute", "transpose", "t", "contiguous", "squeeze",
        "unsqueeze", "view_as", "reshape_as", "swapaxes", "swapdims", "movedim", "moveaxis",
        "ravel", "unflatten", "squeeze_", "unsqueeze_", "transpose_", "t_", "adjoint")},
    **{m: Role.CAST for m in (
        "float", "double", "half", "bfloat16", "to", "type", "type_as", "clone", "detach",
        "cpu", "cuda", "requires_grad_")},
    **{m: Role.ACTIVATION for m in (
        "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "abs_", "square",
        "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip",
        "clip_")},
})

#: Binary arithmetic: function -> "add" | "sub" | "mul" | "div" | "pow" | "neg".
ARITHMETIC_FUNCTIONS: Mapping[Callable[..., Any], str] = MappingProxyType({
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.divide: "div",
    torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow",
    operator.neg: "neg", torch.neg: "neg", operator.pos: "pos",
})
ARITHMETIC_METHODS: Mapping[str, str] = MappingProxyType({
    "add": "add", "add_": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__rsub__": "rsub", "subtract": "sub",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul", "multiply": "mul",
    "div": "div", "div_": "div", "__truediv__": "div", "true_divide": "div", "divide": "div",
    "pow": "pow", "pow_": "pow", "__pow__": "pow",
    "neg": "neg", "neg_": "neg", "__neg__": "neg",
})
#: Reductions recognised when they compute the mean that a centring step subtracts.
MEAN_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({torch.mean})
MEAN_METHODS: frozenset[str] = frozenset({"mean"})

#: Ops whose result depends only on shape/dtype/device of their input (not its values).
SHAPE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({
    builtins.len, torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.rand_like, torch.randn_like, torch.eye, torch.ones, torch.zeros,
    torch.full, torch.arange, torch.empty, torch.linspace, torch.tensor, torch.as_tensor,
})
SHAPE_METHODS: frozenset[str] = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "get_device", "stride",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
})
SHAPE_ATTRIBUTES: frozenset[str] = frozenset({
    "shape", "device", "dtype", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse",
})
#: ``getattr(x, name)`` that transposes the last two dims.
TRANSPOSE_ATTRIBUTES: frozenset[str] = frozenset({"T", "mT", "H", "mH"})
#: ``getattr(x, name)`` that is the same tensor.
IDENTITY_ATTRIBUTES: frozenset[str] = frozenset({"data", "real"})

#: function -> reason, for ops that stop the walk for a known reason.
STOP_FUNCTIONS: Mapping[Callable[..., Any], str] = MappingProxyType({
    torch.cat: "concatenation with another tensor",
    torch.concat: "concatenation with another tensor",
    torch.concatenate: "concatenation with another tensor",
    torch.stack: "stacking with other tensors",
    F.softmax: "softmax normalises across a dimension and may mix channels",
    F.log_softmax: "softmax normalises across a dimension and may mix channels",
    torch.softmax: "softmax normalises across a dimension and may mix channels",
    torch.log_softmax: "softmax normalises across a dimension and may mix channels",
    F.layer_norm: "layer_norm normalises across channels (it mixes them)",
    F.group_norm: "group_norm normalises across the channels of a group (it mixes them)",
    F.scaled_dot_product_attention: "attention mixes tokens and channels",
    torch.where: "torch.where selects between tensors",
    F.pixel_shuffle: "it moves values between channels and positions",
    F.conv_transpose1d: "transposed convolutions are not supported Pre-SVD layers",
    F.conv_transpose2d: "transposed convolutions are not supported Pre-SVD layers",
    F.conv_transpose3d: "transposed convolutions are not supported Pre-SVD layers",
})
STOP_METHODS: Mapping[str, str] = MappingProxyType({
    "softmax": "softmax normalises across a dimension and may mix channels",
    "log_softmax": "softmax normalises across a dimension and may mix channels",
    "expand": "expand broadcasts the tensor (may replicate values across channels)",
    "expand_as": "expand broadcasts the tensor (may replicate values across channels)",
    "repeat": "repeat replicates values",
    "masked_fill": "masked_fill mixes in a mask tensor",
    "scatter": "scatter mixes values",
    "gather": "gather mixes values",
    "index_select": "index_select may select a subset of channels",
    "narrow": "narrow may select a subset of channels",
})

#: Functional weighted linear maps: function -> (name, index of the weight argument).
FUNCTIONAL_PRODUCERS: Mapping[Callable[..., Any], tuple[str, int]] = MappingProxyType({
    F.conv1d: ("conv1d", 1), F.conv2d: ("conv2d", 1), F.conv3d: ("conv3d", 1),
    F.linear: ("linear", 1),
})


def orthofx_linalg_functions() -> dict[str, Callable[..., Any]]:
    """orthofx's own linalg functions by name (empty when ``orthofx.linalg`` is absent)."""
    try:
        mod = importlib.import_module("orthofx.linalg")
    except Exception:  # noqa: BLE001 - absent or half-written: analysis works without it
        return {}
    out: dict[str, Callable[..., Any]] = {}
    for name in ("eigh", "eigvalsh", "sqrtm", "invsqrtm", "covariance"):
        fn = getattr(mod, name, None)
        if callable(fn):
            out[name] = fn
    return out


@dataclass(frozen=True)
class ModuleRule:
    """How a leaf module acts on the walk."""

    role: str
    reason: str = ""
    spec: MetaSpec | None = None


class Patterns:
    """The registries above merged with a config's extras and orthofx.linalg.

    Args:
        config: the analysis config whose extra meta-layers / transparent ops are added.
    """

    def __init__(self, config: AnalysisConfig | None = None) -> None:
        config = config or AnalysisConfig()
        self.config = config
        linalg = orthofx_linalg_functions()
        self.linalg = linalg
        meta: dict[Callable[..., Any], MetaSpec] = dict(META_FUNCTIONS)
        for name in ("eigh", "eigvalsh", "sqrtm", "invsqrtm"):
            if name in linalg:
                meta[linalg[name]] = MetaSpec(name)
        meta.update(config.meta_functions)
        self.meta_functions: dict[Callable[..., Any], MetaSpec] = meta
        self.meta_methods: dict[str, MetaSpec] = dict(META_METHODS)
        self.covariance_functions: dict[Callable[..., Any], str] = {
            f: _describe_callable(f) for f in config.covariance_functions
        }
        if "covariance" in linalg:
            self.covariance_functions[linalg["covariance"]] = "orthofx.linalg.covariance"
        self.transparent_functions: dict[Callable[..., Any], str] = dict(TRANSPARENT_FUNCTIONS)
        self.transparent_functions.update({f: Role.IDENTITY for f in config.transparent_functions})
        self.transparent_methods: dict[str, str] = dict(TRANSPARENT_METHODS)
        self.transparent_methods.update({m: Role.IDENTITY for m in config.transparent_methods})
        self.extra_transparent_modules = tuple(config.transparent_modules)
        #: functions kept as single nodes while tracing
        self.leaf_functions: tuple[Callable[..., Any], ...] = tuple(
            dict.fromkeys([*linalg.values(), *config.meta_functions, *config.leaf_functions,
                           *config.covariance_functions])
        )

    # ------------------------------------------------------------------ meta-layers
    def meta_for_function(self, target: Any) -> MetaSpec | None:
        try:
            return self.meta_functions.get(target)
        except TypeError:  # unhashable target
            return None

    def meta_for_module(self, module: nn.Module, qualname: str) -> MetaSpec | None:
        """The meta spec of a leaf module: orthofx_meta, or config.meta_modules."""
        spec = meta_spec_of(module)
        if spec is not None:
            return spec
        extra = self.config.meta_modules
        if qualname in extra:
            return extra[qualname]
        for key, value in extra.items():
            if isinstance(key, type) and isinstance(module, key):
                return value
        return None

    def is_config_meta_module(self, module: nn.Module, qualname: str) -> bool:
        extra = self.config.meta_modules
        return qualname in extra or any(
            isinstance(k, type) and isinstance(module, k) for k in extra
        )

    # ------------------------------------------------------------------ modules
    def module_rule(self, module: nn.Module, qualname: str) -> ModuleRule:
        """Classify a leaf module for the walk."""
        spec = self.meta_for_module(module, qualname)
        if spec is not None:
            return ModuleRule(Role.META, spec=spec)
        if isinstance(module, self.extra_transparent_modules):
            return ModuleRule(Role.IDENTITY)
        if isinstance(module, PRODUCER_MODULES) and not isinstance(
            module, nn.modules.lazy.LazyModuleMixin
        ):
            return ModuleRule(Role.PRODUCER)
        for classes, role in TRANSPARENT_MODULES:
            if isinstance(module, classes):
                return ModuleRule(role)
        for classes, reason in STOP_MODULES:
            if isinstance(module, classes):
                return ModuleRule(Role.STOP, reason=reason)
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return ModuleRule(Role.STOP, reason="uninitialised lazy module (run one forward first)")
        return ModuleRule(
            Role.STOP,
            reason=(
                f"unknown module type {type(module).__name__}; if it acts per channel, add it "
                f"to AnalysisConfig.transparent_modules"
            ),
        )


def _describe_callable(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{name}" if mod else name
