"""The TorchScript path of orthofx.nn's modules: torch ops for the decompositions, and the
TorchScript-compatible code that calls them.

``torch.jit.script`` cannot compile a ``torch.autograd.Function`` call, nor the Python-side
solver choice and checks around it. Each decomposition the modules use is therefore also
registered as a torch operator (``torch.library.custom_op``) with its autograd formula
(``register_autograd``), which TorchScript calls as ``torch.ops.orthofx.<name>``:

* ``spectral_sqrtm(a, inverse, eps, solver) -> (Y, L, U)``: ``Y = (A + εI)^{±1/2}`` of
  :func:`orthofx.linalg.sqrtm`/:func:`~orthofx.linalg.invsqrtm` ("eigh"/"svd"), backward the
  exact Daleckii–Krein gradient (``spectral_backward``);
* ``ns_sqrtm(a, iters, inverse) -> Y``: the coupled Newton–Schulz iteration, backward
  autograd's through the same iteration (recomputed inside the backward: one more forward of
  ``iters`` steps);
* ``gram_sqrtm(z, eps, inverse, solver) -> (Y, μ, V, H)``: :func:`orthofx.linalg.covariance_sqrtm`'s
  Gram route, backward its exact closed form (``gram_backward``).

The operators run the same Python functions as the autograd Functions of eager mode (solver
choice, failure recovery, ``solver_stats`` counters included), so a scripted module computes the
eager module's values and gradients. Outputs other than ``Y`` are not differentiable;
there is no double backward. The operators exist once ``orthofx.nn`` is imported (``import
orthofx`` alone is lazy and does not register them): ``torch.jit.load`` of a scripted model that
holds orthofx modules needs ``import orthofx.nn`` first (``Unknown builtin op: orthofx::...``
otherwise), and the C++ runtime (libtorch) cannot run them.

The free functions below mirror :func:`orthofx.linalg.sqrtm`/``invsqrtm`` and
``covariance_sqrtm`` with ``validate=False`` (backend and dtype resolution, symmetrisation,
casts) in code TorchScript compiles.
"""

import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from orthofx.linalg._checks import no_autocast
from orthofx.linalg.gram import gram_backward, gram_forward
from orthofx.linalg.newton_schulz import ns_sqrtm
from orthofx.linalg.spectral import spectral_backward, spectral_forward
from orthofx.linalg.stats import solver_stats

__all__: List[str] = []  # internal module

_NS = "orthofx"


# --- spectral (eigh/svd) square roots --------------------------------------------------------

@torch.library.custom_op(f"{_NS}::spectral_sqrtm", mutates_args=())
def _spectral_op(a: Tensor, inverse: bool, eps: float, solver: str) -> Tuple[Tensor, Tensor, Tensor]:
    with no_autocast(a.device.type):
        y, lam, vec = spectral_forward(a, inverse, eps, solver)
    solver_stats().record_nonfinite(lam, event_dims=1)
    return y.contiguous(), lam.contiguous(), vec.contiguous()  # the fake's strides


@_spectral_op.register_fake
def _(a: Tensor, inverse: bool, eps: float, solver: str) -> Tuple[Tensor, Tensor, Tensor]:
    return a.new_empty(a.shape), a.new_empty(a.shape[:-1]), a.new_empty(a.shape)


def _spectral_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
    _, lam, vec = output
    ctx.inverse, ctx.eps = inputs[1], inputs[2]
    ctx.save_for_backward(lam, vec)
    ctx.mark_non_differentiable(lam, vec)


