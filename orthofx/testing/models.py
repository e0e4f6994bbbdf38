"""Building blocks of the generated models (see :mod:`orthofx.testing.strategies`).

A :class:`GeneratedModel` is a small stem followed by one or more :class:`Head` s. Each head
is a tiny interpreter: its forward runs a fixed *program* (plain Python data) of producer →
transparent ops → covariance → meta-layer → use of the result. Tracing unrolls the program,
so one class yields graphs of many shapes. Every model carries its planted ground truth
(:class:`PlantedTruth`) and the :class:`~orthofx.graph.config.AnalysisConfig` it needs.

The stand-in meta-layers here follow the orthofx.nn contract (class attribute
``orthofx_meta`` with ``kind``/``input``, method ``orthofx_internal_producer``) without
depending on orthofx.nn.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Op",
    "HeadSpec",
    "PlantedTruth",
    "HeadTruth",
    "Head",
    "GeneratedModel",
    "StandInCovarianceMeta",
    "StandInFeatureMeta",
    "UserEighModule",
    "OpaqueBlock",
    "EighSqrtFunction",
    "user_sqrtm",
    "sqrtm_via_eigh",
]


# --------------------------------------------------------------------------- math helpers
def sqrtm_via_eigh(a: Tensor) -> Tensor:
    """(A)^{1/2} = U diag(√max(λ, 0)) Uᵀ with ``torch.linalg.eigh``."""
    lam, vec = torch.linalg.eigh(a)
    return vec @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ vec.mT


def user_sqrtm(a: Tensor) -> Tensor:
    """A user's matrix square root (registered through ``AnalysisConfig.meta_functions``)."""
    lam, vec = torch.linalg.eigh(a)
    return vec @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ vec.mT


class EighSqrtFunction(torch.autograd.Function):
    """A user's autograd.Function: matrix square root by eigh, backward by re-differentiation."""

    @staticmethod
    def forward(ctx: Any, a: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        lam, vec = torch.linalg.eigh(a)
        return vec @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ vec.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        with torch.enable_grad():
            a2 = a.detach().requires_grad_(True)
            out = sqrtm_via_eigh(a2)
            (ga,) = torch.autograd.grad(out, a2, grad)
        return ga


# --------------------------------------------------------------------------- stand-in meta modules
class StandInCovarianceMeta(nn.Module):
    """orthofx.nn-style meta-layer whose input is the covariance (kind ``invsqrtm``)."""

    orthofx_meta = SimpleNamespace(kind="invsqrtm", input="covariance")

    def orthofx_internal_producer(self) -> str | None:
        return None

    def forward(self, a: Tensor) -> Tensor:
        lam, vec = torch.linalg.eigh(a)
        return vec @ torch.diag_embed(lam.clamp_min(1e-4).rsqrt()) @ vec.mT


class StandInFeatureMeta(nn.Module):
    """orthofx.nn-style meta-layer that takes features (N, C, *) and builds the covariance;
    with ``reduced`` it owns a 1×1 Pre-SVD conv called ``reduce`` (CovariancePooling-like)."""

    orthofx_meta = SimpleNamespace(kind="sqrtm", input="features")

    def __init__(self, channels: int, reduced: int | None = None) -> None:
        super().__init__()
        self.reduce = nn.Conv1d(channels, reduced, 1, bias=False) if reduced else None

    def orthofx_internal_producer(self) -> str | None:
        return "reduce" if self.reduce is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2)
        if self.reduce is not None:
            x = self.reduce(x)
        x = x - x.mean(-1, keepdim=True)
        cov = x @ x.mT / x.shape[-1] + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype)
        return sqrtm_via_eigh(cov)


class UserEighModule(nn.Module):
    """A user's decomposition module without the orthofx marker (registered by config)."""

    def forward(self, a: Tensor) -> Any:
        return torch.linalg.eigh(a)


