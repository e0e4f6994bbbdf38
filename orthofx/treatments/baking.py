"""Export of the weight treatments: replace a parametrization by the plain weight it computes.

* :func:`bake` — ``module.<name>`` becomes its current parametrized value (same Parameter
  object, original state-dict key);
* :func:`bake_all` — every OW/SN of a model (what ``orthofx.strip`` runs);
* :func:`plain_state_dict` — the state dict :func:`bake_all` would give, without mutating the
  model.

An OW method whose parametrized value is not the layer's weight (``"soc"``: the generator of
an operator; :attr:`OWMethodSpec.bakeable <orthofx.treatments.weight.OWMethodSpec>` is False)
is refused with :class:`~orthofx.errors.TreatmentError` before anything changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from orthofx.errors import TreatmentError
from orthofx.treatments.flat_ow import FlatOrthogonal
from orthofx.treatments.weight import OW_METHODS, _existing, _label, treatment_of

__all__ = ["bake", "bake_all", "plain_state_dict"]


def _unbakeable(module: nn.Module, name: str, label: str, what: str) -> None:
    """Raise TreatmentError if ``module.<name>`` carries an OW method that cannot be baked."""
    for p in _existing(module, name):
        if isinstance(p, FlatOrthogonal) and not OW_METHODS[p.method].bakeable:
            spec = OW_METHODS[p.method]
            raise TreatmentError(
                f"{what}: {label} carries OW method {p.method!r} ({spec.summary}). {spec.why_not_bakeable} "
                "Keep the transformed model (it runs, trains and exports as it is) and use "
                "save_checkpoint/load_checkpoint to store it"
            )




def bake(module: nn.Module, name: str = "weight", *, qualname: str | None = None) -> bool:
    """Replace the parametrization of ``module.<name>`` by its current value.

    ``parametrize.remove_parametrizations(module, name, leave_parametrized=True)``: the
    Parameter object that was ``parametrizations.<name>.original`` becomes ``module.<name>``
    again holding the parametrized value (so the state-dict key is ``<name>`` again and
    optimizers still hold the same object). Returns ``False`` if there was nothing to bake.
    Raises :class:`TreatmentError` (module unchanged) for an OW method that is not a weight
    (``"soc"``: see :class:`~orthofx.treatments.soc.SOCOrthogonal`).
    """
    if not parametrize.is_parametrized(module, name):
        return False
    _unbakeable(module, name, _label(module, name, qualname), "bake")
    _private_class(module)
    with torch.no_grad():
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return True


def _private_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its parametrized class.

    ``parametrize`` injects one class per module, but ``copy.deepcopy`` of a parametrized
    module keeps that class object, so the original and the copy share it, and
    ``remove_parametrizations`` deletes the tensor's property *from the class*: baking a deep
    copy would break the original (torch behaviour, reproduced in tests/test_transform.py).
    A sibling class with the same attributes makes the removal local to ``module``.
    """
    cls = type(module)
    attrs = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, attrs)


def bake_all(model: nn.Module, *, only_orthofx: bool = True) -> list[str]:
    """:func:`bake` every parametrized tensor in ``model`` (by default only OW/SN made by
    orthofx or torch's spectral norm); returns the qualified names baked. An OW that cannot
    be baked (``"soc"``) raises :class:`TreatmentError` before anything is baked."""
    todo: list[tuple[str, nn.Module, str]] = []
    for qn, m in list(model.named_modules()):
        if not parametrize.is_parametrized(m):
            continue
        for tname in list(m.parametrizations.keys()):
            if only_orthofx and treatment_of(m, tname) not in ("ow", "sn"):
                continue
            todo.append((f"{qn}.{tname}" if qn else tname, m, tname))
    for full, m, tname in todo:
        _unbakeable(m, tname, full, "bake/strip")
    for full, m, tname in todo:
        bake(m, tname, qualname=full.rpartition(".")[0] or None)
    return [full for full, _, _ in todo]


def plain_state_dict(model: nn.Module, *, keep_vars: bool = False) -> dict[str, Tensor]:
    """``model.state_dict()`` with every parametrized tensor replaced by its value under its
    original key (``conv.weight``) and the ``parametrizations.*`` entries (``original``,
    ``0.base``, SN's ``_u``/``_v``) dropped — what :func:`bake_all` would give, without
    mutating ``model``. Note that ``original`` of OW is the generator A, not the weight, so
    keys must never be renamed without computing the value. An OW that cannot be baked
    (``"soc"``, whose ``weight`` is the generator of an operator) raises
    :class:`TreatmentError`."""
    for qn, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for tname in m.parametrizations.keys():
                _unbakeable(m, tname, f"{qn}.{tname}" if qn else tname, "plain_state_dict")
    sd = model.state_dict(keep_vars=keep_vars)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if ".parametrizations." in f".{k}":
            continue
        out[k] = v
    for qn, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for tname in m.parametrizations.keys():
            with torch.no_grad():
                val = getattr(m, tname)
            out[f"{qn}.{tname}" if qn else tname] = val if keep_vars else val.detach()
    return out
