"""orthofx: find SVD meta-layers and their Pre-SVD layers, and improve covariance conditioning.

See README.md. The public API is re-exported here as the subpackages land.
"""

from __future__ import annotations

from orthofx import errors, linalg  # noqa: F401
from orthofx.errors import *  # noqa: F401,F403

__version__ = "0.1.0"
