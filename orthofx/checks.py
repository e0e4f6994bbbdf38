"""The option validators: every check of a user-given value (config fields, experiment options,
CLI flags, treatment arguments) goes through one of these, so every failure is an
:class:`~orthofx.errors.OptionError` (a ConfigError) naming the option and the value.

Booleans accept bool and the strings ``"true"``/``"false"`` (any case); numbers accept
int/float only (never bool, never strings: a quoted number in a JSON/TOML file is refused with
the option named); choices accept their values and str-enum members (stored as the plain
value). This module imports nothing of orthofx but :mod:`orthofx.errors`, so any layer may use it.
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Any

from orthofx.errors import OptionError

__all__ = ["check_bool", "check_float", "check_int", "check_choice", "check_loss_weight"]


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: ``True``/``False`` or the strings ``"true"``/``"false"`` (any
    case, surrounding blanks ignored); anything else (``"yes"``, ``1``, ``"0"``, None)
    raises :class:`OptionError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise OptionError(name, value, "must be a boolean (true or false)")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_float(
    value: Any,
    name: str,
    *,
    min: float | None = None,
    min_inclusive: bool = True,
    max: float | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float in ``[min, max]`` (``(min, max]`` when not
    ``min_inclusive``); ``None`` passes when ``optional``. Strings, bools, NaN and ±inf
    raise :class:`OptionError`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        raise OptionError(name, value, "must be a number, not a string (write it without quotes)")
    if not _is_number(value):
        raise OptionError(name, value, "must be a number")
    v = float(value)
    if not math.isfinite(v):
        raise OptionError(name, value, "must be finite")
    if min is not None and (v < min or (v == min and not min_inclusive)):
        raise OptionError(name, value, f"must be {'>=' if min_inclusive else '>'} {min:g}")
    if max is not None and v > max:
        raise OptionError(name, value, f"must be <= {max:g}")
    return v


def check_int(
    value: Any, name: str, *, min: int | None = None, max: int | None = None, optional: bool = False
) -> int | None:
    """``value`` as an int in ``[min, max]``; an integral float (``2.0``) is accepted,
    ``2.7``, bools, strings and non-finite values raise :class:`OptionError`. ``None`` passes
    when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        raise OptionError(name, value, "must be an integer, not a string (write it without quotes)")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        v = int(value)
    elif _is_number(value) and math.isfinite(float(value)) and float(value).is_integer():
        v = int(value)
    else:
        raise OptionError(name, value, "must be an integer")
    if min is not None and v < min:
        raise OptionError(name, value, f"must be >= {min}")
    if max is not None and v > max:
        raise OptionError(name, value, f"must be <= {max}")
    return v


def check_choice(value: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices`` (compared by equality, type included; an Enum
    member is read as its value, so ``vocab.NOGScale.UNIT`` gives ``"unit"``), else
    :class:`OptionError` listing them."""
    if isinstance(value, Enum):
        value = value.value
    if not any(type(value) is type(c) and value == c for c in choices):
        raise OptionError(name, value, f"must be one of {', '.join(map(repr, choices))}")
    return value


def check_loss_weight(value: Any, name: str = "weight") -> float:
    """A loss multiplier λ: a finite float ≥ 0 (``orthogonality_loss(gm, weight=...)``,
    ``ol_weight``); raises :class:`OptionError` otherwise. (Not to be confused with
    ``orthofx.treatments._common.check_weight``, which checks a weight *tensor*.)"""
    return check_float(value, name, min=0.0)  # type: ignore[return-value]
