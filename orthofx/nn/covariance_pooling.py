"""Global covariance pooling (GCP): the matrix square root of each image's channel covariance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orthofx import linalg
from orthofx.errors import ConfigError, DTypeError, InputError
from orthofx.linalg._checks import host_read_is_free
from orthofx.nn._script import covariance, covariance_dtype, gram_sqrt, matrix_sqrt, working_dtype
from orthofx.nn.meta import MetaLayer
from orthofx.vocab import MetaSpec

__all__ = ["CovariancePooling"]

OUTPUTS = ("triu", "full")
_HALF = (torch.float16, torch.bfloat16)


def check_features(x: Tensor, module: str) -> None:
    """DTypeError naming ``module`` unless ``x`` is a real floating tensor (an integer map
    would otherwise give a covariance of int64 zeros)."""
    if not isinstance(x, Tensor):
        raise InputError(f"{module}: expected a torch.Tensor of features, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise DTypeError(
            f"{module}: the input has dtype {x.dtype}; a floating feature map is needed "
            "(float16, bfloat16, float32 or float64) — cast it with x.float()"
        )


def tracing() -> bool:
    """True while torch.compile / torch.export / torch.jit.trace trace the forward."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _covariance_dtype(
    backend: str, compute_dtype: torch.dtype | None, dtype: torch.dtype, device: torch.device | None = None
) -> torch.dtype:
    """The dtype the covariance itself is formed in: that of the decomposition.

    ``"eigh"`` decomposes in float64 by default, and forming Σ in float32 would already perturb
    its eigenvalues near 1e-7·λ_max, so Σ is formed in float64 too. ``"svd"`` and ``"ns"`` work
    in the input's dtype; ``"auto"`` is "svd" on CUDA and "eigh" elsewhere.
    """
    return covariance_dtype(backend, compute_dtype, dtype, device is not None and device.type == "cuda")


