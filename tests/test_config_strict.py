"""Strict typed configs: OrthoConfig, ExperimentConfig and JSON/TOML loading refuse ill-typed
values with an OrthofxError naming the field and value; "true"/"false" strings are parsed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orthofx.config import OrthoConfig, check_bool, check_int, check_loss_weight
from orthofx.errors import ConfigError, OrthofxError
from orthofx.experiment.train import ExperimentConfig, load_config


# ---------------------------------------------------------------------------- OrthoConfig
def test_from_dict_false_strings_are_false():
    # measured: {"nog": "false", "stabilize": "false"} turned NOG on
    cfg = OrthoConfig.from_dict({"nog": "false", "stabilize": "false", "olr": "TRUE"})
    assert cfg.nog is False and cfg.stabilize is False and cfg.olr is True
    assert cfg.treatments == ("olr",)


@pytest.mark.parametrize("value", ["yes", 1, "0", 0, None, 1.0])
def test_booleans_refuse_everything_but_bool_and_true_false(value):
    with pytest.raises(ConfigError, match="nog"):
        OrthoConfig.from_dict({"nog": value})


def test_ol_weight_string_is_a_config_error_naming_the_field():
    # measured: raw TypeError ("'>=' not supported between str and float")
    with pytest.raises(ConfigError, match="ol_weight='0.1'"):
        OrthoConfig(weight="ol", ol_weight="0.1")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -0.5, True])
def test_ol_weight_must_be_finite_and_non_negative(value):
    # measured: ol_weight=inf accepted
    with pytest.raises(ConfigError, match="ol_weight"):
        OrthoConfig.from_dict({"weight": "ol", "ol_weight": value})


@pytest.mark.parametrize("value", [2.7, True, "2", math.inf, 0])
def test_sn_power_iterations_must_be_an_integer_at_least_one(value):
    with pytest.raises(ConfigError, match="sn_power_iterations"):
        OrthoConfig(weight="sn", sn_method="power", sn_power_iterations=value)


def test_integral_float_is_an_int():
    assert OrthoConfig(sn_power_iterations=3.0).sn_power_iterations == 3
    assert isinstance(OrthoConfig(sn_power_iterations=3.0).sn_power_iterations, int)


def test_unknown_preset_overrides_and_replace_names_are_config_errors():
    with pytest.raises(ConfigError, match="nogg"):
        OrthoConfig.from_preset("nog", nogg=True)
    with pytest.raises(ConfigError, match="olw"):
        OrthoConfig().replace(olw=1)
    with pytest.raises(ConfigError, match="mapping"):
        OrthoConfig.from_dict(["nog"])  # type: ignore[arg-type]


def test_validators():
    assert check_bool(" False ", "x") is False
    assert check_int(4.0, "x", min=1) == 4
    assert check_loss_weight(0, "weight") == 0.0
    with pytest.raises(ConfigError, match=r"weight=-1: must be >= 0"):
        check_loss_weight(-1, "weight")
    with pytest.raises(ConfigError, match="weight"):
        check_loss_weight(math.nan, "weight")


def test_the_loss_weight_check_has_one_name_and_the_old_one_warns():
    """Two check_weights meant two things (a loss multiplier here, a weight tensor in
    orthofx.treatments._common); the config's is check_loss_weight, its old name warns."""
    import orthofx.config as config
    from orthofx.treatments._common import check_weight as tensor_check

    with pytest.warns(DeprecationWarning, match=r"orthofx.config.check_weight is deprecated and will be removed in orthofx 0.3.0; use "
                                                r"orthofx.config.check_loss_weight"):
        old = config.check_weight
    assert old is check_loss_weight and old is not tensor_check
    assert not hasattr(__import__("orthofx.pipeline").pipeline, "check_weight")


