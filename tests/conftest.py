"""Shared pytest configuration.

* ``device`` fixture: "cpu", plus "cuda" when ``torch.cuda.is_available()``.
* Hypothesis profiles: "ci" (derandomized, no deadline, 30 examples; the default) and "slow"
  (500 examples), chosen by the environment variable ``HYPOTHESIS_PROFILE``.
* TF32 is turned off so float32 matmuls on Ampere+ GPUs keep float32 accuracy.
* Under pytest-xdist (``make test`` runs ``-n 2``) each worker uses one intra-op thread, so two
  workers do not oversubscribe the cores.
* ``SLOW_ELSEWHERE``: slow tests in files whose owners have not marked them yet get the
  ``slow`` marker here (``make test`` leaves them out, ``make test-all`` runs them).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30)
settings.register_profile("slow", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

_DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    _DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """A torch.device to run on: cpu, and cuda when available."""
    return torch.device(request.param)