class CovariancePooling(MetaLayer):
    r"""GCP head: optional 1×1 reduction, per-image covariance, matrix square root.

    For features x of shape (N, C, H, W) (or (N, C, M)), with M = H·W positions:

    * optional reduction ``x ← ReLU(BN(Conv1×1(x)))`` to ``reduced`` channels; this 1×1
      conv (``self.reduce``) is a **Pre-SVD layer**;
    * Σ = X J Xᵀ + εI (formed in the decomposition's dtype: float64 for "eigh") with X the (C, M) feature matrix and J = (1/M)(I − 11ᵀ/M) the
      centring matrix, i.e. the biased per-image covariance;
    * Y = Σ^{1/2} by :func:`orthofx.linalg.sqrtm` or, when M < C, through the M×M Gram matrix
      (``backend="auto"``, the default; see below) — exact forward and the exact
      Daleckii–Krein backward; ``"ns"``: Newton–Schulz, ``iters``;
    * output ``"triu"``: the upper triangle flattened, C(C+1)/2 values per image (the usual
      GCP representation); ``"full"``: the (C, C) matrix.

    Args:
        in_channels: channels of the incoming feature map.
        reduced: channels after the 1×1 reduction, or None for no reduction.
        eps: ε ≥ 0 added to the covariance (default 1e-5; Σ has rank ≤ M − 1, so without
            it Σ is singular whenever M ≤ C).
        backend / iters / compute_dtype: passed to :func:`orthofx.linalg.sqrtm`; ``"gram"``
            instead uses :func:`orthofx.linalg.covariance_sqrtm`, exact and much cheaper when
            M = H·W < C (a 49×49 instead of a 256×256 problem at 7×7; needs eps > 0);
            ``"auto"`` (default) takes "gram" when eps > 0 and M < C, else sqrtm's "auto"
            (gesvda route on CUDA, float64 eigh elsewhere). Every route but "ns" is exact:
            float64 on the CPU (≈ 2.5e-8 from the float64 reference), ≤ 5e-6 with the float32
            gesvda route on CUDA.
        output: ``"triu"`` or ``"full"``.
        validate: NaN/Inf check of the features (raises :class:`~orthofx.errors.InputError`
            naming the module). ``None`` (default): only where it is free — eager CPU calls
            outside ``orthofx.syncs.cuda_policy()``; never on CUDA, where it is a host sync per
            forward, nor while ``torch.compile``/``torch.export`` trace (a data-dependent
            branch). ``True``: every eager forward (one host sync on accelerators). ``False``:
            never (a NaN input then gives NaN outputs). The check runs on the input, before the
            reduction's BatchNorm updates its running statistics.
        nonfinite: ``"raise"`` (default) as ``validate`` says; ``"skip"``: never raise. Either
            way a training batch that would make the reduction's BatchNorm statistics
            non-finite leaves them as they were (restored with ``torch.where`` on the device:
            two small copies and an ``isfinite`` over 2·``reduced`` values per training forward,
            no host sync) and is counted in the non-persistent buffer ``nonfinite_batches``.

    dtype: the output has the input's dtype. float16/bfloat16 features are computed in float32
    (Σ in float64 for "eigh"); the covariance and its square root are computed with autocast
    disabled, so the head is safe under AMP. Integer/bool/complex input raises
    :class:`~orthofx.errors.DTypeError`. No host sync per forward by default (beyond the
    decomposition's own): the head exports with ``torch.export.export`` and compiles with
    ``fullgraph=True`` on every backend (the "svd" route's fallback check in
    ``orthofx.linalg._solver.eigh_via_svd`` is a ``torch.cond`` while traced).

    TorchScript: ``torch.jit.script`` compiles a forward that calls the ``torch.ops.orthofx``
    operators (:mod:`orthofx.nn._script`: the same solvers and exact backward as eager mode),
    with eager mode's outputs, gradients and reduction statistics; no eigenvalue recording;
    ``import orthofx.nn`` is needed before ``torch.jit.load``.
    """

    orthofx_meta = MetaSpec(kind="sqrtm", input="features")
    orthofx_usage = "pooling"  # orthofx.vocab.Usage: how the analysis report names its use

    def __init__(
        self,
        in_channels: int,
        reduced: int | None = None,
        *,
        eps: float = 1e-5,
        backend: str = "auto",
        iters: int = 5,
        compute_dtype: torch.dtype | None = None,
        output: str = "triu",
        validate: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"CovariancePooling: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if backend == "gram" and not eps > 0:
            raise ConfigError(f"CovariancePooling: backend='gram' needs eps > 0 (got eps={eps}); pass eps=1e-5")
        if output not in OUTPUTS:
            raise ConfigError(f"CovariancePooling: output must be one of {OUTPUTS}, got {output!r}")
        if in_channels < 1 or (reduced is not None and reduced < 1):
            raise ConfigError(
                f"CovariancePooling: in_channels and reduced must be positive, got {in_channels}, {reduced}"
            )
        if validate not in (None, True, False):
            raise ConfigError(f"CovariancePooling: validate must be None, True or False, got {validate!r}")
        self.validate = validate
        self.in_channels = in_channels
        self.reduced = reduced
        self.eps = float(eps)
        self.backend = backend
        self.iters = iters
        self.compute_dtype = compute_dtype
        self.output = output
        if reduced is not None:
            self.reduce = nn.Conv2d(in_channels, reduced, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(reduced)
            self.relu = nn.ReLU(inplace=True)
        c = self.channels
        self.register_buffer(
            "triu_index", torch.triu_indices(c, c).contiguous(), persistent=False
        )
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def channels(self) -> int:
        """C, the size of the covariance (after the reduction)."""
        return self.reduced if self.reduced is not None else self.in_channels

    @property
    def out_features(self) -> int:
        """Length of the flattened output per image."""
        c = self.channels
        return c * (c + 1) // 2 if self.output == "triu" else c * c

    def orthofx_internal_producer(self) -> str | None:
        return "reduce" if self.reduced is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._eager_forward(x)

    def __prepare_scriptable__(self) -> "CovariancePooling":
        return self  # scriptable: torch.jit.script compiles _script_forward

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        traced = self._traced_as_leaf(x)
        if traced is not None:
            return traced
        check_features(x, "CovariancePooling")
        in_dtype = x.dtype
        validate = getattr(self, "validate", None)  # modules pickled before the option: None
        raises = getattr(self, "nonfinite", "raise") == "raise" and validate is not False
        if raises and not tracing() and (validate or host_read_is_free(x)):
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise InputError(
                    "CovariancePooling: the input features hold NaN or Inf; nothing was updated (look at the "
                    "layers before it, or lower the lr); pass CovariancePooling(..., nonfinite='skip') to skip "
                    "such batches' statistics update and count them, or CovariancePooling(..., validate=False) "
                    "to skip this check"
                )
        if self.reduced is not None:
            x = self.relu(self._reduce_bn(self.reduce(x)))
        if x.dim() < 3:
            raise InputError(
                f"CovariancePooling expects (N, C, *spatial) features, got shape {tuple(x.shape)}; "
                "add a spatial dim with x.unsqueeze(-1)"
            )
        n, c = x.shape[0], x.shape[1]
        if c != self.channels:
            raise InputError(f"CovariancePooling built for {self.channels} channels, got {c} (shape {tuple(x.shape)})")
        with torch.autocast(x.device.type, enabled=False):
            feats = x.reshape(n, c, -1)
            work = torch.float32 if feats.dtype in _HALF else feats.dtype
            if self.backend == "gram" or (self.backend == "auto" and self.eps > 0 and feats.shape[-1] < c):
                y = self._gram(feats.to(work))
            else:
                cov = linalg.covariance(
                    feats.to(_covariance_dtype(self.backend, self.compute_dtype, work, x.device)), validate=False
                )
                y = self._spectral(
                    linalg.sqrtm,
                    cov,
                    backend=self.backend,
                    eps=self.eps,
                    iters=self.iters,
                    compute_dtype=self.compute_dtype,
                )
        y = y.to(in_dtype)
        if self.output == "full":
            return y.reshape(n, c * c)
        i, j = self.triu_index
        return y[:, i, j]

    def _script_forward(self, x: Tensor) -> Tensor:
        """The forward ``torch.jit.script`` compiles: the eager forward's values, reduction
        statistics and gradients, its decompositions through the ``torch.ops.orthofx`` operators
        (:mod:`orthofx.nn._script`). No eigenvalue recording; with ``validate=None`` the input
        check runs for CPU input only."""
        if not x.is_floating_point():
            raise DTypeError("CovariancePooling: a floating feature map is needed (cast it with x.float())")
        validate = self.validate
        check = not x.is_cuda if validate is None else validate
        if self.nonfinite == "raise" and check and x.numel() > 0 and not bool(torch.isfinite(x).all()):
            raise InputError("CovariancePooling: the input features hold NaN or Inf; nothing was updated")
        if self.reduced is not None:
            x = self.relu(self._script_reduce_bn(self.reduce(x)))
        if x.dim() < 3:
            raise InputError(f"CovariancePooling expects (N, C, *spatial) features, got shape {x.shape}")
        n, c = x.shape[0], x.shape[1]
        channels = self.in_channels
        reduced = self.reduced
        if reduced is not None:
            channels = reduced
        if c != channels:
            raise InputError(f"CovariancePooling built for {channels} channels, got {c} (shape {x.shape})")
        feats = x.reshape(n, c, -1)
        work = working_dtype(feats.dtype)
        if self.backend == "gram" or (self.backend == "auto" and self.eps > 0 and feats.shape[-1] < c):
            y = gram_sqrt(feats.to(work), self.eps, False, self.compute_dtype)
        else:
            cov = covariance(feats.to(covariance_dtype(self.backend, self.compute_dtype, work, x.is_cuda)))
            y = matrix_sqrt(cov, False, self.backend, self.eps, self.iters, self.compute_dtype)
        y = y.to(x.dtype)
        if self.output == "full":
            return y.reshape(n, c * c)
        return y[:, self.triu_index[0], self.triu_index[1]]

    def _script_reduce_bn(self, x: Tensor) -> Tensor:
        """:meth:`_reduce_bn` for TorchScript."""
        bn = self.bn
        mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
        if not bn.training or mean is None or var is None or count is None:
            return bn(x)
        saved = [mean.clone(), var.clone(), count.clone()]
        y = bn(x)
        with torch.no_grad():
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            for buf, old in zip([mean, var, count], saved):
                buf.data.copy_(torch.where(ok, buf, old))
            if hasattr(self, "nonfinite_batches"):
                self.nonfinite_batches.add_((~ok).to(torch.long))
        return y

    def _reduce_bn(self, x: Tensor) -> Tensor:
        """``self.bn(x)``; in training, running statistics that would turn non-finite are
        restored on the device and the batch is counted (class doc, ``nonfinite``)."""
        bn = self.bn
        if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
            return bn(x)
        saved = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
        y = bn(x)
        with torch.no_grad():
            ok = torch.isfinite(bn.running_mean).all() & torch.isfinite(bn.running_var).all()
            for buf, old in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), saved):
                # through .data: the batch-norm node saved the running buffers (at the version its
                # own update left) and autograd refuses a later in-place change of them; its
                # training-mode backward reads only the batch statistics, never these buffers
                buf.data.copy_(torch.where(ok, buf, old))
            count = getattr(self, "nonfinite_batches", None)
            if count is not None:
                count.add_((~ok).to(count.device, torch.long))
        return y

    def _gram(self, feats: Tensor) -> Tensor:
        """The "gram" backend: :func:`orthofx.linalg.covariance_sqrtm` (exact, M×M problem)."""
        out = linalg.covariance_sqrtm(
            feats, eps=self.eps, compute_dtype=self.compute_dtype, validate=False,
            return_eigenvalues=self.orthofx_record,
        )
        if self.orthofx_record:
            out, lam = out
            self._remember(lam)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, reduced={self.reduced}, eps={self.eps}, backend={self.backend!r}, "
            f"output={self.output!r}" + ("" if getattr(self, "validate", None) is None else f", validate={self.validate}")
        )