# ---------------------------------------------------------------------------- ExperimentConfig
@pytest.mark.parametrize("field", ["progress", "amp", "resume", "download"])
def test_experiment_false_strings_are_false(field):
    # measured: "progress": "false", "amp": "false", "resume": "false" acted as True
    cfg = ExperimentConfig(dataset="synthetic", **{field: "false"})
    assert getattr(cfg, field) is False
    with pytest.raises(ConfigError, match=field):
        ExperimentConfig(dataset="synthetic", **{field: "no"})


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", "0.1"), ("lr", math.nan), ("lr", -1.0), ("momentum", math.inf), ("weight_decay", -1e-4),
        ("gamma", 0.0), ("eps", 0.0), ("epochs", 0), ("epochs", 1.5), ("batch_size", 0), ("batch_size", True),
        ("train_limit", 0), ("test_limit", "10"), ("seed", -1), ("monitor_every", 0), ("num_workers", -1),
        ("milestones", "3"), ("milestones", [1, 2.5]), ("treatment", "bogus"), ("backend", "fast"),
        ("device", "tpu"), ("model", "vgg"), ("dataset", "mnist"), ("out", ""), ("name", 3),
    ],
)
def test_experiment_config_refuses_ill_typed_values(field, value):
    with pytest.raises(OrthofxError, match=field):
        ExperimentConfig(**{"dataset": "synthetic", field: value})


def test_experiment_config_keeps_valid_values():
    cfg = ExperimentConfig(dataset="synthetic", milestones=[2, 3.0], epochs=4.0, eps=1e-3, backend="auto")
    assert cfg.milestones == (2, 3) and cfg.epochs == 4 and isinstance(cfg.epochs, int)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"not valid JSON.*line 1"):
        load_config(_write(tmp_path / "bad.json", '{"epochs": 1,'))
    with pytest.raises(ConfigError, match="top level"):
        load_config(_write(tmp_path / "list.json", "[1, 2]"))
    with pytest.raises(ConfigError, match="lr='0.1'"):
        load_config(_write(tmp_path / "s.json", json.dumps({"dataset": "synthetic", "lr": "0.1"})))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path / "bad.toml", "epochs = = 1"))


def test_load_config_toml_bool_strings(tmp_path):
    cfg = load_config(_write(tmp_path / "c.toml", 'dataset = "synthetic"\nprogress = "false"\nresume = false\n'))
    assert cfg.progress is False and cfg.resume is False


def test_library_errors_are_orthofx_errors() -> None:
    """Diagnosable failures outside the config are OrthofxErrors too (issue 12)."""
    import pytest as _pytest
    import torch as _torch

    from orthofx.errors import OrthofxError
    from orthofx.graph import trace
    from orthofx.linalg.newton_schulz import ns_sqrtm
    from orthofx.nn import StableDecomposition

    with _pytest.raises(OrthofxError):
        trace("not a module")
    with _pytest.raises(OrthofxError):
        StableDecomposition("cholesky", "tensor")
    with _pytest.raises(OrthofxError):
        StableDecomposition.for_target(_torch.linalg.qr)
    with _pytest.raises(OrthofxError):
        ns_sqrtm(_torch.eye(3)[None], iters=0)


# ---------------------------------------------------------------------------- composed OrthoConfig
def test_composed_flat_and_preset_forms_are_one_config():
    from orthofx.config import GradientSpec, WeightSpec

    composed = OrthoConfig(weights=WeightSpec("ow", ow_method="cayley"), gradients=GradientSpec(nog=True, olr=True))
    flat = OrthoConfig(weight="ow", ow_method="cayley", nog=True, olr=True)
    preset = OrthoConfig.from_preset("nog+ow+olr", ow_method="cayley")
    assert composed == flat == preset and hash(composed) == hash(preset)
    assert (flat.weight, flat.ow_method, flat.nog, flat.olr, flat.nog_method) == ("ow", "cayley", True, True, "auto")
    assert flat.weights == WeightSpec("ow", ow_method="cayley") and flat.gradients.nog is True
    with pytest.raises(AttributeError):
        flat.nog = False  # type: ignore[misc]
    assert OrthoConfig.from_dict(flat.to_dict()) == flat
    assert set(flat.to_dict()) == {"weights", "gradients", "analysis", "stabilize", "inplace", "preset"}
    assert flat.replace(olr=False) == OrthoConfig(weight="ow", nog=True)  # cayley: the default map (vocab)
    assert flat.replace(ow_method="expm") != flat


def test_from_dict_reads_the_flat_form_of_older_plans():
    old = {"weight": "sn", "ow_method": "expm", "ol_weight": 0.01, "sn_method": "power", "sn_power_iterations": 2,
           "nog": True, "nog_method": "svd", "olr": False, "stabilize": True, "inplace": False, "analysis": None,
           "preset": "nog+sn"}
    cfg = OrthoConfig.from_dict(old)
    assert cfg == OrthoConfig.from_preset("nog+sn", sn_method="power", sn_power_iterations=2, nog_method="svd",
                                        ow_method="expm")  # a stored plan keeps the map it named


