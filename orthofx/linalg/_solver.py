"""Raw symmetric eigensolvers with failure recovery (no autograd; callers wrap them).

``robust_eigh(A)`` calls ``torch.linalg.eigh``; if that raises ``torch.linalg.LinAlgError``
(non-convergence, or a NaN/Inf slipped through with ``validate=False``) it

1. replaces non-finite batch elements by the identity (their outputs become NaN afterwards),
2. walks the recovery chain, each step a fresh solver call:

   * ``"float64"`` - the same matrix in float64 (skipped when the input already is float64);
   * ``"jitter"``  - float64, ``A + δI`` with ``δ = 1e-6·‖A‖_F/√n`` (the RMS eigenvalue, which
     is ≥ tr(A)/n for an SPD A); the eigenvalues are shifted back by ``−δ``, the eigenvectors of
     ``A + δI`` are those of ``A``, so the result stays accurate to float64 rounding;
   * ``"cpu"``     - float64 on the CPU (LAPACK), ``A + δ'I`` with ``δ' = 1e-4·‖A‖_F/√n``,
     shifted back. Also run on CPU inputs, as a last, differently jittered try.

Every exception increments ``solver_stats().failures``; the step that succeeds increments
``solver_stats().fallbacks[step]``. If every step fails, :class:`~orthofx.errors.SolverError`.
Outputs always have the input's dtype and device.

``eigh_via_svd(A)`` is the SVD forward route: for a symmetric ``A = W S Vᵀ`` the right singular
vectors are eigenvectors; eigenvalues are recovered as Rayleigh quotients ``λ_i = v_iᵀ A v_i``
(correct sign also for negative eigenvalues) and sorted ascending. On CUDA it uses
``driver="gesvda"``. A batch element is recomputed with ``robust_eigh`` when its relative
residual ``‖AV − VΛ‖_F/‖A‖_F`` or its loss of orthonormality ``‖VᵀV − I‖_F/√n`` exceeds
``svd_residual_tol(n, dtype)``, or when it is indefinite beyond that tolerance
(``λ_min < −tol·‖A‖_F``: for ``±λ`` pairs an SVD mixes eigenvectors), or when the SVD raises
(gesvda raises ``LinAlgError`` on exactly singular matrices: measured on every rank-deficient
covariance without ``+εI``);
each such element counts as ``fallbacks["svd->eigh"]``. The fallback eigh runs in float64
(more accurate, and on CUDA not slower: benchmarks/results/sqrtm_backends_h200.md). That check
costs one host sync.

While traced by ``torch.compile`` or ``torch.export`` the check cannot be read on the host; the
route then branches in the graph with ``torch.cond(ok.all(), ...)``. When every element passes
it returns the SVD result, as in eager mode; otherwise the whole batch is recomputed by one
float64 ``torch.linalg.eigh`` (no recovery chain: a solver error raises; non-finite elements
give NaN) and ``torch.where`` keeps the SVD result of the elements that passed, so the values
equal eager mode's. The compiled/exported graph does not count ``fallbacks["svd->eigh"]`` (a
host-side counter), and the runtime that executes the ``cond`` still reads its predicate (a
host sync on CUDA, as in eager mode). ``torch.jit.trace`` cannot trace ``torch.cond`` and keeps
the eager branch.

``FiniteGuard(a)`` is the non-finite input check of the meta-layer path (``on_nonfinite``
"raise"/"skip" of :func:`orthofx.linalg.eigh`): it computes the per-element flag
``isfinite(A).all()`` on the device, replaces non-finite elements by the identity before the
solver (which then never sees NaN and never enters the recovery chain for it), and lets the
caller read the flag *after* the solver without a host sync of its own: on CUDA the flag is
copied (``non_blocking``) into pinned host memory before the solver is launched, and the
solver's own host sync (cuSOLVER's info check inside ``torch.linalg.eigh``/``svd``, or the SVD
route's residual check) completes that copy; a CUDA event confirms it, and only if the solver
did not synchronise does the read wait on that event. On the CPU the flag is read directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from orthofx.errors import SolverError
from orthofx.linalg.stats import maybe_inject_failure, solver_stats

__all__: list[str] = []  # internal module: import what you need by name

JITTER_REL = 1e-6
CPU_JITTER_REL = 1e-4


def _rms_scale(a: Tensor) -> Tensor:
    """‖A‖_F/√n per batch element, shape (..., 1), never zero."""
    n = a.shape[-1]
    s = torch.linalg.matrix_norm(a) / math.sqrt(max(n, 1))
    return s.clamp_min(torch.finfo(a.dtype).tiny).unsqueeze(-1)


def _shift_diag(a: Tensor, delta: Tensor) -> Tensor:
    """A + δI with δ of shape (..., 1)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a + delta.unsqueeze(-1) * eye