def _spectral_grad(ctx: Any, g_y: Tensor, _g_lam: Tensor, _g_vec: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
    lam, vec = ctx.saved_tensors
    with no_autocast(vec.device.type):
        return spectral_backward(g_y, lam, vec, ctx.eps, ctx.inverse), None, None, None


_spectral_op.register_autograd(_spectral_grad, setup_context=_spectral_setup)


# --- Newton–Schulz ---------------------------------------------------------------------------

@torch.library.custom_op(f"{_NS}::ns_sqrtm", mutates_args=())
def _ns_op(a: Tensor, iters: int, inverse: bool) -> Tensor:
    with no_autocast(a.device.type):
        y = ns_sqrtm(a, iters, inverse)
    solver_stats().record_nonfinite(y, event_dims=2)
    return y.contiguous()


@_ns_op.register_fake
def _(a: Tensor, iters: int, inverse: bool) -> Tensor:
    return a.new_empty(a.shape)


def _ns_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    ctx.iters, ctx.inverse = inputs[1], inputs[2]
    ctx.save_for_backward(inputs[0])


def _ns_grad(ctx: Any, g_y: Tensor) -> Tuple[Tensor, None, None]:
    (a,) = ctx.saved_tensors
    with torch.enable_grad(), no_autocast(a.device.type):
        leaf = a.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(ns_sqrtm(leaf, ctx.iters, ctx.inverse), leaf, g_y)
    return grad, None, None


_ns_op.register_autograd(_ns_grad, setup_context=_ns_setup)


# --- Gram route of covariance pooling --------------------------------------------------------

@torch.library.custom_op(f"{_NS}::gram_sqrtm", mutates_args=())
def _gram_op(z: Tensor, eps: float, inverse: bool, solver: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with no_autocast(z.device.type):
        y, mu, v, hmat = gram_forward(z, eps, inverse, solver)
    solver_stats().record_nonfinite(y, event_dims=2)
    return y.contiguous(), mu.contiguous(), v.contiguous(), hmat.contiguous()


@_gram_op.register_fake
def _(z: Tensor, eps: float, inverse: bool, solver: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    c, m = z.shape[-2], z.shape[-1]
    batch = z.shape[:-2]
    return (z.new_empty((*batch, c, c)), z.new_empty((*batch, m)), z.new_empty((*batch, m, m)),
            z.new_empty((*batch, m, m)))


def _gram_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    _, mu, v, hmat = output
    ctx.eps, ctx.inverse = inputs[1], inputs[2]
    ctx.save_for_backward(inputs[0], mu, v, hmat)
    ctx.mark_non_differentiable(mu, v, hmat)


def _gram_grad(ctx: Any, g_y: Tensor, *_: Tensor) -> Tuple[Tensor, None, None, None]:
    z, mu, v, hmat = ctx.saved_tensors
    with no_autocast(z.device.type):
        return gram_backward(g_y, z, mu, v, hmat, ctx.eps, ctx.inverse), None, None, None


_gram_op.register_autograd(_gram_grad, setup_context=_gram_setup)


# --- TorchScript-compatible callers ----------------------------------------------------------

def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 -> float32; other dtypes unchanged."""
    return torch.float32 if dtype == torch.float16 or dtype == torch.bfloat16 else dtype


def covariance_dtype(backend: str, compute_dtype: Optional[torch.dtype], dtype: torch.dtype,
                     is_cuda: bool) -> torch.dtype:
    """The dtype a module forms Σ in: that of the decomposition (``compute_dtype``; else float64
    for "eigh", "auto" meaning "eigh" off CUDA; else ``dtype``)."""
    if compute_dtype is not None:
        return compute_dtype
    if backend == "auto":
        backend = "svd" if is_cuda else "eigh"
    return torch.float64 if backend == "eigh" else dtype


def matrix_sqrt(a: Tensor, inverse: bool, backend: str, eps: float, iters: int,
                compute_dtype: Optional[torch.dtype]) -> Tensor:
    """``(A + εI)^{1/2}`` (``^{-1/2}`` when ``inverse``): :func:`orthofx.linalg.sqrtm` /
    ``invsqrtm`` with ``validate=False``, through the operators above."""
    if backend == "auto":
        backend = "svd" if a.is_cuda else "eigh"
    if backend != "eigh" and backend != "svd" and backend != "ns":
        raise ValueError("unknown sqrtm backend '" + backend + "'; choose one of eigh, svd, ns, auto")
    if compute_dtype is not None:
        cdtype = compute_dtype
    elif backend == "eigh":
        cdtype = torch.float64
    else:
        cdtype = working_dtype(a.dtype)
    if a.numel() == 0:
        return a.new_empty(a.shape)
    s = ((a + a.mT) * 0.5).to(cdtype)
    if backend == "ns":
        if eps != 0.0:
            s = s + eps * torch.eye(s.shape[-1], dtype=cdtype, device=s.device)
        y = torch.ops.orthofx.ns_sqrtm(s, iters, inverse)
    else:
        y, _, _ = torch.ops.orthofx.spectral_sqrtm(s, inverse, eps, backend)
    return y.to(a.dtype)


def covariance(x: Tensor) -> Tensor:
    """``Xc Xcᵀ/M`` of features (..., C, M) in their dtype (:func:`orthofx.linalg.covariance`)."""
    xc = x - x.mean(dim=-1, keepdim=True)
    p = xc @ xc.mT
    return (p + p.mT) * 0.5 / x.shape[-1]


def gram_sqrt(x: Tensor, eps: float, inverse: bool, compute_dtype: Optional[torch.dtype]) -> Tensor:
    """``(Σ + εI)^{±1/2}`` of the covariance of features (..., C, M) through the M×M Gram matrix:
    :func:`orthofx.linalg.covariance_sqrtm` (``backend="auto"``, ``validate=False``)."""
    c, m = x.shape[-2], x.shape[-1]
    backend = "svd" if x.is_cuda and (compute_dtype is None or compute_dtype != torch.float64) else "eigh"
    if compute_dtype is not None:
        cdtype = compute_dtype
    elif backend == "eigh":
        cdtype = torch.float64
    else:
        cdtype = working_dtype(x.dtype)
    out_dtype = x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return x.new_empty(list(x.shape[:-1]) + [c])
    if m < 1:
        raise ValueError("covariance_sqrtm needs at least one sample (M >= 1)")
    xx = x.to(cdtype)
    z = (xx - xx.mean(dim=-1, keepdim=True)) / math.sqrt(m)
    y, _, _, _ = torch.ops.orthofx.gram_sqrtm(z, eps, inverse, backend)
    return y.to(out_dtype)
