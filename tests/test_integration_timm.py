"""timm entries for the paper's architectures (orthofx.integrations.timm) and orthofx.models."""

from __future__ import annotations

import sys

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")

import orthofx  # noqa: E402
from orthofx.errors import ConfigError  # noqa: E402
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm  # noqa: E402


def test_import_orthofx_does_not_register() -> None:
    # a fresh interpreter: ``import orthofx`` (and orthofx.models) leaves timm's registry alone
    import subprocess

    code = ("import sys, orthofx, orthofx.models, orthofx.integrations; orthofx.models.resnet18_gcp; "
            "bad = [m for m in ('timm', 'orthofx.integrations.timm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_create_model_resnet18_gcp(device: torch.device) -> None:
    import orthofx.integrations.timm  # noqa: F401  (registers)

    assert set(timm.list_models("orthofx_*")) == {"orthofx_resnet18_gcp", "orthofx_resnet50_dbn"}
    torch.manual_seed(0)
    m = timm.create_model("orthofx_resnet18_gcp", num_classes=5, in_chans=1, reduced=8).to(device)
    assert isinstance(m.avgpool, CovariancePooling) and m.conv1.in_channels == 1
    # the same model as the public builder (same seed, same parameters)
    torch.manual_seed(0)
    ref = orthofx.models.resnet18_gcp(5, reduced=8, in_channels=1)
    assert m.state_dict().keys() == ref.state_dict().keys()
    for (n, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a.cpu(), b), n
    y = m(torch.randn(2, 1, 32, 32, device=device))
    assert y.shape == (2, 5) and torch.isfinite(y).all()


@pytest.mark.slow  # a full ResNet-50
def test_create_model_resnet50_dbn_and_analysis() -> None:
    import orthofx.integrations.timm  # noqa: F401

    m = timm.create_model("orthofx_resnet50_dbn", num_classes=3)
    assert isinstance(m.bn1, DecorrelatedBatchNorm)
    report = orthofx.analyze(m, (torch.randn(2, 3, 8, 8),))
    assert report.producers == ["conv1"]


def test_create_model_refuses_pretrained_and_unknown_arguments() -> None:
    import orthofx.integrations.timm  # noqa: F401

    with pytest.raises(ConfigError, match="pretrained"):
        timm.create_model("orthofx_resnet18_gcp", pretrained=True)
    with pytest.raises(ConfigError, match="drop_rate"):
        timm.create_model("orthofx_resnet18_gcp", drop_rate=0.1)