def _recover(a: Tensor, vectors: bool, first_error: Exception) -> tuple[Tensor, Tensor | None]:
    stats = solver_stats()
    dtype, device = a.dtype, a.device
    fn: Callable[[Tensor], object] = torch.linalg.eigh if vectors else torch.linalg.eigvalsh

    bad = ~torch.isfinite(a).flatten(-2).all(-1)
    has_bad = bool(bad.any())
    if has_bad:
        eye = torch.eye(a.shape[-1], dtype=dtype, device=device)
        a = torch.where(bad[..., None, None], eye, a)

    a64 = a.to(torch.float64)

    def plain64() -> tuple[Tensor, Tensor | None]:
        return _split(fn(a64), vectors)

    def jitter() -> tuple[Tensor, Tensor | None]:
        delta = JITTER_REL * _rms_scale(a64)
        lam, vec = _split(fn(_shift_diag(a64, delta)), vectors)
        return lam - delta, vec

    def cpu() -> tuple[Tensor, Tensor | None]:
        c = a64.cpu()
        delta = CPU_JITTER_REL * _rms_scale(c)
        lam, vec = _split(fn(_shift_diag(c, delta)), vectors)
        return lam - delta, vec

    steps: list[tuple[str, Callable[[], tuple[Tensor, Tensor | None]]]] = []
    if dtype != torch.float64:
        steps.append(("float64", plain64))
    steps += [("jitter", jitter), ("cpu", cpu)]

    errors = [f"first try: {first_error}"]
    for name, step in steps:
        try:
            maybe_inject_failure(f"eigh fallback {name}")
            lam, vec = step()
        except torch.linalg.LinAlgError as exc:
            stats.record_failure()
            errors.append(f"{name}: {exc}")
            continue
        stats.record_fallback(name)
        lam = lam.to(device=device, dtype=dtype)
        vec = vec.to(device=device, dtype=dtype) if vec is not None else None
        if has_bad:
            lam = torch.where(bad[..., None], torch.nan, lam)
            if vec is not None:
                vec = torch.where(bad[..., None, None], torch.nan, vec)
        return lam, vec
    raise SolverError(
        f"symmetric eigensolver failed on a batch of shape {tuple(a.shape)} ({dtype}, {device}) "
        "after every recovery step: " + "; ".join(errors)
    )


def _split(out: object, vectors: bool) -> tuple[Tensor, Tensor | None]:
    if vectors:
        lam, vec = out  # type: ignore[misc]
        return lam, vec
    return out, None  # type: ignore[return-value]


def robust_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """(L ascending, U) of a symmetric float32/float64 batch, with the recovery chain (module doc)."""
    try:
        maybe_inject_failure("eigh")
        lam, vec = torch.linalg.eigh(a)
        return lam, vec
    except torch.linalg.LinAlgError as exc:
        solver_stats().record_failure()
        lam, vec = _recover(a, True, exc)
        assert vec is not None
        return lam, vec


def robust_eigvalsh(a: Tensor) -> Tensor:
    """Ascending eigenvalues of a symmetric float32/float64 batch, with the recovery chain."""
    try:
        maybe_inject_failure("eigvalsh")
        return torch.linalg.eigvalsh(a)
    except torch.linalg.LinAlgError as exc:
        solver_stats().record_failure()
        return _recover(a, False, exc)[0]


def svd_residual_tol(n: int, dtype: torch.dtype) -> float:
    """Relative residual above which an SVD-route eigenpair set is rejected:
    ``64·√n·max(eps(dtype), 1e-12)`` (float32, n=256: 1.2e-4; float64: 1e-9).

    The check catches failures (a mixed ``±λ`` pair leaves O(|λ|/‖A‖_F), a non-converged SVD
    O(1)), not the last digits: gesvda's float64 residuals reach 4.5e-14, hence the 1e-12 floor
    for float64 (benchmarks/results/sqrtm_backends_h200.md).
    """
    return 64.0 * math.sqrt(max(n, 1)) * max(torch.finfo(dtype).eps, 1e-12)


