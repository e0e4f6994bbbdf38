"""The experiments' models by name: :data:`MODELS` and :func:`build_model` (what
``ExperimentConfig.model`` names)."""

from __future__ import annotations

from typing import Any

from torch import nn

from orthofx.errors import ConfigError
from orthofx.models.resnet import cifar_resnet50_dbn, resnet18_gcp
from orthofx.models.small import SmallResNetDBN, SmallResNetGCP

__all__ = ["MODELS", "build_model"]


MODELS = {
    "small-resnet-dbn": SmallResNetDBN,
    "small-resnet-gcp": SmallResNetGCP,
    "resnet50-dbn": cifar_resnet50_dbn,
    "resnet18-gcp": resnet18_gcp,
}


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    backend: str = "auto",
    eps: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """One of :data:`MODELS` by name, sized for the dataset; ``eps`` None = the model's default
    (1e-2 for whitening, the authors' value; 1e-5 for GCP). ``kwargs`` go to the small models'
    constructors (e.g. ``stem_kernel=5, stem_channels=64``; ``reduced=64, head="raw-eigh"``)."""
    if eps is None:
        eps = 1e-5 if name in ("resnet18-gcp", "small-resnet-gcp") else 1e-2
    if kwargs and name not in ("small-resnet-dbn", "small-resnet-gcp"):
        raise ConfigError(f"model {name!r} takes no model_kwargs (got {sorted(kwargs)})")
    try:
        if name == "small-resnet-dbn":
            return SmallResNetDBN(in_channels, num_classes, whitening_backend=backend, whitening_eps=eps, **kwargs)
        if name == "small-resnet-gcp":
            return SmallResNetGCP(in_channels, num_classes, backend=backend, eps=eps, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: bad model_kwargs {kwargs}: {e}") from None
    if name == "resnet50-dbn":
        return cifar_resnet50_dbn(num_classes, backend, eps, in_channels)
    if name == "resnet18-gcp":
        return resnet18_gcp(num_classes, backend=backend, eps=eps, in_channels=in_channels)
    raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
