r"""Saved state of a flat OW map (:class:`~orthofx.treatments.flat_ow.FlatOrthogonal`) across
orthofx versions: what ``load_state_dict`` converts, warns about or refuses.

The state of an OW weight is its generator ``A`` (``...parametrizations.<name>.original``), the
base ``Y₀`` (``...<name>.0.base``) and, since 2026-12-07, the map that turns them into ``W``
(``...<name>.0.map_id``: 1 = ``"expm"``, 2 = ``"cayley"``). Its ``ParametrizationList`` writes
state-dict version :data:`STATE_VERSION`; a ``load_state_dict`` pre-hook reads older state:

* **version 1** (before the square layout; only square weights differ): ``original`` held the
  tall ``a`` with ``W = f(aY₀ᵀ − Y₀aᵀ)Y₀``; it is converted to ``B = Y₀ᵀa`` (and the normalised
  generator's power vector ``v ← Y₀ᵀv``), in float64, so the loaded module computes the same
  ``W``. A warning says that optimizer state kept for ``A`` is not converted.
* **no ``map_id``** (saved before the map was recorded, when OW's default map was the
  exponential): loaded as this module's map; when that is not ``"expm"`` a warning says that
  a model trained with the then-default map needs ``ow_method="expm"`` to get its weights back.
* **another ``map_id``**: :class:`~orthofx.errors.ConfigError` naming both maps and what to do —
  the same generator gives another weight under the other map (``cay(S) = exp(S)`` only to
  second order), so loading it would silently change the model.

A state dict without version metadata (built by hand, or through a format that drops it) is
taken as current. :func:`orthofx.load_checkpoint` rebuilds the model with the plan it saved,
so its map always matches.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from orthofx.errors import ConfigError
from orthofx.treatments.flat_ow import MAP_IDS, FlatOrthogonal

__all__ = ["STATE_VERSION", "SQUARE_LAYOUT_VERSION", "install_state_migration"]

#: state-dict version of the ``ParametrizationList`` of a square FlatOrthogonal whose
#: ``original`` holds ``B`` (``W = Y₀ f(B − Bᵀ)``); version 1 held the tall ``a``
SQUARE_LAYOUT_VERSION = 2
#: the version written now: the square layout and the ``map_id`` record
STATE_VERSION = 3
_MAP_NAMES = {v: k for k, v in MAP_IDS.items()}


def install_state_migration(plist: nn.Module) -> None:
    """Let ``plist`` (the ``ParametrizationList`` of a :class:`FlatOrthogonal`) load state saved
    by earlier orthofx versions, as the module docstring describes: its state-dict version
    becomes :data:`STATE_VERSION` and two ``load_state_dict`` pre-hooks read older state."""
    p = plist[0] if len(plist) else None  # type: ignore[arg-type]
    if not isinstance(p, FlatOrthogonal) or "map_id" not in p._buffers:
        return  # SOC (no matrix map), or an instance pickled before the record existed
    plist._version = STATE_VERSION
    if p.square_direct:
        plist.register_load_state_dict_pre_hook(_migrate_square_state)
    plist.register_load_state_dict_pre_hook(_check_map)


def _migrate_square_state(plist: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                          *_: object) -> None:
    """Version-1 state of a square FlatOrthogonal → the square layout (module docstring)."""
    p = plist[0]  # type: ignore[index]
    version = local_metadata.get("version")
    key_a, key_y, key_v = prefix + "original", prefix + "0.base", prefix + "0._v"
    if version is None or version >= SQUARE_LAYOUT_VERSION or key_a not in state_dict or key_y not in state_dict:
        return
    A, Y0 = state_dict[key_a], state_dict[key_y]
    if tuple(A.shape) != tuple(p.shape) or tuple(Y0.shape) != (p.n_big, p.k):
        return  # load_state_dict reports the mismatch itself
    with torch.no_grad():
        Yd = Y0.to(torch.float64)
        state_dict[key_a] = p._from_tall(Yd.mT @ p._to_tall(A.to(torch.float64))).to(A.dtype)
        if p.generator == "normalized" and key_v in state_dict:
            state_dict[key_v] = (Yd.mT @ state_dict[key_v].to(torch.float64)).to(state_dict[key_v].dtype)
    warnings.warn(
        f"OW {prefix}0 ({p.extra_repr()}): converted a generator saved before the square layout "
        "(state version 1, W = f(aY₀ᵀ − Y₀aᵀ)Y₀) to the current one (B = Y₀ᵀa, W = Y₀ f(B − Bᵀ)); "
        "the weight is unchanged. Optimizer state kept for this generator (momentum, Adam moments) "
        "is in the old coordinates and is not converted",
        UserWarning,
        stacklevel=2,
    )


def _check_map(plist: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *_: object) -> None:
    """Refuse state of the other map; fill in (and warn about) state saved before the record."""
    p = plist[0]  # type: ignore[index]
    key, own = prefix + "0.map_id", MAP_IDS[str(p.method)]
    if key not in state_dict:
        if prefix + "original" not in state_dict:
            return  # not this module's state (a partial load reports its own missing keys)
        state_dict[key] = torch.tensor(own, dtype=torch.uint8)
        if p.method != "expm":
            warnings.warn(
                f"OW {prefix}0: this state was saved before orthofx recorded OW's map (before "
                f"2026-12-07, when the default map was the exponential); it is loaded as "
                f"{p.method!r}. If it was trained with the default of that time, transform with "
                "ow_method='expm' (OrthoConfig.from_preset('ow', ow_method='expm')) to get its "
                "weights back: the same generator gives another weight under each map",
                UserWarning,
                stacklevel=2,
            )
        return
    saved = int(state_dict[key])  # load time only: one host read per OW weight
    if saved != own:
        name = _MAP_NAMES.get(saved)
        if name is None:
            raise ConfigError(f"OW {prefix}0: the state's map_id {saved} is none of orthofx's maps {MAP_IDS}; "
                              "it is not loaded")
        raise ConfigError(
            f"OW {prefix}0: the state was saved with ow_method={name!r}, this module uses "
            f"ow_method={p.method!r}; the same generator gives another weight under each map, so "
            f"it is not loaded. Transform with ow_method={name!r} (e.g. "
            f"OrthoConfig.from_preset('ow', ow_method={name!r})), or use orthofx.load_checkpoint, "
            "which rebuilds the model with the plan it saved"
        )
