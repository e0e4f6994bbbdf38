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

# Exact node ids of slow tests (each took 5-21 s of CPU in issue 24's timing run) in files that
# other work was editing; move each marker into its file (and drop it here) when it is next touched.
SLOW_ELSEWHERE = frozenset({
    "tests/test_linalg_expm.py::test_gradcheck[True]",
    "tests/test_graph_analysis_generated.py::test_analyze_leaves_model_untouched",
    "tests/test_realcode_torchvision.py::test_corpus_models_run_and_trace_faithfully[vgg11_svd_pooling]",
    "tests/test_realcode_torchvision.py::test_corpus_models_run_and_trace_faithfully[mobilenet_v3_gcp]",
    "tests/test_realcode_extra.py::test_transform_attach_train_strip[gw_mlp_deep]",
    "tests/test_realcode_extra.py::test_svd_config_keeps_outputs[gw_mlp_deep]",
    "tests/test_realcode_extra.py::test_export_stripped_model[gw_mlp_deep]",
    "tests/test_realcode_extra.py::test_transform_keeps_buffers[svd-gw_mlp_deep]",
    "tests/test_realcode_extra.py::test_transform_keeps_buffers[nog+ow+olr-gw_mlp_deep]",
})


@pytest.hookimpl(tryfirst=True)  # before ``-m "not slow"`` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests named in ``SLOW_ELSEWHERE`` slow."""
    for item in items:
        if item.nodeid in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)


_DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    _DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """A torch.device to run on: cpu, and cuda when available."""
    return torch.device(request.param)
