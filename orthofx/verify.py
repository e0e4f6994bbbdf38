"""Verify a rewrite against the original model on the example inputs.

:func:`verify_rewrite` runs the original and the candidate (deep copies of both, so neither is
touched) on the same inputs with the same RNG state:

* in training mode: outputs, the buffers after the step (running statistics) and the
  gradient of every parameter for one fixed random cotangent of the outputs;
* in eval mode: outputs.

The user's own module hooks are switched off for these runs (their closures are shared by
the copies), so nothing a hook keeps is touched.

Tolerances follow the dtype of the original's tensor (:func:`tolerance`): outputs and
buffers ``|a − b| ≤ tol·max|b| + tol·|b|`` with ``tol = min(2¹⁰·eps(dtype), 1e-2)``
(float32 1.2e-4, float64 2.3e-13; bfloat16/float16 1e-2): the rewrite decomposes in another
precision or order than the user's code (float64 eigh of (C + Cᵀ)/2), so outputs differ by
rounding amplified by the covariance's conditioning, a few hundred eps in float32; a change
of the maths is orders above that. Gradients ``‖a − b‖ ≤ grad_rtol·max(‖b‖,
1e-3·max_q ‖b_q‖)`` per parameter with ``grad_rtol = 1e-3`` in every dtype (the stable
backward differs from autograd's by design near repeated eigenvalues; the floor keeps
gradients that are zero up to rounding, e.g. a conv bias before a training-mode BatchNorm,
from being compared at relative precision). Where the original's gradient is not finite,
the candidate's must be finite (a stable backward is an improvement, not a divergence). The
candidate must also have the original's state_dict keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from orthofx.graph.state import quiet_user_hooks

__all__ = ["verify_rewrite"]

#: output/buffer tolerance in units of the dtype's machine epsilon, and its cap
TOL_EPS = 2.0 ** 10
TOL_CAP = 1e-2
GRAD_RTOL = 1e-3
GRAD_FLOOR = 1e-3


@dataclass
class Verification:
    """What :func:`verify_rewrite` compared.

    Attributes:
        ok: everything matched within tolerance.
        reason: the first mismatch ("" when ok).
        checked: what was compared (``"train outputs"``, ``"eval outputs"``, ...).
        max_output_diff: the largest relative output difference seen.
        max_grad_diff: the largest relative gradient difference seen.
        improved: parameters whose original gradient was not finite and whose candidate
            gradient is.
    """

    ok: bool
    reason: str = ""
    checked: list[str] = field(default_factory=list)
    max_output_diff: float = 0.0
    max_grad_diff: float = 0.0
    improved: list[str] = field(default_factory=list)
    output_tol: float = 0.0

    def describe(self) -> str:
        if not self.ok:
            return f"diverges: {self.reason}"
        text = (f"verified on the example inputs ({', '.join(self.checked)}): outputs within "
                f"{self.max_output_diff:.1e} (tol {self.output_tol:.1e} rel), gradients within "
                f"{self.max_grad_diff:.1e} (tol {GRAD_RTOL:g} rel)")
        if self.improved:
            text += f"; finite where the original's gradient was not: {', '.join(self.improved)}"
        return text


def tolerance(dtype: torch.dtype) -> float:
    """The relative output/buffer tolerance for tensors of ``dtype``:
    ``min(TOL_EPS·eps(dtype), TOL_CAP)`` (0 for non-floating dtypes: compared exactly)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0
    return min(TOL_EPS * torch.finfo(dtype).eps, TOL_CAP)


def _tensors(out: Any) -> list[Tensor]:
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, Tensor)]


def _close(a: Tensor, b: Tensor) -> tuple[bool, float]:
    """``a`` within :func:`tolerance` of ``b.dtype`` of ``b``; (ok, max|a − b| / max|b|)."""
    if a.shape != b.shape:
        return False, float("inf")
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b)), 0.0
    tol = tolerance(b.dtype)
    a64, b64 = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    same_inf = torch.isinf(a64) & (a64 == b64)
    skip = both_nan | same_inf
    scale = b64[~skip].abs().amax() if (~skip).any() else torch.tensor(0.0, dtype=torch.float64)
    diff = (a64 - b64).abs()
    diff[skip] = 0
    ok = bool((diff <= tol * scale + tol * b64.abs().nan_to_num(0.0)).all())
    rel = float(diff.amax() / scale.clamp_min(1e-300)) if diff.numel() else 0.0
    return ok and not bool(torch.isnan(diff).any()), rel


