"""timm model entries for the paper's architectures.

Importing this module registers, with ``timm.create_model``:

* ``orthofx_resnet18_gcp`` → :func:`orthofx.models.resnet18_gcp` (ResNet-18, global covariance
  pooling with a matrix square root);
* ``orthofx_resnet50_dbn`` → :func:`orthofx.models.resnet50_dbn` (CIFAR-stem ResNet-50 with
  ZCA-whitening stem).

``import orthofx`` does not import timm; do ``import orthofx.integrations.timm`` first::

    import timm, orthofx.integrations.timm
    model = timm.create_model("orthofx_resnet18_gcp", num_classes=100, in_chans=3)

timm's ``num_classes`` and ``in_chans`` are honoured; other keyword arguments go to the builder
(``reduced``, ``backend``, ``eps``). There are no pretrained weights: ``pretrained=True``
raises :class:`~orthofx.errors.ConfigError`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from orthofx import models as _models
from orthofx._optional import require
from orthofx.errors import ConfigError

_timm_models = require("timm.models", "timm", purpose="orthofx.integrations.timm")

__all__ = ["orthofx_resnet18_gcp", "orthofx_resnet50_dbn", "MODEL_NAMES"]

#: the names this module registers with timm
MODEL_NAMES = ("orthofx_resnet18_gcp", "orthofx_resnet50_dbn")

# what timm.create_model passes to every entry point; meaningless without pretrained weights
_TIMM_KEYS = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def _builder_kwargs(name: str, builder: Any, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrained:
        raise ConfigError(f"{name}: orthofx publishes no pretrained weights; use pretrained=False")
    if "in_chans" in kwargs:
        kwargs["in_channels"] = kwargs.pop("in_chans")
    accepted = set(inspect.signature(builder).parameters)
    out = {}
    for key, value in kwargs.items():
        if key in accepted:
            out[key] = value
        elif key not in _TIMM_KEYS and value is not None:
            raise ConfigError(f"{name}: unsupported argument {key}={value!r} (accepted: {sorted(accepted)})")
    return out


@_timm_models.register_model
def orthofx_resnet18_gcp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry of :func:`orthofx.models.resnet18_gcp` (default 1000 classes)."""
    return _models.resnet18_gcp(**_builder_kwargs("orthofx_resnet18_gcp", _models.resnet18_gcp, pretrained, kwargs))


@_timm_models.register_model
def orthofx_resnet50_dbn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm entry of :func:`orthofx.models.resnet50_dbn` (default 10 classes, CIFAR stem)."""
    return _models.resnet50_dbn(**_builder_kwargs("orthofx_resnet50_dbn", _models.resnet50_dbn, pretrained, kwargs))
