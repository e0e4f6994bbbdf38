"""The configuration of one training run of ``orthofx train`` / ``demo`` / ``study``:
:class:`ExperimentConfig` (checked on construction), :func:`load_config` (JSON or TOML) and the
choices its fields take (:data:`DATASETS`, :data:`MODEL_NAMES`, :data:`BACKENDS`, :data:`DEVICES`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from orthofx.config import check_bool, check_choice, check_float, check_int
from orthofx.errors import ConfigError, OptionError

__all__ = ["ExperimentConfig", "load_config", "DATASETS", "MODEL_NAMES", "BACKENDS", "DEVICES"]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
MODEL_NAMES = ("small-resnet-dbn", "small-resnet-gcp", "resnet50-dbn", "resnet18-gcp")
_GCP_MODELS = ("small-resnet-gcp", "resnet18-gcp")
#: meta-layer backends (orthofx.linalg.SPECTRAL_BACKENDS); "gram" only for the GCP head
BACKENDS = ("auto", "eigh", "svd", "ns")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ExperimentConfig:
    """Everything one training run needs (JSON/TOML friendly).

    Attributes:
        dataset: "fashion-mnist", "cifar10", "cifar100", "imagefolder" (``data_dir`` with
            ``train/`` and ``val/``) or "synthetic" (random tensors, for tests).
        data_dir: local dataset directory (None: the standard places, see orthofx.data).
        download: let torchvision download the dataset when it is not on disk.
        model: "small-resnet-dbn", "small-resnet-gcp", "resnet50-dbn" or "resnet18-gcp".
        model_kwargs: constructor options of the small models (e.g. ``{"stem_kernel": 5,
            "stem_channels": 64}``, ``{"reduced": 64, "head": "raw-eigh"}``).
        treatment: an orthofx preset ("svd", "nog", "olr", "ow", "nog+ow+olr", ...).
        ortho: OrthoConfig fields that override the preset's (e.g. ``{"nog_method": "svd"}``).
        transform: run ``orthofx.transform``/``attach`` (False: train the model as written, e.g.
            a raw ``torch.linalg.eigh`` baseline; ``treatment`` must then be "svd").
        guard_nonfinite: count steps whose loss or gradients are not finite, and steps whose
            forward/backward raises a solver error (``torch.linalg.LinAlgError``), and skip
            them (zero gradients, computed on the device without a host sync) instead of
            letting NaN reach the weights or crashing.
        backend: meta-layer backend: "auto" (default: the layer's fastest exact route),
            "eigh" (exact SVD meta-layer), "ns" (Newton–Schulz), "svd" or, for the GCP models,
            "gram".
        eps: ε of the meta-layer's covariance (None: 1e-2 for whitening, the authors' value;
            1e-5 for GCP).
        epochs, batch_size, lr, momentum, weight_decay, milestones (epochs at which the lr
        is multiplied by ``gamma``): the SGD recipe.
        train_limit / test_limit: use a fixed random subset (None = all).
        seed: seeds python, torch and the data order.
        monitor_every: record κ every k steps.
        amp: autocast (bf16 on CPU, fp16 + GradScaler on CUDA).
        out: output directory (results.json, kappa.csv, checkpoint.pt).
        resume: continue from ``out/checkpoint.pt`` when it exists.
        device: "auto", "cpu" or "cuda".
        progress: show tqdm progress bars.
        num_workers: DataLoader workers for torchvision datasets.
        recalibrate_batches: before each evaluation, re-estimate the running statistics of
            every BatchNorm and whitening layer as the plain average over this many training
            batches with the current weights ("precise BN"; 0 = use the training EMAs, as the
            paper). Short CPU runs need it: their weights move too fast for EMA statistics.
        image_size: crop size for ImageFolder datasets.
        eval_every: evaluate (and recalibrate) after every k-th epoch and after the last one.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    model: str = "small-resnet-dbn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    treatment: str = "svd"
    ortho: dict[str, Any] = field(default_factory=dict)
    transform: bool = True
    guard_nonfinite: bool = False
    backend: str = "auto"
    eps: float | None = None
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    monitor_every: int = 10
    amp: bool = False
    out: str = "out/run"
    resume: bool = True
    device: str = "auto"
    progress: bool = True
    num_workers: int = 2
    image_size: int = 224
    recalibrate_batches: int = 0
    eval_every: int = 1
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check every field and normalise it (``"false"`` → False, ``2.0`` → 2, a path → str);
        any invalid value raises :class:`orthofx.errors.OptionError` naming the field."""
        from orthofx.config import OrthoConfig

        check_choice(self.dataset, "dataset", DATASETS)
        check_choice(self.model, "model", MODEL_NAMES)
        check_choice(self.backend, "backend", BACKENDS + (("gram",) if self.model in _GCP_MODELS else ()))
        check_choice(self.device, "device", DEVICES)
        if not isinstance(self.treatment, str):
            raise OptionError("treatment", self.treatment, "must be a preset name such as 'nog+ow+olr'")
        try:
            OrthoConfig.from_preset(self.treatment)
        except ConfigError as e:
            raise OptionError("treatment", self.treatment, str(e)) from None
        for name in ("model_kwargs", "ortho"):
            if not isinstance(getattr(self, name), Mapping):
                raise OptionError(name, getattr(self, name), "must be a mapping")
            setattr(self, name, dict(getattr(self, name)))
        try:
            OrthoConfig.from_preset(self.treatment, **self.ortho)
        except ConfigError as e:
            raise OptionError("ortho", self.ortho, str(e)) from None
        self.data_dir = _path_field(self.data_dir, "data_dir", optional=True)
        self.out = _path_field(self.out, "out")
        for name in ("download", "amp", "resume", "progress", "transform", "guard_nonfinite"):
            setattr(self, name, check_bool(getattr(self, name), name))
        self.eps = check_float(self.eps, "eps", min=0.0, min_inclusive=False, optional=True)
        self.lr = check_float(self.lr, "lr", min=0.0)
        self.momentum = check_float(self.momentum, "momentum", min=0.0)
        self.weight_decay = check_float(self.weight_decay, "weight_decay", min=0.0)
        self.gamma = check_float(self.gamma, "gamma", min=0.0, min_inclusive=False)
        self.epochs = check_int(self.epochs, "epochs", min=1)
        self.batch_size = check_int(self.batch_size, "batch_size", min=1)
        self.train_limit = check_int(self.train_limit, "train_limit", min=1, optional=True)
        self.test_limit = check_int(self.test_limit, "test_limit", min=1, optional=True)
        self.seed = check_int(self.seed, "seed", min=0)
        self.monitor_every = check_int(self.monitor_every, "monitor_every", min=1)
        self.num_workers = check_int(self.num_workers, "num_workers", min=0)
        self.image_size = check_int(self.image_size, "image_size", min=1)
        self.recalibrate_batches = check_int(self.recalibrate_batches, "recalibrate_batches", min=0)
        self.eval_every = check_int(self.eval_every, "eval_every", min=1)
        if isinstance(self.milestones, (str, bytes, Mapping)) or not isinstance(self.milestones, (list, tuple)):
            raise OptionError("milestones", self.milestones, "must be a list of epoch numbers")
        self.milestones = tuple(check_int(m, f"milestones[{i}]", min=1) for i, m in enumerate(self.milestones))
        if self.name is not None and not isinstance(self.name, str):
            raise OptionError("name", self.name, "must be a string or None")
        if not isinstance(self.extra, Mapping):
            raise OptionError("extra", self.extra, "must be a mapping")
        if not self.transform and (self.treatment != "svd" or self.ortho):
            raise OptionError("transform", self.transform, f"False trains the model as written; treatment "
                              f"{self.treatment!r} needs transform=True")

    def ortho_config(self) -> Any:
        """The :class:`orthofx.OrthoConfig` of this run: ``treatment``'s preset with ``ortho``."""
        from orthofx.config import OrthoConfig

        return OrthoConfig.from_preset(self.treatment, **self.ortho)

    @property
    def run_name(self) -> str:
        """Label of this run in tables and plots."""
        if self.name:
            return self.name
        return "NS" if self.backend == "ns" else self.treatment.upper().replace("+", "+")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _path_field(value: Any, name: str, optional: bool = False) -> str | None:
    """A path field as a non-empty ``str`` (``os.PathLike`` accepted)."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise OptionError(name, value, "must be a non-empty path")
    return value


def load_config(path: str | os.PathLike, **overrides: Any) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from JSON or TOML (``.toml``); ``overrides`` win
    (None skipped). A missing or unreadable file, malformed JSON/TOML, a top level that is
    not an object, unknown keys and invalid values raise :class:`ConfigError` naming the file
    and, for values, the field (:class:`OptionError`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    if p.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ConfigError(f"{p}: TOML configs need Python >= 3.11; use JSON") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be an object of config keys, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown config keys {unknown}; known: {sorted(known)}")
    return ExperimentConfig(**data)