def _run(model: nn.Module, inputs: Sequence[Any], training: bool, seed_state: Tensor,
         cotangent_seed: int) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor | None]]:
    model.train(training)
    torch.set_rng_state(seed_state)
    # the copies share the user's hook closures: the user's hooks stay silent, as in recording
    with torch.set_grad_enabled(training), quiet_user_hooks(model):
        outs = _tensors(model(*inputs))
    grads: dict[str, Tensor | None] = {}
    if training:
        gen = torch.Generator().manual_seed(cotangent_seed)
        diff = [o for o in outs if o.requires_grad and o.is_floating_point()]
        if diff:
            loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)
                        .to(o.device)).sum() for o in diff)
            loss.backward()  # type: ignore[union-attr]
        grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
                 for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return [o.detach() for o in outs], buffers, grads


def verify_rewrite(original: nn.Module, candidate: nn.Module, example_inputs: Sequence[Any],
                   *, param_names: dict[str, str] | None = None) -> Verification:
    """Compare ``candidate`` with ``original`` on ``example_inputs`` (see the module doc).

    ``param_names`` maps candidate parameter names to the original's when they differ.
    Both models are deep-copied; the global RNG state is restored afterwards.
    """
    rng = torch.get_rng_state()
    try:
        return _verify(original, candidate, example_inputs, param_names, rng)
    except Exception as exc:  # noqa: BLE001 - a rewrite that cannot even be compared is not verified
        return Verification(False, f"could not be compared ({type(exc).__name__}: {exc})")
    finally:
        torch.set_rng_state(rng)


def _verify(original: nn.Module, candidate: nn.Module, example_inputs: Sequence[Any],
            param_names: dict[str, str] | None, rng: Tensor) -> Verification:
    res = Verification(ok=True)
    if True:
        o, c = copy.deepcopy(original), copy.deepcopy(candidate)
        keys_o, keys_c = set(o.state_dict()), set(c.state_dict())
        if keys_o != keys_c:
            missing = sorted(keys_o - keys_c)[:3]
            extra = sorted(keys_c - keys_o)[:3]
            return Verification(False, f"state_dict keys differ (missing {missing}, extra {extra})")
        for p in list(o.parameters()) + list(c.parameters()):
            p.grad = None
        for training in (True, False):
            tag = "train" if training else "eval"
            try:
                out_o, buf_o, gr_o = _run(o, example_inputs, training, rng, 1234)
            except Exception as exc:  # noqa: BLE001 - the original itself fails in this mode
                res.checked.append(f"{tag} skipped (the original raises {type(exc).__name__})")
                continue
            try:
                out_c, buf_c, gr_c = _run(c, example_inputs, training, rng, 1234)
            except Exception as exc:  # noqa: BLE001
                return Verification(False, f"{tag} forward raises {type(exc).__name__}: {exc}")
            if len(out_o) != len(out_c):
                return Verification(False, f"{tag} outputs: {len(out_c)} tensors instead of {len(out_o)}")
            for i, (a, b) in enumerate(zip(out_c, out_o)):
                ok, rel = _close(a, b)
                res.max_output_diff = max(res.max_output_diff, rel)
                res.output_tol = max(res.output_tol, tolerance(b.dtype))
                if not ok:
                    return Verification(False, f"{tag} output {i} differs (max rel {rel:.2e})")
            res.checked.append(f"{tag} outputs")
            for name, b in buf_o.items():
                a = buf_c.get(name)
                if a is None:
                    return Verification(False, f"buffer {name!r} is missing")
                ok, rel = _close(a, b)
                if not ok:
                    return Verification(False, f"{tag} buffer {name!r} differs after the step (max rel {rel:.2e})")
            if buf_o:
                res.checked.append(f"{tag} buffers")
            if training:
                names = param_names or {}
                norms = [float(r.double().norm()) for r in gr_o.values()
                         if r is not None and bool(torch.isfinite(r).all())]
                floor = GRAD_FLOOR * max(norms, default=0.0)
                for cname, g in gr_c.items():
                    oname = names.get(cname, cname)
                    ref = gr_o.get(oname)
                    if ref is None or g is None:
                        if (ref is None) != (g is None):
                            return Verification(False, f"gradient of {oname!r}: "
                                                f"{'none' if g is None else 'present'} instead of "
                                                f"{'none' if ref is None else 'present'}")
                        continue
                    if not torch.isfinite(ref).all():
                        if torch.isfinite(g).all():
                            res.improved.append(oname)
                            continue
                        return Verification(False, f"gradient of {oname!r} is not finite")
                    scale = max(float(ref.double().norm()), floor, 1e-300)
                    err = float((g.double() - ref.double()).norm()) / scale
                    res.max_grad_diff = max(res.max_grad_diff, err)
                    if not err <= GRAD_RTOL:
                        return Verification(False, f"gradient of {oname!r} differs by {err:.2e} (rel)")
                res.checked.append("gradients")
    return res
