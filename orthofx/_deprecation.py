"""One way to say a name is going: a DeprecationWarning naming the release that removes it."""

from __future__ import annotations

import warnings

__all__ = ["REMOVED_IN", "warn_deprecated"]

#: the release that removes every name deprecated in 0.2 (CHANGELOG.md, "Deprecated")
REMOVED_IN = "0.3.0"


def warn_deprecated(old: str, use: str, *, stacklevel: int = 1) -> None:
    """Warn ``"<old> is deprecated and will be removed in orthofx 0.3.0; use <use>"``.

    ``stacklevel`` counts from the caller of this function (1: the line that called it; 2: its
    caller, which is where a module ``__getattr__``'s user wrote the old name)."""
    warnings.warn(f"{old} is deprecated and will be removed in orthofx {REMOVED_IN}; use {use}",
                  DeprecationWarning, stacklevel=stacklevel + 1)
