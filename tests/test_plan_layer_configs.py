"""Per-layer choice (issue 21 item 2): ignored_scope and layer_configs decide per Pre-SVD
layer in the plan, which apply_plan, attach, orthogonality_loss and replay read."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import orthofx
from orthofx import OrthoConfig
from orthofx.errors import ConfigError
from orthofx.pipeline import plan_of


def _two() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


X = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_ignored_scope_and_layer_configs_are_honoured() -> None:
    model = _two()
    cfg = OrthoConfig.from_preset("nog+olr", ignored_scope=["0"], layer_configs={"3": "ow"})
    gm, report = orthofx.transform(model, (X,), config=cfg)
    by = {p.name: p for p in report.plan.producers}
    assert by["0"].ignored and by["0"].treatments == []
    assert by["3"].treatments == ["ow"] and by["3"].config.weight == "ow"
    assert parametrize.is_parametrized(gm[3], "weight") and not parametrize.is_parametrized(gm[0], "weight")
    assert not parametrize.is_parametrized(model[3], "weight")  # the user's model untouched
    # neither layer has NOG/OLR: nothing to attach
    h = orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)
    assert h is None or not (h.nog or h.olr)


def test_attach_follows_the_layer_configs() -> None:
    gm, _ = orthofx.transform(_two(), (X,), config=OrthoConfig(layer_configs={"3": "nog"}))
    handle = orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)
    assert handle is not None and list(handle.names) == ["3.weight"] and handle.nog


def test_mixed_gradient_options_are_refused() -> None:
    cfg = OrthoConfig(layer_configs={"0": OrthoConfig(nog=True, nog_method="svd"), "3": "nog"})
    gm, _ = orthofx.transform(_two(), (X,), config=cfg)
    with pytest.raises(ConfigError, match="nog_method"):
        orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)


def test_orthogonality_loss_per_layer() -> None:
    gm, _ = orthofx.transform(_two(), (X,), config=OrthoConfig(layer_configs={"0": OrthoConfig(weight="ol", ol_weight=1.0)}))
    w = gm[0].weight.reshape(8, -1)
    torch.testing.assert_close(orthofx.orthogonality_loss(gm), torch.linalg.matrix_norm(w @ w.T - torch.eye(8)))


@pytest.mark.parametrize("field", ["ignored_scope", "layer_configs"])
def test_an_entry_matching_nothing_is_a_config_error(field: str) -> None:
    value = ["nope.*"] if field == "ignored_scope" else {"nope.*": "ow"}
    with pytest.raises(ConfigError, match="nope"):
        orthofx.transform(_two(), (X,), config=OrthoConfig(**{field: value}))


def test_plan_round_trips_and_replay_restores_the_choice() -> None:
    cfg = OrthoConfig(ignored_scope=["0"], layer_configs={"3": "sn"})
    gm, report = orthofx.transform(_two(), (X,), config=cfg)
    d = report.plan.to_dict()
    assert d["producers"][0]["ignored"] is True and d["producers"][1]["config"]["weights"]["kind"] == "sn"
    assert d["config"]["ignored_scope"] == ["0"]
    back = orthofx.load_checkpoint(_two(), orthofx.export.checkpoint(gm))
    assert parametrize.is_parametrized(back[3], "weight") and not parametrize.is_parametrized(back[0], "weight")
    assert plan_of(back).to_dict()["producers"] == d["producers"]
    # an older plan (no per-layer fields) still loads
    old = orthofx.plan.Plan.from_dict({"config": {"weight": "ow"}, "producers": [{k: v for k, v in d["producers"][1].items() if k != "config"}]})
    assert old.producers[0].config.weight == "ow"
