"""The orthofx library logger.

Every orthofx module logs through ``logging.getLogger("orthofx")`` (or a child,
``logging.getLogger("orthofx.<module>")``). Per the library convention a
:class:`logging.NullHandler` is attached, so nothing is printed unless the application
configures logging (``logging.basicConfig(level=logging.INFO)``, or a handler on the
``"orthofx"`` logger).
"""

from __future__ import annotations

import logging

__all__ = ["logger", "LOGGER_NAME"]

LOGGER_NAME = "orthofx"

logger: logging.Logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())
