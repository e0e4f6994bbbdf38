"""Decorrelated batch normalisation: ZCA whitening with running statistics."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orthofx import linalg
from orthofx.errors import ConfigError, DTypeError, InputError
from orthofx.linalg._checks import host_read_is_free
from orthofx.nn._script import covariance_dtype, matrix_sqrt, working_dtype
from orthofx.nn.covariance_pooling import _covariance_dtype, check_features, tracing
from orthofx.nn.meta import MetaLayer
from orthofx.vocab import MetaSpec

__all__ = ["DecorrelatedBatchNorm"]


class DecorrelatedBatchNorm(MetaLayer):
    r"""ZCA whitening ``y = Σ^{-1/2}(x − μ)`` per channel group, then a per-channel affine.

    Input (N, C, *spatial) or (N, C). Channels are split into ``groups`` groups of
    c = C/groups. For each group, with X the (c, M) matrix of all N·H·W samples:

    * training: μ = mean over the M samples, Σ = (X − μ)(X − μ)ᵀ/M + εI,
      W = Σ^{-1/2} by :func:`orthofx.linalg.invsqrtm` (``backend="auto"``, the default: the
      float32 gesvda route on CUDA, float64 ``"eigh"`` elsewhere — both exact forward and
      exact Daleckii–Krein backward; ``"ns"``: Newton–Schulz with ``iters`` steps);
      y = W(X − μ). Running statistics are updated by EMA (m = ``momentum``):
      ``running_mean ← (1 − m)·running_mean + m·μ`` and, with ``running="covariance"`` (the
      default), ``running_covariance ← (1 − m)·running_covariance + m·(X − μ)(X − μ)ᵀ/M``
      (Σ without the εI);
    * eval: y = W_run·(X − running_mean) with ``W_run = (running_covariance + εI)^{-1/2}`` by
      the same backend, computed once per change of the running statistics and cached (eval
      forwards after the first run no decomposition, so add no host sync; while
      ``torch.compile``/``torch.export`` trace, W_run is computed in the graph instead).

    ``running="whitening"`` averages the
    whitening matrices instead, ``running_whitening ← (1 − m)·running_whitening + m·W``, and
    whitens with that average in eval mode: the classic DBN/IterNorm choice. When Σ is
    rank-deficient and its null space rotates from batch to batch (a 3×3 stem whose patches
    span fewer dimensions than its output channels, or features near a low-dimensional
    subspace), each W carries gains up to ε^{-1/2} along *that batch's* null space, and their
    average applies stale gains of that size to directions that are live in the next batch:
    measured in tests/test_nn_decorrelated_bn.py (ε = 1e-5, rank 6–9 of 16, 30 batches),
    ‖cov(eval output) − I‖_F ≈ 10³–10⁴ against 2.6–2.9 in training mode; averaging Σ gives
    2.8–3.6. The two modes keep different buffers (``running_covariance`` vs
    ``running_whitening``); a state_dict saved with the other choice (e.g. a checkpoint of the
    old default) is converted on load so that eval mode whitens exactly as the saved module
    did: ``Σ_run = W_run^{-2} − εI`` (eigenvalues floored at 0) or ``W_run = (Σ_run + εI)^{-1/2}``,
    with this module's ε (build it with the saved ε).

    ``momentum=None`` takes the cumulative average over all batches since
    :meth:`reset_running_stats` (as ``BatchNorm``; weight 1/(n+1) on the device).

    Then ``y·weight + bias`` per channel when ``affine``. ε is added to the covariance
    (default 1e-5, as in BatchNorm; the paper's authors used 1e-2). Σ is formed in the
    compute dtype and autocast is disabled inside, so whitening is safe under AMP.

    dtype: the output has the input's dtype; float16/bfloat16 are computed in float32 (Σ in
    float64 for "eigh"). Integer/bool/complex input raises :class:`~orthofx.errors.DTypeError`.
    Non-finite input (``nonfinite``): a batch whose mean or covariance holds NaN/Inf never
    reaches the running statistics. ``"raise"`` (default) raises
    :class:`~orthofx.errors.InputError` before anything changes where that check is free
    (eager CPU: one host read of two small reductions; in eval mode the input itself is
    checked); on CUDA, inside ``orthofx.syncs.cuda_policy()`` and while compiled it would be a
    host sync per forward, so there (and always with ``"skip"``) the update is instead gated on
    the device: ``torch.where`` keeps the old statistics, ``num_batches_tracked`` is not
    advanced and the non-persistent buffer ``nonfinite_batches`` counts the batch. The gate
    costs an ``isfinite`` reduction over μ and Σ (c + c² values per group) and a ``where`` over
    the running buffers, with no host sync. The output of such a batch is non-finite; pair
    ``"skip"`` with ``orthofx.attach(..., skip_nonfinite="model")`` to keep the weights too.

    No host sync per forward beyond the decomposition's own on CUDA: the module exports
    with ``torch.export.export`` and compiles with ``fullgraph=True`` in train and eval mode,
    both ``running`` choices, on every backend (the "svd" route's fallback check is a
    ``torch.cond`` while traced, see :mod:`orthofx.linalg._solver`).

    TorchScript: ``torch.jit.script`` compiles a forward that calls the ``torch.ops.orthofx``
    operators (:mod:`orthofx.nn._script`), which run the same solvers and register the same
    exact Daleckii–Krein backward (Newton–Schulz: autograd's), so the scripted module gives
    eager mode's outputs, gradients and running statistics. It does not record eigenvalues for
    the monitor, recomputes ``W_run`` on every eval call, and needs ``import orthofx.nn`` before
    ``torch.jit.load`` (the operators are registered from Python; libtorch cannot run them).
    """

    orthofx_meta = MetaSpec(kind="invsqrtm", input="features")
    orthofx_usage = "whitening"  # orthofx.vocab.Usage: how the analysis report names its use

    def __init__(
        self,
        num_features: int,
        groups: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        *,
        backend: str = "auto",
        iters: int = 5,
        compute_dtype: torch.dtype | None = None,
        track_running_stats: bool = True,
        running: str = "covariance",
        nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if nonfinite not in ("raise", "skip"):
            raise ConfigError(f"DecorrelatedBatchNorm: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if num_features < 1 or groups < 1 or num_features % groups:
            raise ConfigError(
                f"DecorrelatedBatchNorm: num_features={num_features} must be a positive multiple of groups={groups}"
            )
        if running not in ("whitening", "covariance"):
            raise ConfigError(f"DecorrelatedBatchNorm: running must be 'whitening' or 'covariance', got {running!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"DecorrelatedBatchNorm: momentum must be in [0, 1] or None, got {momentum}")
        self.num_features = num_features
        self.groups = groups
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.backend = backend
        self.iters = iters
        self.compute_dtype = compute_dtype
        self.track_running_stats = track_running_stats
        self.running = running
        self._eval_cache: tuple[tuple[int, int, torch.dtype], Tensor] | None = None
        c = num_features // groups
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(groups, c, 1))
            # "whitening": EMA of W = Σ^{-1/2}; "covariance": EMA of Σ, W computed at eval time
            self.register_buffer(f"running_{running}", torch.eye(c).expand(groups, c, c).clone())
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer(f"running_{running}", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._script_forward(x)
        return self._eager_forward(x)

    def __prepare_scriptable__(self) -> "DecorrelatedBatchNorm":
        return self  # scriptable: torch.jit.script compiles _script_forward

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        traced = self._traced_as_leaf(x)
        if traced is not None:
            return traced
        check_features(x, f"DecorrelatedBatchNorm({self.num_features})")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise InputError(
                f"DecorrelatedBatchNorm({self.num_features}) expects (N, {self.num_features}, ...), "
                f"got shape {tuple(x.shape)}"
            )
        shape = x.shape
        g, c = self.groups, self.num_features // self.groups
        in_dtype = x.dtype
        work_dtype = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        with torch.autocast(x.device.type, enabled=False):
            # (N, C, *S) -> (C, N·S) -> (g, c, M)
            feats = x.transpose(0, 1).reshape(g, c, -1).to(work_dtype)
            use_batch = self.training or not self.track_running_stats
            if use_batch:
                if feats.shape[-1] < 2:
                    raise InputError(
                        f"DecorrelatedBatchNorm({self.num_features}) needs more than one sample per channel "
                        f"in training, got shape {tuple(x.shape)}; use a larger batch or call .eval()"
                    )
                mean = feats.mean(dim=-1, keepdim=True)
                centred = feats - mean
                cdt = _covariance_dtype(self.backend, self.compute_dtype, work_dtype, x.device)
                xc = centred.to(cdt)
                cov = xc @ xc.mT / xc.shape[-1]
                if self._raises(cov) and not bool(torch.isfinite(mean).all() & torch.isfinite(cov).all()):
                    raise InputError(self._nonfinite_message("its batch mean or covariance"))
                whitening = self._spectral(
                    linalg.invsqrtm,
                    cov,
                    backend=self.backend,
                    eps=self.eps,
                    iters=self.iters,
                    compute_dtype=self.compute_dtype,
                ).to(work_dtype)
                if self.training and self.track_running_stats:
                    with torch.no_grad():
                        # momentum None: cumulative average over the batches seen (as BatchNorm),
                        # weight 1/(n+1) computed on the device (no host sync)
                        stat = whitening if self.running == "whitening" else cov
                        buf = self._running_buffer()
                        # a non-finite batch leaves the statistics as they are (gated on the device)
                        ok = torch.isfinite(mean).all() & torch.isfinite(stat).all()
                        for run, new in ((self.running_mean, mean), (buf, stat)):
                            if self.momentum is not None:
                                w: float | Tensor = self.momentum
                            else:
                                w = 1.0 / (self.num_batches_tracked.to(run.dtype) + 1.0)
                            run.copy_(torch.where(ok, run.lerp(new.detach().to(run.dtype), w), run))
                        self.num_batches_tracked.add_(ok.to(torch.long))
                        self._count_nonfinite(ok)
            else:
                if self._raises(feats) and feats.numel() and not bool(torch.isfinite(feats).all()):
                    raise InputError(self._nonfinite_message("the input"))
                centred = feats - self.running_mean.to(work_dtype)
                whitening = self._eval_whitening().to(work_dtype)
            y = whitening @ centred
            y = y.reshape(self.num_features, shape[0], *shape[2:]).transpose(0, 1)
            if self.affine:
                view = (1, self.num_features) + (1,) * (len(shape) - 2)
                y = y * self.weight.to(work_dtype).view(view) + self.bias.to(work_dtype).view(view)
        return y.to(in_dtype).contiguous()

    def _script_forward(self, x: Tensor) -> Tensor:
        """The forward ``torch.jit.script`` compiles: the eager forward's values, running-statistic
        updates and gradients, its decompositions through the ``torch.ops.orthofx`` operators
        (:mod:`orthofx.nn._script`: the same solvers and exact backward). No eigenvalue recording;
        in eval mode ``W_run`` is recomputed on every call (no cache); ``nonfinite="raise"`` raises
        for CPU input only (a free host read), and CUDA input is gated on the device."""
        if not x.is_floating_point():
            raise DTypeError(f"DecorrelatedBatchNorm({self.num_features}): a floating feature map is needed")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise InputError(f"DecorrelatedBatchNorm({self.num_features}) expects (N, {self.num_features}, ...), "
                             f"got shape {x.shape}")
        shape = x.shape
        g = self.groups
        c = self.num_features // g
        work = working_dtype(x.dtype)
        raises = self.nonfinite == "raise" and not x.is_cuda
        feats = x.transpose(0, 1).reshape(g, c, -1).to(work)
        running_mean = self.running_mean
        if self.training or not self.track_running_stats or running_mean is None:
            if feats.shape[-1] < 2:
                raise InputError(f"DecorrelatedBatchNorm({self.num_features}) needs more than one sample per "
                                 f"channel in training, got shape {x.shape}")
            mean = feats.mean(dim=-1, keepdim=True)
            centred = feats - mean
            xc = centred.to(covariance_dtype(self.backend, self.compute_dtype, work, x.is_cuda))
            cov = xc @ xc.mT / xc.shape[-1]
            if raises and not bool(torch.isfinite(mean).all() & torch.isfinite(cov).all()):
                raise InputError(self._nonfinite_message("its batch mean or covariance"))
            whitening = matrix_sqrt(cov, True, self.backend, self.eps, self.iters, self.compute_dtype).to(work)
            if self.training and self.track_running_stats and running_mean is not None:
                self._script_update(running_mean, mean, whitening if self.running == "whitening" else cov)
        else:
            if raises and feats.numel() > 0 and not bool(torch.isfinite(feats).all()):
                raise InputError(self._nonfinite_message("the input"))
            centred = feats - running_mean.to(work)
            whitening = self._script_eval_whitening().to(work)
        y = whitening @ centred
        y = y.reshape([self.num_features, shape[0]] + shape[2:]).transpose(0, 1)
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:
            view = [1, self.num_features] + [1] * (len(shape) - 2)
            y = y * weight.to(work).view(view) + bias.to(work).view(view)
        return y.to(x.dtype).contiguous()

    def _script_update(self, running_mean: Tensor, mean: Tensor, stat: Tensor) -> None:
        """The running-statistic update of the eager forward (EMA, or cumulative average for
        ``momentum=None``; a non-finite batch leaves the statistics unchanged and is counted)."""
        count = self.num_batches_tracked
        with torch.no_grad():
            buf = self._script_running_buffer()
            ok = torch.isfinite(mean).all() & torch.isfinite(stat).all()
            for run, new in [(running_mean, mean), (buf, stat)]:
                new = new.detach().to(run.dtype)
                momentum = self.momentum
                if momentum is not None:
                    moved = run.lerp(new, momentum)
                else:
                    moved = run.lerp(new, 1.0 / (count.to(run.dtype) + 1.0))
                run.copy_(torch.where(ok, moved, run))
            count.add_(ok.to(torch.long))
            if hasattr(self, "nonfinite_batches"):
                self.nonfinite_batches.add_((~ok).to(torch.long))

    def _script_running_buffer(self) -> Tensor:
        if hasattr(self, "running_whitening"):
            return self.running_whitening
        return self.running_covariance

    def _script_eval_whitening(self) -> Tensor:
        """Eval-mode W: the running whitening, or ``(Σ_running + εI)^{-1/2}`` (no gradient)."""
        if hasattr(self, "running_whitening"):
            return self.running_whitening
        with torch.no_grad():
            w = matrix_sqrt(self.running_covariance, True, self.backend, self.eps, self.iters, self.compute_dtype)
        return w

    def _raises(self, t: Tensor) -> bool:
        """Whether a non-finite batch raises here: ``nonfinite="raise"`` and the host read is free."""
        return getattr(self, "nonfinite", "raise") == "raise" and host_read_is_free(t)

    def _count_nonfinite(self, ok: Tensor) -> None:
        count = getattr(self, "nonfinite_batches", None)  # modules pickled before the buffer: none
        if count is not None:
            count.add_((~ok).to(count.device, torch.long))

    def _nonfinite_message(self, what: str) -> str:
        return (f"DecorrelatedBatchNorm({self.num_features}): the input holds NaN or Inf ({what} is not finite); "
                f"nothing was updated. Look at the layers before it or lower the lr, or pass nonfinite='skip' "
                f"to skip such batches' statistics update and count them (module.nonfinite_batches)")

    def reset_running_stats(self) -> None:
        """Running mean ← 0, running whitening/covariance ← I, batch count ← 0."""
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.running_mean.zero_()
            buf = self._running_buffer()
            buf.copy_(torch.eye(buf.shape[-1], dtype=buf.dtype, device=buf.device).expand_as(buf))
            self.num_batches_tracked.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        """A state_dict saved with the other ``running`` choice is converted (class doc)."""
        other = "whitening" if self.running == "covariance" else "covariance"
        src, dst = f"{prefix}running_{other}", f"{prefix}running_{self.running}"
        if self.track_running_stats and src in state_dict and dst not in state_dict:
            stat = state_dict.pop(src)
            state_dict[dst] = _convert_running(stat, self.eps, to=self.running)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _running_buffer(self) -> Tensor:
        return self.running_whitening if self.running == "whitening" else self.running_covariance

    def _eval_whitening(self) -> Tensor:
        """W used in eval mode: the running whitening matrix, or (Σ_running + εI)^{-1/2} computed
        once per change of the running covariance (cached on the buffer's version counter)."""
        if self.running == "whitening":
            return self.running_whitening
        buf = self.running_covariance
        if tracing():  # compile/export: no Python-side cache (fake tensors have no data_ptr)
            return linalg.invsqrtm(
                buf, backend=self.backend, eps=self.eps, iters=self.iters,
                compute_dtype=self.compute_dtype, validate=False,
            ).detach()
        key = (buf._version, buf.data_ptr(), buf.dtype)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                w = linalg.invsqrtm(
                    buf, backend=self.backend, eps=self.eps, iters=self.iters,
                    compute_dtype=self.compute_dtype, validate=False,
                )
            self._eval_cache = (key, w)
        return self._eval_cache[1]

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, backend={self.backend!r}, running={self.running!r}"
            + ("" if getattr(self, "nonfinite", "raise") == "raise" else f", nonfinite={self.nonfinite!r}")
        )


def _convert_running(stat: Tensor, eps: float, to: str) -> Tensor:
    """running_whitening W ↔ running_covariance Σ with the same eval whitening
    ``W = (Σ + εI)^{-1/2}``: Σ = W^{-2} − εI (eigenvalues floored at 0), in float64."""
    if not isinstance(stat, Tensor) or stat.dim() < 2 or stat.is_meta:
        return stat
    a = stat.detach().to(torch.float64)
    lam, vec = torch.linalg.eigh((a + a.mT) / 2)
    if to == "covariance":
        f = (lam.clamp_min(torch.finfo(torch.float64).tiny) ** -2 - eps).clamp_min(0.0)
    else:
        f = (lam.clamp_min(0.0) + eps).clamp_min(torch.finfo(torch.float64).tiny) ** -0.5
    return ((vec * f.unsqueeze(-2)) @ vec.mT).to(stat.dtype)