@pytest.mark.parametrize("bad, key", [({"nogg": True}, "nogg"), ({"weights": {"kind": "ow", "method": "x"}}, "method"),
                                      ({"gradients": {"nog": True, "lr": 1}}, "lr")])
def test_from_dict_is_strict_naming_the_key_and_the_allowed_keys(bad, key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*allowed keys: .*(nog_method|ow_method)"):
        OrthoConfig.from_dict(bad)


def test_flat_fields_refine_their_section_so_dataclasses_replace_works():
    import dataclasses

    from orthofx.config import WeightSpec

    assert OrthoConfig(ow_method="cayley", weights=WeightSpec("ow")) == OrthoConfig(weight="ow", ow_method="cayley")
    cfg = dataclasses.replace(OrthoConfig.from_preset("sn"), sn_method="power", nog=True)
    assert (cfg.weight, cfg.sn_method, cfg.nog) == ("sn", "power", True)
    with pytest.raises(ConfigError, match="sn_method"):
        dataclasses.replace(cfg, sn_method="exactly")


def test_analysis_is_typed():
    from orthofx.graph import AnalysisConfig

    cfg = OrthoConfig.from_dict({"analysis": {"leaf_modules": ["head"]}})
    assert cfg.analysis == AnalysisConfig(leaf_modules=("head",))
    with pytest.raises(ConfigError, match="analysis"):
        OrthoConfig(analysis=3)  # type: ignore[arg-type]


def test_ow_target_travels_as_one_typed_spec_checked_and_defaulted_once(monkeypatch):
    """Issue 24: ow_target is a GradientSpec field, checked and defaulted there (None from older
    configs reads as the default); orthofx.attach hands the treatments the producers' spec
    itself, not an OrthoConfig plus keywords to re-check and re-default."""
    import torch

    import orthofx
    import orthofx.pipeline as pipeline
    from orthofx.config import GradientSpec
    from orthofx.errors import OptionError

    with pytest.raises(OptionError, match="ow_target='bias': must be one of 'weight', 'generator'"):
        OrthoConfig(ow_target="bias")
    assert GradientSpec().ow_target == GradientSpec(ow_target=None).ow_target == "generator"
    assert OrthoConfig.from_dict({"gradients": {"nog": True, "ow_target": None}}).ow_target == "generator"
    seen: list = []
    monkeypatch.setattr(pipeline, "_attach_params", lambda opt, specs, spec, **kw: seen.append((spec, kw)) or "h")

    class Cov(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            f = self.lin(x)
            return torch.linalg.eigvalsh(f.T @ f / x.shape[0] + 1e-3 * torch.eye(3))

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for target, want in ((None, "generator"), ("weight", "weight")):
        gm, _ = orthofx.transform(Cov(), (x,), OrthoConfig.from_preset("nog+ow", ow_target=target))
        assert orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm) == "h"
        spec, kw = seen[-1]
        assert type(spec) is GradientSpec and (spec.nog, spec.ow_target) == (True, want) and kw == {}
    # a spec field given to orthofx.attach replaces the plan's value inside the spec
    orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm, ow_target="generator", lr_mode="float")
    spec, kw = seen[-1]
    assert spec.ow_target == "generator" and kw == {"lr_mode": "float"}



def test_the_spec_is_checked_where_it_is_made_not_again_on_the_road(monkeypatch):
    """From the transformed model to the installed chain (orthofx.attach, OrthoSGD) the plan's
    GradientSpec is handed on as it is: no option is checked or defaulted a second time."""
    import torch

    import orthofx
    import orthofx.specs as specs
    from orthofx.optim import OrthoSGD

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(4))
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    gm, _ = orthofx.transform(model, (x,), OrthoConfig.from_preset("nog+ow+olr", nog_method="svd"))
    calls: list[str] = []
    for name in ("check_bool", "check_choice"):
        real = getattr(specs, name)
        monkeypatch.setattr(specs, name, lambda v, n, *a, _real=real, **k: calls.append(n) or _real(v, n, *a, **k))
    h = orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm)
    opt = OrthoSGD(gm, lr=0.1)
    assert calls == []
    assert h.spec is opt.handle.spec is orthofx.pipeline.plan_of(gm).producers[0].config.gradients
    orthofx.attach(torch.optim.SGD(gm.parameters(), lr=0.1), gm, nog_method="eigh")
    assert "nog_method" in calls  # a field given on the way is checked, by the spec
