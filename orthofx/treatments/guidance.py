"""Guidance when NOG/OLR meet an adaptive optimizer (Adam, AdamW, Adagrad, RMSprop, ...).

NOG and OLR are derived for SGD (paper Sec. 5): NOG's step is ``−lr·U Vᵀ`` (every singular
value 1) and OLR's η* is the step size of ``W − η·∂l/∂W``. An adaptive optimizer divides the
step element-wise by its second-moment estimate (``√v̂ + ε``), so neither holds any more.
:func:`attach` says so once per optimizer with an :class:`AdaptiveOptimizerWarning`."""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

__all__ = ["AdaptiveOptimizerWarning", "is_adaptive", "adaptive_message"]


class AdaptiveOptimizerWarning(UserWarning):
    """NOG/OLR attached to an optimizer with a per-element adaptive step (Adam & co.).
    Silence with ``warnings.filterwarnings("ignore", category=AdaptiveOptimizerWarning)``."""


def _adaptive_classes() -> tuple[type, ...]:
    names = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")
    return tuple(getattr(torch.optim, n) for n in names if hasattr(torch.optim, n))


#: per-parameter state keys of second-moment (preconditioner) estimates in torch's optimizers
ADAPTIVE_STATE_KEYS = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "exp_inf", "row_var", "col_var", "variance"}
)

_WARNED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def is_adaptive(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor] = ()) -> bool:
    """True for torch's adaptive optimizers (and subclasses), or when the optimizer's state of
    one of ``params`` (or of any parameter, if none given) holds a second-moment estimate."""
    if isinstance(opt, _adaptive_classes()):
        return True
    states = [opt.state.get(p, {}) for p in params] if params else list(opt.state.values())
    return any(isinstance(s, dict) and ADAPTIVE_STATE_KEYS & s.keys() for s in states)


def adaptive_message(opt: torch.optim.Optimizer, nog: bool, olr: bool, olr_example: str | None = None) -> str:
    """The warning text for ``opt`` and the active treatments (``olr_example``: what OLR set)."""
    name = type(opt).__name__
    active = "/".join(t for t, on in (("NOG", nog), ("OLR", olr)) if on)
    parts = [f"orthofx.attach: {active} {'is' if '/' not in active else 'are'} derived for SGD, and {name} "
             "adapts its step per element."]
    if nog:
        parts.append(
            f"NOG replaces each producer gradient by U Vᵀ (all singular values 1, ‖·‖₂ = 1), but {name} "
            "then divides it element-wise by its second-moment estimate (√v̂ + eps), so the step it takes "
            "is no longer orthogonal and its size no longer scales as lr·√min(m, n)."
        )
    if olr:
        what = olr_example or "OLR's η* replaces the producers' lr"
        parts.append(
            f"OLR's η* is the step size of plain SGD's W − η·∂l/∂W and sets the group lr; {name} uses that lr "
            f"for its own preconditioned step, so it is not the optimal step there ({what})."
        )
    parts.append(
        "For the paper's setting use torch.optim.SGD (momentum is fine) or orthofx.optim.OrthoSGD; to keep "
        f"{name}, silence this with warnings.filterwarnings('ignore', category=AdaptiveOptimizerWarning)."
    )
    return " ".join(parts)


def should_warn(opt: torch.optim.Optimizer) -> bool:
    """True the first time for ``opt`` (then remembered: one warning per optimizer)."""
    if opt in _WARNED:
        return False
    _WARNED.add(opt)
    return True