class OpaqueBlock(nn.Module):
    """Per-channel scaling that the config declares a leaf: the walk must stop at it."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 1.5


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Op:
    """One instruction of a head's program.

    Attributes:
        name: what it does (``"relu"``, ``"flatten"``, ``"distract_add"``, ...).
        form: ``"module"``, ``"function"`` or ``"method"``.
        arg: an optional parameter (a scalar, a dim, ...).
    """

    name: str
    form: str = "function"
    arg: Any = None


@dataclass(frozen=True)
class HeadSpec:
    """Everything about one head, and what the analysis must find for it.

    Attributes:
        producer: ``"conv2d"``, ``"conv1d"``, ``"linear"``, ``"matmul"``, ``"matmul_left"``
            or ``"stem"`` (no own producer: the stem conv is the Pre-SVD layer).
        producer_form: ``"module"`` or ``"functional"``.
        channels: the producer's output channels.
        pre: ops between producer and covariance (including layout changes and distractors).
        cov: covariance form (``"matmul"``, ``"bmm"``, ``"einsum"``, ``"center_matrix"``,
            ``"torch.cov"``, ``"method"``, ``"none"`` for features-input meta-layers).
        post: ops on the covariance (``"scale"``, ``"eps"``, ``"sym"``).
        meta: the meta-layer (``"eigh"``, ``"eigvalsh"``, ``"svd"``, ``"torch.svd"``,
            ``"method.svd"``, ``"svdvals"``, ``"standin_cov"``, ``"standin_features"``,
            ``"standin_internal"``, ``"function"``, ``"user_function"``, ``"user_module"``,
            ``"orthofx.sqrtm"``, ``"orthofx.eigh"``).
        use: how the result is used (``"sqrt"``, ``"invsqrt"``, ``"values"``, ``"direct"``).
        layout: layout of the features at the covariance (``"NCM"`` or ``"NMC"``).
        cov_channels: channels of the features at the covariance.
        distractor: the name of a planted op that must stop the walk, else None.
    """

    producer: str
    producer_form: str
    channels: int
    pre: tuple[Op, ...]
    cov: str
    post: tuple[str, ...]
    meta: str
    use: str
    layout: str
    cov_channels: int
    distractor: str | None = None


@dataclass(frozen=True)
class HeadTruth:
    """Expected analysis result of one head."""

    scope: str                 # scope prefix of the meta-layer ("heads.0")
    producer: str | None       # qualified producer name, None when a distractor stops it
    param: str | None
    usage: str
    kind: str
    covariance: str | None     # expected CovarianceInfo.form (None: not checked)
    centered: bool | None = None
    eps: bool | None = None    # an ε·I is added
    reason: str | None = None  # a substring of the expected skip reason
    recorded: tuple[str, ...] = ()  # producers of the recorded analysis (every path is followed)


@dataclass(frozen=True)
class PlantedTruth:
    """The planted ground truth of a generated model."""

    heads: tuple[HeadTruth, ...]

    @property
    def producers(self) -> set[str]:
        """The set of Pre-SVD layer names the analysis must report."""
        return {h.producer for h in self.heads if h.producer is not None}

    @property
    def recorded_producers(self) -> set[str]:
        """The Pre-SVD layer names of the recorded analysis (``analyze(model, inputs)``): it
        follows every path, so a second branch merged into the features is a producer too,
        and ops the symbolic walk stops at (softmax, unknown functions, slices) are crossed."""
        return {name for h in self.heads for name in (h.recorded or ((h.producer,) if h.producer else ()))}

    @property
    def n_meta(self) -> int:
        return len(self.heads)

    @property
    def n_skipped(self) -> int:
        return sum(h.producer is None for h in self.heads)


# --------------------------------------------------------------------------- modules
_MODULE_FACTORIES = {
    "relu": lambda c: nn.ReLU(),
    "gelu": lambda c: nn.GELU(),
    "tanh": lambda c: nn.Tanh(),
    "sigmoid": lambda c: nn.Sigmoid(),
    "hardswish": lambda c: nn.Hardswish(),
    "dropout": lambda c: nn.Dropout(p=0.0),
    "identity": lambda c: nn.Identity(),
    "bn2d": lambda c: nn.BatchNorm2d(c),
    "bn1d": lambda c: nn.BatchNorm1d(c),
    "maxpool": lambda c: nn.MaxPool2d(3, stride=1, padding=1),
    "avgpool": lambda c: nn.AvgPool2d(3, stride=1, padding=1),
    "flatten": lambda c: nn.Flatten(2),
    "opaque": lambda c: OpaqueBlock(),
}


class Head(nn.Module):
    """One branch: producer → ``pre`` ops → covariance → ``post`` → meta-layer → use."""

    def __init__(self, spec: HeadSpec, in_channels: int) -> None:
        super().__init__()
        self.spec = spec
        c = spec.channels
        p = spec.producer
        self.producer: nn.Module | None = None
        if p == "conv2d" and spec.producer_form == "module":
            self.producer = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        elif p == "conv2d":
            self.fweight = nn.Parameter(torch.randn(c, in_channels, 3, 3) * 0.3)
        elif p == "conv1d" and spec.producer_form == "module":
            self.producer = nn.Conv1d(in_channels, c, 1)
        elif p == "conv1d":
            self.fweight = nn.Parameter(torch.randn(c, in_channels, 1) * 0.5)
        elif p == "linear" and spec.producer_form == "module":
            self.producer = nn.Linear(in_channels, c)
        elif p == "linear":
            self.fweight = nn.Parameter(torch.randn(c, in_channels) * 0.5)
        elif p == "matmul":  # X @ W with W stored (in, out)
            self.fweight = nn.Parameter(torch.randn(in_channels, c) * 0.5)
        elif p == "matmul_left":  # W @ X with W stored (out, in)
            self.fweight = nn.Parameter(torch.randn(c, in_channels) * 0.5)
        self.mods = nn.ModuleDict()
        for j, op in enumerate(spec.pre):
            if op.form == "module" and op.name in _MODULE_FACTORIES:
                self.mods[f"op{j}"] = _MODULE_FACTORIES[op.name](op.arg)
        if spec.distractor in ("distract_add", "distract_gate", "distract_cat"):
            # a second branch from the same input: must stop the walk
            self.side = nn.Conv2d(in_channels, c, 3, padding=1, bias=False) \
                if p in ("conv2d", "stem") else None
            self.side_lin = nn.Linear(in_channels, c, bias=False) \
                if p not in ("conv2d", "stem") else None
        self.meta: nn.Module | None = None
        cov_channels = spec.cov_channels
        if spec.meta == "standin_cov":
            self.meta = StandInCovarianceMeta()
        elif spec.meta == "standin_features":
            self.meta = StandInFeatureMeta(cov_channels)
        elif spec.meta == "standin_internal":
            self.meta = StandInFeatureMeta(cov_channels, reduced=max(2, cov_channels - 1))
        elif spec.meta == "user_module":
            self.meta = UserEighModule()

    # -- producer -----------------------------------------------------------------------
    def _produce(self, x: Tensor) -> Tensor:
        """x: (N, Cin, H, W) from the stem."""
        p, spec = self.spec.producer, self.spec
        if p == "stem":
            return x
        if p == "conv2d":
            return self.producer(x) if self.producer is not None else F.conv2d(x, self.fweight, padding=1)
        if p == "conv1d":
            x = x.flatten(2)
            return self.producer(x) if self.producer is not None else F.conv1d(x, self.fweight)
        tokens = x.flatten(2).transpose(1, 2)  # (N, M, Cin)
        if p == "linear":
            return self.producer(tokens) if self.producer is not None else F.linear(tokens, self.fweight)
        if p == "matmul":
            return tokens @ self.fweight
        if p == "matmul_left":
            return torch.matmul(self.fweight, x.flatten(2))
        raise ValueError(spec.producer)

    def _side(self, x: Tensor) -> Tensor:
        if self.side is not None:
            return self.side(x)
        side = self.side_lin(x.flatten(2).transpose(1, 2))
        if self.spec.producer in ("conv1d", "matmul_left"):
            side = side.transpose(1, 2)
        return side

    # -- program ------------------------------------------------------------------------
    def _op(self, j: int, op: Op, y: Tensor, x: Tensor) -> Tensor:  # noqa: C901 - a dispatcher
        name, form, arg = op.name, op.form, op.arg
        key = f"op{j}"
        if form == "module" and key in self.mods:
            return self.mods[key](y)
        if name == "relu":
            return F.relu(y) if form == "function" else y.relu()
        if name == "gelu":
            return F.gelu(y)
        if name == "tanh":
            return torch.tanh(y) if form == "function" else y.tanh()
        if name == "sigmoid":
            return torch.sigmoid(y) if form == "function" else y.sigmoid()
        if name == "hardswish":
            return F.hardswish(y)
        if name == "dropout":
            return F.dropout(y, p=0.0, training=self.training)
        if name == "maxpool":
            return F.max_pool2d(y, 3, 1, 1)
        if name == "avgpool":
            return F.avg_pool2d(y, 3, 1, 1)
        if name == "scale":
            if form == "method":
                return y.mul(arg)
            return y * arg if arg > 1 else arg * y
        if name == "div":
            return y / arg
        if name == "shift":
            return y + arg if form == "function" else y.add(arg)
        if name == "neg":
            return -y
        if name == "contiguous":
            return y.contiguous()
        if name == "cast":
            return y.to(y.dtype)
        if name == "unsqueeze_squeeze":
            return y.unsqueeze(0).squeeze(0) if form == "method" else torch.squeeze(torch.unsqueeze(y, 0), 0)
        if name == "flatten":  # NCHW -> NCM
            if form == "method":
                return y.flatten(2)
            if form == "function":
                return torch.flatten(y, 2)
            return y.view(y.shape[0], y.shape[1], -1) if arg == "view" else y.reshape(y.size(0), y.size(1), -1)
        if name == "to_tokens":  # NCHW -> NMC
            return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])
        if name == "transpose":  # NCM <-> NMC
            if form == "method":
                return y.transpose(1, 2)
            if form == "function":
                return torch.transpose(y, 1, 2)
            return y.permute(0, 2, 1)
        if name == "center":
            dim = -1 if arg == "NCM" else 1
            return y - y.mean(dim, keepdim=True) if form == "function" else y.sub(y.mean(dim, keepdim=True))
        if name == "distract_add":
            return y + self._side(x)
        if name == "distract_gate":
            return y * torch.sigmoid(self._side(x))
        if name == "distract_cat":
            return torch.cat([y, self._side(x)], dim=arg)
        if name == "distract_softmax":
            return F.softmax(y, dim=arg)
        if name == "distract_unknown":
            return torch.cumsum(y, dim=-1)
        if name == "distract_slice":
            return y[:, 1:]
        raise ValueError(f"unknown op {op}")

    def _covariance(self, y: Tensor) -> Tensor:
        cov, nmc = self.spec.cov, self.spec.layout == "NMC"
        if cov == "matmul":
            a = y.transpose(1, 2) @ y if nmc else y @ y.transpose(1, 2)
        elif cov == "bmm":
            a = torch.bmm(y.permute(0, 2, 1), y) if nmc else torch.bmm(y, y.permute(0, 2, 1))
        elif cov == "method":
            a = y.mT.matmul(y) if nmc else y.matmul(y.mT)
        elif cov == "einsum":
            a = torch.einsum("bmc,bmd->bcd", y, y) if nmc else torch.einsum("bcm,bdm->bcd", y, y)
        elif cov == "center_matrix":
            m = y.shape[1] if nmc else y.shape[-1]
            j = torch.eye(m, dtype=y.dtype, device=y.device) - 1.0 / m
            a = y.mT @ j @ y if nmc else y @ j @ y.mT
        elif cov == "torch.cov":  # per sample, on (C, M)
            a = torch.cov(y[0].T if nmc else y[0])
        else:
            raise ValueError(cov)
        c = a.shape[-1]
        for p in self.spec.post:
            if p == "scale":
                a = a / (y.shape[1] if nmc else y.shape[-1])
            elif p == "eps":
                a = a + 1e-3 * torch.eye(c, dtype=a.dtype, device=a.device)
            elif p == "sym":
                a = 0.5 * (a + a.mT)
        return a

    def _meta_and_use(self, a: Tensor) -> Tensor:
        meta, use = self.spec.meta, self.spec.use
        if meta in ("standin_cov", "standin_features", "standin_internal"):
            return self.meta(a)
        if meta == "function":
            return EighSqrtFunction.apply(a)
        if meta == "user_function":
            return user_sqrtm(a)
        if meta == "orthofx.sqrtm":
            import orthofx.linalg as ol

            return ol.sqrtm(a, eps=1e-4, validate=False)
        if meta == "eigvalsh":
            return torch.linalg.eigvalsh(a)
        if meta == "svdvals":
            return torch.linalg.svdvals(a)
        if meta in ("eigh", "user_module", "orthofx.eigh"):
            if meta == "eigh":
                lam, vec = torch.linalg.eigh(a)
            elif meta == "user_module":
                lam, vec = self.meta(a)
            else:
                import orthofx.linalg as ol

                lam, vec = ol.eigh(a, validate=False)
            return _use(lam, vec, vec.mT, use)
        if meta == "svd":
            u, s, vh = torch.linalg.svd(a)
            return _use(s, u, vh, use)
        if meta in ("torch.svd", "method.svd"):
            u, s, v = torch.svd(a) if meta == "torch.svd" else a.svd()
            return _use(s, u, v.mT, use)
        raise ValueError(meta)

    def forward(self, x: Tensor) -> Tensor:
        y = self._produce(x)
        for j, op in enumerate(self.spec.pre):
            y = self._op(j, op, y, x)
        if self.spec.meta in ("standin_features", "standin_internal"):
            out = self.meta(y)
        else:
            out = self._meta_and_use(self._covariance(y))
        return out.reshape(-1)


def _use(lam: Tensor, u: Tensor, vt: Tensor, use: str) -> Tensor:
    if use == "values":
        return lam
    if use == "sqrt":
        return u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ vt
    if use == "sqrt_pow":
        return (u * lam.clamp_min(0).pow(0.5).unsqueeze(-2)) @ vt
    if use == "invsqrt":
        return u @ torch.diag_embed(lam.clamp_min(1e-4).rsqrt()) @ vt
    if use == "invsqrt_div":
        return u @ torch.diag_embed(1.0 / lam.clamp_min(1e-4).sqrt()) @ vt
    if use == "invsqrt_pow":
        return u @ torch.diag_embed(lam.clamp_min(1e-4) ** -0.5) @ vt
    raise ValueError(use)


class GeneratedModel(nn.Module):
    """A stem (Conv2d + ReLU) followed by heads whose outputs are concatenated.

    Attributes:
        truth: the planted :class:`PlantedTruth`.
        analysis_config: the ``AnalysisConfig`` the model needs (registered meta-layers,
            leaf modules), or None.
        example_inputs: a tuple with one input tensor.
        specs: the head specs.
    """

    def __init__(self, in_channels: int, stem_channels: int, specs: Sequence[HeadSpec],
                 truth: PlantedTruth, analysis_config: Any = None, size: int = 5,
                 batch: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList(Head(s, stem_channels) for s in specs)
        self.specs = tuple(specs)
        self.truth = truth
        self.analysis_config = analysis_config
        g = torch.Generator().manual_seed(len(specs) * 7919 + stem_channels)
        self.example_inputs = (torch.randn(batch, in_channels, size, size, generator=g),)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return torch.cat([h(x).reshape(-1) for h in self.heads])

    def extra_repr(self) -> str:
        return "\n".join(f"head {i}: {s}" for i, s in enumerate(self.specs))

