"""The options both framework callbacks share (integrations._common.CallbackOptions): checked
the same way in Lightning's OrthofxCallback and the Hugging Face OrthofxTrainerCallback, and a
monitor built with the callback's sinks in both."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ConfigError
from orthofx.nn import CovariancePooling

L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from orthofx.integrations.huggingface import OrthofxTrainerCallback  # noqa: E402
from orthofx.integrations.lightning import OrthofxCallback  # noqa: E402

CALLBACKS = [OrthofxCallback, OrthofxTrainerCallback]


@pytest.mark.parametrize("cls", CALLBACKS)
@pytest.mark.parametrize("kwargs, match", [
    ({"example_inputs": torch.zeros(1), "example_input_fn": lambda m: torch.zeros(1)}, "not both"),
    ({"every": 0}, "every"),
    ({"prefix": 3}, "prefix"),
    ({"attach_options": ["lr_mode"]}, "attach_options"),
])
def test_bad_options_are_refused_before_any_work(cls: Any, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cls("nog+ow", **kwargs)


@pytest.mark.parametrize("cls", CALLBACKS)
def test_monitor_gets_the_callbacks_sinks(cls: Any) -> None:
    seen: list[tuple[dict, int]] = []
    net = nn.Sequential(nn.Conv2d(1, 6, 3), CovariancePooling(6, reduced=4), nn.Linear(10, 3))
    gm, _ = orthofx.transform(net, (torch.randn(4, 1, 8, 8),), config="nog")
    cb = cls("nog", sinks=[lambda metrics, step: seen.append((dict(metrics), step))])
    mon = cb._make_monitor(gm, 1)
    assert mon is not None
    gm(torch.randn(4, 1, 8, 8))
    mon.step()
    mon.flush()
    assert seen and any(k.startswith("kappa") for k in seen[-1][0]), seen


@pytest.mark.parametrize("cls", CALLBACKS)
def test_no_monitor_when_asked_for_none_or_nothing_to_watch(cls: Any) -> None:
    gm, _ = orthofx.transform(nn.Sequential(nn.Linear(3, 3)), (torch.randn(2, 3),), config="nog")
    assert cls("nog", monitor=False)._make_monitor(gm, 1) is None
    # no meta-layer: the monitor finds so at the first training forward and says why in a
    # visible warning (issue 21), not a log line
    from orthofx.monitor import MonitorWarning

    mon = cls("nog")._make_monitor(gm, 1)
    with pytest.warns(MonitorWarning, match="nothing to monitor"):
        gm.train()(torch.randn(2, 3))
    assert mon.layer_names == [] and mon.empty_reason