def eigh_via_svd(a: Tensor) -> tuple[Tensor, Tensor]:
    """(L ascending, U) of a symmetric float32/float64 batch through an SVD (module doc)."""
    stats = solver_stats()
    n = a.shape[-1]
    traced = _tracing()
    if traced:  # a compiled SVD raises on NaN where eager mode recovers: decompose I there instead
        finite = torch.isfinite(a).flatten(-2).all(-1)
        a = torch.where(finite[..., None, None], a, torch.eye(n, dtype=a.dtype, device=a.device))
    try:
        maybe_inject_failure("svd")
        driver = "gesvda" if a.is_cuda else None
        _, _, vh = torch.linalg.svd(a, full_matrices=False, driver=driver)
    except torch.linalg.LinAlgError:
        stats.record_failure()
        lam, vec = robust_eigh(a.to(torch.float64))
        stats.record_fallback("svd->eigh")
        return lam.to(a.dtype), vec.to(a.dtype)
    v = vh.mT
    av = a @ v
    lam = (v * av).sum(-2)
    lam, order = torch.sort(lam, dim=-1)
    v = torch.gather(v, -1, order.unsqueeze(-2).expand_as(v))
    av = torch.gather(av, -1, order.unsqueeze(-2).expand_as(av))
    norm_a = torch.linalg.matrix_norm(a).clamp_min(torch.finfo(a.dtype).tiny)
    resid = torch.linalg.matrix_norm(av - v * lam.unsqueeze(-2)) / norm_a
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    orth = torch.linalg.matrix_norm(v.mT @ v - eye) / math.sqrt(max(n, 1))
    tol = svd_residual_tol(n, a.dtype)
    ok = (resid <= tol) & (orth <= tol) & (lam[..., 0] >= -tol * norm_a) & torch.isfinite(lam).all(-1)
    if traced:
        return _traced_fallback(a, lam, v, ok & finite, finite)
    if not bool(ok.all()):  # one host sync
        bad_idx = (~ok).reshape(-1).nonzero().squeeze(-1)
        flat_a = a.reshape(-1, n, n)
        lam_bad, v_bad = robust_eigh(flat_a[bad_idx].to(torch.float64))
        lam_bad, v_bad = lam_bad.to(a.dtype), v_bad.to(a.dtype)
        lam = lam.reshape(-1, n).index_copy(0, bad_idx, lam_bad).reshape(lam.shape)
        v = v.reshape(-1, n, n).index_copy(0, bad_idx, v_bad).reshape(v.shape)
        stats.record_fallback("svd->eigh", int(bad_idx.numel()))
    return lam, v


def _tracing() -> bool:
    """True while torch.compile or torch.export (strict or not) trace the caller, where a host
    read of a data-dependent flag is a graph break / an export error. (``torch.jit.trace`` is
    not included: it cannot trace ``torch.cond`` and keeps the eager branch, as before.)"""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _svd_passed(a: Tensor, lam: Tensor, v: Tensor, ok: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    return lam.clone(), v.clone()  # torch.cond branches may not return their inputs


def _svd_failed(a: Tensor, lam: Tensor, v: Tensor, ok: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """Every element recomputed by a float64 ``torch.linalg.eigh``; the SVD result kept where it
    passed; NaN for the elements that were not finite (``a`` holds I there), as ``_recover``."""
    lam64, v64 = torch.linalg.eigh(a.to(torch.float64))
    lam64 = torch.where(finite.unsqueeze(-1), lam64, torch.nan)
    v64 = torch.where(finite[..., None, None], v64, torch.nan)
    lam = torch.where(ok.unsqueeze(-1), lam, lam64.to(lam.dtype))
    v = torch.where(ok[..., None, None], v, v64.to(v.dtype))
    return lam, v


def _traced_fallback(a: Tensor, lam: Tensor, v: Tensor, ok: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """The fallback of :func:`eigh_via_svd` in traced code: ``torch.cond(ok.all(), ...)``, a
    graph-level branch instead of a Python one (module doc)."""
    return torch.cond(ok.all(), _svd_passed, _svd_failed, (a, lam, v, ok, finite))


class FiniteGuard:
    """Per-batch-element finiteness of a (..., n, n) batch, readable after the solver (module doc).

    ``ok``: bool (...,) on ``a``'s device; ``clean``: ``a`` with non-finite elements replaced by
    the identity (gradients into those elements are zero); ``all_finite()`` / ``count_bad()``
    read the flag on the host (see the module doc for why that adds no sync on CUDA).
    """

    def __init__(self, a: Tensor) -> None:
        self.ok = torch.isfinite(a).flatten(-2).all(-1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        self.clean = torch.where(self.ok[..., None, None], a, eye)
        self._event = None
        if a.is_cuda:
            self._host = torch.empty(self.ok.shape, dtype=torch.bool, pin_memory=True)
            self._host.copy_(self.ok, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(a.device))
        else:
            self._host = self.ok

    def _host_flags(self) -> Tensor:
        if self._event is not None and not self._event.query():
            self._event.synchronize()  # the solver did not synchronise: wait for the copy
        return self._host

    def count_bad(self) -> int:
        """Number of non-finite batch elements (host memory read: no device sync, see above)."""
        flags = self._host_flags().detach().numpy()
        return int(flags.size - flags.sum())
