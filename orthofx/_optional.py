"""Optional dependencies: import one, or say which extra installs it.

The core of orthofx needs only ``torch``, ``networkx`` and ``numpy``. Everything else lives behind an
extra of the package (``pip install 'orthofx[plot]'`` ...); :func:`require` is the one place
that imports such a package and, when it is missing, raises :class:`MissingExtraError` naming
the extra::

    plt = require("matplotlib.pyplot", "plot", purpose="ConditioningMonitor.plot")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from orthofx.errors import OrthofxError

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: top-level package -> the extra of orthofx that installs it (used when no extra is given)
EXTRAS: dict[str, str] = {
    "torchvision": "cli",
    "tqdm": "cli",
    "matplotlib": "plot",
    "tensorboard": "tensorboard",
    "lightning": "lightning",
    "transformers": "hf",
    "accelerate": "hf",
    "timm": "timm",
    "hypothesis": "test",
    "scipy": "test",
    "pdoc": "docs",
}


class MissingExtraError(OrthofxError, ImportError):
    """An optional package is not installed; the message names the extra that installs it.

    Attributes:
        module: the module that was imported (``"matplotlib.pyplot"``).
        extra: the orthofx extra that provides it (``"plot"``).
        purpose: what needed it, or ``None``.
    """

    def __init__(self, module: str, extra: str, purpose: str | None = None, cause: BaseException | None = None):
        what = f"{purpose} needs {module!r}" if purpose else f"{module!r} is needed here"
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(
            f"{what}, which is not installed{detail}. Install it with: pip install 'orthofx[{extra}]'",
            name=module,
        )
        self.module = module
        self.extra = extra
        self.purpose = purpose


def require(module: str, extra: str | None = None, *, purpose: str | None = None) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingExtraError` naming ``extra``.

    ``extra`` defaults to :data:`EXTRAS` of the module's top-level package. An ``ImportError``
    raised while importing (the package, or one of its own dependencies, is missing) becomes a
    :class:`MissingExtraError` that keeps the original message; other exceptions propagate.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        chosen = extra if extra is not None else EXTRAS.get(top, "all")
        raise MissingExtraError(module, chosen, purpose, cause=e) from e
