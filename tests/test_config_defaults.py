"""The defaults follow the evidence: the integrations' callbacks and the README's first example
use ``orthofx.config.DEFAULT_PRESET`` ("svd": stable gradients, report and κ, no weight
changed), and that default leaves every weight of the model as it was."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import orthofx
from orthofx.config import DEFAULT_PRESET, PRESETS


def test_default_preset_is_a_preset_and_is_svd() -> None:
    assert DEFAULT_PRESET in PRESETS and DEFAULT_PRESET == "svd"


@pytest.mark.parametrize("where", ["lightning", "huggingface"])
def test_callbacks_default_to_the_default_preset(where: str) -> None:
    if where == "lightning":
        pytest.importorskip("lightning")
        from orthofx.integrations.lightning import OrthofxCallback as cb
    else:
        pytest.importorskip("transformers")
        from orthofx.integrations.huggingface import OrthofxTrainerCallback as cb
    assert inspect.signature(cb).parameters["config"].default == DEFAULT_PRESET


def test_readme_first_example_uses_the_default_preset() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = re.search(r"orthofx\.transform\(model, \(x,\), config=\"([^\"]+)\"\)", text)
    assert first is not None and first.group(1) == DEFAULT_PRESET


def test_the_default_changes_no_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(16, 3, 6, 6)
    gm, report = orthofx.transform(model, (x,), config=DEFAULT_PRESET)
    assert report.producers  # the Pre-SVD layer is found and reported
    sd, gsd = model.state_dict(), gm.state_dict()
    assert sd.keys() == gsd.keys() and all(torch.equal(sd[k], gsd[k]) for k in sd)
