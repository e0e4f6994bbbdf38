"""The training loop behind ``orthofx demo`` and ``orthofx train``.

One function, :func:`run`, takes an :class:`ExperimentConfig` and does, in order: load data,
build the (unmodified) model, ``orthofx.transform`` it with the configured treatments, build
SGD + MultiStepLR, ``orthofx.attach`` NOG/OLR, train with the conditioning monitor on,
evaluate, and write a results JSON. It checkpoints every epoch and resumes from the last
checkpoint, and runs unchanged under ``torchrun`` (DDP; gloo on CPU, nccl on GPUs).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orthofx.config import check_bool, check_choice, check_float, check_int
from orthofx.errors import ConfigError, OptionError

__all__ = ["ExperimentConfig", "run", "load_config"]

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


# ---------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# ---------------------------------------------------------------------------- data
@dataclass
class _Data:
    train: Any
    test: Any
    in_channels: int
    num_classes: int
    example: torch.Tensor


class _TensorBatches:
    """Mini-batches of in-memory tensors with a seeded shuffle, sharded across DDP ranks."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, d: _Dist, seed: int) -> None:
        self.x, self.y, self.bs, self.shuffle, self.d, self.seed = x, y, batch_size, shuffle, d, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = self.x.shape[0] // self.d.world
        return max(1, per_rank // self.bs) if self.shuffle else math.ceil(per_rank / self.bs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        per_rank = n // self.d.world
        order = order[self.d.rank * per_rank : (self.d.rank + 1) * per_rank]
        for i in range(len(self)):
            idx = order[i * self.bs : (i + 1) * self.bs]
            if idx.numel() == 0:
                break
            yield self.x[idx], self.y[idx]


def _load_data(cfg: ExperimentConfig, d: _Dist) -> _Data:
    from orthofx import data as odata

    if cfg.dataset in ("fashion-mnist", "synthetic"):
        if cfg.dataset == "fashion-mnist":
            xtr, ytr = odata.fashion_mnist_tensors(cfg.data_dir, True, cfg.train_limit, cfg.download, cfg.seed)
            xte, yte = odata.fashion_mnist_tensors(cfg.data_dir, False, cfg.test_limit, cfg.download, cfg.seed)
        else:
            g = torch.Generator().manual_seed(cfg.seed)
            ntr, nte = cfg.train_limit or 512, cfg.test_limit or 128
            xtr, ytr = torch.randn(ntr, 1, 28, 28, generator=g), torch.randint(0, 10, (ntr,), generator=g)
            xte, yte = torch.randn(nte, 1, 28, 28, generator=g), torch.randint(0, 10, (nte,), generator=g)
        train = _TensorBatches(xtr, ytr, cfg.batch_size, True, d, cfg.seed)
        test = _TensorBatches(xte, yte, 512, False, _Dist(), cfg.seed)
        return _Data(train, test, 1, 10, xtr[: min(8, xtr.shape[0])])
    return _torchvision_data(cfg, d)


def _torchvision_data(cfg: ExperimentConfig, d: _Dist) -> _Data:
    from orthofx._optional import require

    torchvision = require("torchvision", "cli", purpose="the CIFAR experiments")
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    from orthofx.data import DatasetNotFound

    root = cfg.data_dir or os.path.expanduser("~/.cache/orthofx")
    if cfg.dataset in ("cifar10", "cifar100"):
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        tr = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        te = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train_ds = cls(root, train=True, transform=tr, download=cfg.download)
            test_ds = cls(root, train=False, transform=te, download=cfg.download)
        except RuntimeError as e:
            raise DatasetNotFound(
                f"{cfg.dataset} not found in {root} ({e}). Fix: pass --download (online) or "
                f"--data DIR holding the extracted torchvision {cls.__name__} folder"
            ) from e
        num_classes = 10 if cfg.dataset == "cifar10" else 100
    else:
        s = cfg.image_size
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        tr = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        te = T.Compose([T.Resize(int(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), T.Normalize(mean, std)])
        tdir, vdir = Path(root) / "train", Path(root) / "val"
        if not tdir.is_dir() or not vdir.is_dir():
            raise DatasetNotFound(
                f"ImageFolder dataset needs {tdir} and {vdir} (one sub-folder per class). "
                "Fix: pass --data DIR pointing at such a directory (e.g. ImageNet's train/val)"
            )
        train_ds = torchvision.datasets.ImageFolder(str(tdir), tr)
        test_ds = torchvision.datasets.ImageFolder(str(vdir), te)
        num_classes = len(train_ds.classes)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_limit:
        train_ds = Subset(train_ds, torch.randperm(len(train_ds), generator=g)[: cfg.train_limit].tolist())
    if cfg.test_limit:
        test_ds = Subset(test_ds, torch.randperm(len(test_ds), generator=g)[: cfg.test_limit].tolist())
    sampler = DistributedSampler(train_ds, d.world, d.rank, seed=cfg.seed) if d.world > 1 else None
    train = DataLoader(
        train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=cfg.num_workers,
        drop_last=True, generator=g, pin_memory=torch.cuda.is_available(),
    )
    test = DataLoader(test_ds, 256, shuffle=False, num_workers=cfg.num_workers)
    example = next(iter(DataLoader(train_ds, 4)))[0]
    return _Data(train, test, example.shape[1], num_classes, example)


# ---------------------------------------------------------------------------- run
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def _device(cfg: ExperimentConfig, d: _Dist) -> torch.device:
    if cfg.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = cfg.device
    if kind == "cuda":
        return torch.device("cuda", d.local_rank)
    return torch.device(kind)


@torch.no_grad()
def recalibrate_statistics(model: nn.Module, loader: Any, device: torch.device, batches: int) -> int:
    """Reset the running statistics of every BatchNorm / DecorrelatedBatchNorm in ``model`` and
    re-estimate them as the cumulative average over ``batches`` training batches (train-mode
    forwards without gradient). Returns the number of batches used."""
    from orthofx.nn import DecorrelatedBatchNorm

    norms = [
        m for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, DecorrelatedBatchNorm)) and m.track_running_stats
    ]
    if not norms or batches <= 0:
        return 0
    saved = {m: m.momentum for m in norms}
    was_training = model.training
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x, _ in loader:
            if used >= batches:
                break
            model(x.to(device, non_blocking=True))
            used += 1
    finally:
        for m, mom in saved.items():
            m.momentum = mom
        model.train(was_training)
    return used


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Any, device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train()
    return {"test_error": 100.0 * (1 - correct / max(total, 1)), "test_loss": loss_sum / max(total, 1)}


def run(cfg: ExperimentConfig, *, log: Any = print, observer: Any = None) -> dict[str, Any]:
    """Train one configuration and return (and write to ``out/results.json``) its results:
    test error, κ summary (median/final), solver failures, ms per step, OLR/NOG statistics.

    ``observer``: optional ``session -> object`` with ``step()`` (called after every training
    step) and ``records()`` (called once at the end; its value is the result's ``"observer"``
    entry), e.g. :class:`orthofx.experiment.study.StepLogger`. None (default) changes nothing.

    Under torchrun, a process group that ``run`` created is torn down before it returns (a
    barrier, then ``destroy_process_group``): a gloo group left to interpreter exit can abort a
    rank ("terminate called without an active exception")."""
    device_kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    owned = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    d = _init_distributed(device_kind)
    try:
        results = _run(cfg, d, log, observer)
        if owned:
            dist.barrier()  # on success only: a failed rank must not leave the others waiting
        return results
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: ExperimentConfig, d: _Dist, log: Any, observer: Any = None) -> dict[str, Any]:
    from orthofx.experiment.session import WeightTracker, build_session, train_step
    from orthofx.monitor import ConditioningMonitor

    device = _device(cfg, d)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    data = _load_data(cfg, d)

    sess = build_session(cfg, data, device, d.world)
    gm, net, opt, handle, sched, scaler = sess.model, sess.net, sess.opt, sess.handle, sess.sched, sess.scaler
    report, amp_dtype = sess.report, sess.amp_dtype
    if cfg.transform:
        monitor: Any = ConditioningMonitor(gm, every=cfg.monitor_every, run=cfg.run_name)
    else:
        monitor = _RawMonitor(gm, cfg.monitor_every, cfg.run_name, sess)
    weights = WeightTracker(gm, sess.producers, cfg.monitor_every, cfg.run_name)
    obs = observer(sess) if observer is not None else None

    ckpt_path = out / "checkpoint.pt"
    start_epoch, history = 0, []
    if cfg.resume and ckpt_path.exists():
        try:  # the checkpoint holds plain data and tensors only: no pickled code runs on resume
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"cannot resume from {ckpt_path}: it is not a checkpoint of `orthofx train` that loads "
                f"with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "use another --out or delete it"
            ) from e
        if not isinstance(ck, dict) or not isinstance(ck.get("config"), dict):
            raise ConfigError(f"{ckpt_path} is not a checkpoint of `orthofx train` (it holds no run config); "
                              "use another --out or --no-resume")
        differ = [f"{f} {ck['config'].get(f)!r} there, {getattr(cfg, f)!r} here" for f in _RESUME_FIELDS
                  if ck["config"].get(f) != getattr(cfg, f)]
        if differ:  # only the fields that differ, not the whole config
            raise ConfigError(f"{ckpt_path} was written by a different run ({'; '.join(differ)}); "
                              "use another --out or --no-resume")
        gm.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        monitor.records.extend(ck["monitor"])
        start_epoch, history = ck["epoch"], ck["history"]
        monitor._step = ck["step"]
        if d.main:
            log(f"resumed from {ckpt_path} at epoch {start_epoch}")

    use_tqdm = cfg.progress and d.main
    if use_tqdm:
        from orthofx._optional import require

        tqdm = require("tqdm.auto", "cli", purpose="the progress bar (or pass progress=False)").tqdm
    step_times: list[float] = []
    gm.train()
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        elif hasattr(getattr(data.train, "sampler", None), "set_epoch"):
            data.train.sampler.set_epoch(epoch)
        it = data.train
        if use_tqdm:
            it = tqdm(it, desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        loss_acc = torch.zeros((), device=device)
        nb = 0
        for x, y in it:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = train_step(sess, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            monitor.step()
            weights.step()
            if obs is not None:
                obs.step()
            if loss is None:  # a solver exception skipped this step (guarded runs)
                continue
            loss_acc += loss.detach()
            nb += 1
        sched.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            if cfg.recalibrate_batches:
                recalibrate_statistics(gm, data.train, device, cfg.recalibrate_batches)
            ev: dict[str, Any] = _evaluate(gm, data.test, device, amp_dtype)
        else:
            ev = {"test_error": math.nan, "test_loss": math.nan}
        ev.update(epoch=epoch + 1, train_loss=float(loss_acc) / max(nb, 1), lr=opt.param_groups[0]["lr"])
        history.append(ev)
        monitor.flush()
        if d.main:
            log(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs}: train loss {ev['train_loss']:.4f}, "
                f"test error {ev['test_error']:.2f}%")
            torch.save(
                {
                    "config": cfg.to_dict(),
                    "orthofx": getattr(gm, "_orthofx_meta", {}).get("orthofx"),
                    "model": gm.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "monitor": monitor.records,
                    "epoch": epoch + 1,
                    "step": monitor._step,
                    "history": history,
                },
                ckpt_path,
            )

    replicas_identical = None
    if d.world > 1:  # DDP: every rank must end with bit-identical weights
        flat = torch.cat([p.detach().reshape(-1).float() for p in gm.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        replicas_identical = bool(torch.equal(hi, lo))
    summary = monitor.summary()
    warm = step_times[min(5, len(step_times) // 4):] or step_times
    results = {
        "run": cfg.run_name,
        "config": cfg.to_dict(),
        "report": report.to_dict() if hasattr(report, "to_dict") else str(report),
        "history": history,
        "final_test_error": history[-1]["test_error"] if history else None,
        "kappa": summary,
        "kappa_records": [dict(r) for r in monitor.records],
        "weight_records": weights.records(),
        "nonfinite_steps": int(sess.nonfinite_steps),
        "solver_exceptions": sess.solver_exceptions,
        "steps": len(step_times),
        "ms_per_step": 1000.0 * sum(warm) / max(len(warm), 1) if warm else None,
        "treatment_stats": _treatment_stats(handle),
        "world_size": d.world,
        "replicas_identical": replicas_identical,
    }
    if obs is not None:
        results["observer"] = obs.records()
    if d.main:
        monitor.to_csv(out / "kappa.csv")
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    monitor.close()
    if handle is not None:
        handle.remove()
    return results


class _RawMonitor:
    """The monitor's interface for a model that holds no orthofx meta-layer (``transform=False``):
    κ from the modules' own ``last_eigenvalues`` (:class:`~orthofx.experiment.session.RawKappaRecorder`)."""

    def __init__(self, model: nn.Module, every: int, run: str, sess: Any) -> None:
        from orthofx.experiment.session import RawKappaRecorder

        self._rec, self._sess = RawKappaRecorder(model, every, run), sess
        self.records = self._rec.records

    @property
    def _step(self) -> int:
        return self._rec._step

    @_step.setter
    def _step(self, value: int) -> None:
        self._rec._step = value

    def step(self) -> None:
        self._rec.step(self._sess.solver_exceptions)

    def flush(self) -> list[dict[str, Any]]:
        return []

    def summary(self) -> dict[str, dict[str, float]]:
        return self._rec.summary()

    def to_csv(self, path: Path) -> None:
        import csv

        keys = sorted({k for r in self.records for k in r})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)

    def close(self) -> None:
        pass


#: the fields a checkpoint in ``out`` must share with the run that resumes from it
_RESUME_FIELDS = ("treatment", "model")


def _treatment_stats(handle: Any) -> dict[str, Any]:
    """The attach handle's counters plus an OLR summary: how often η* was used (0 < η* < lr)
    and its median, which shows whether OLR effectively freezes the Pre-SVD layer."""
    if handle is None:
        return {}
    stats = dict(handle.stats())
    if handle.olr:
        hist = handle.olr_history()
        eta, lr, base = (hist[k].double().cpu() for k in ("eta", "lr", "base"))
        if eta.numel():
            active = (eta > 0) & (eta < base)
            stats["olr_active_fraction"] = float(active.double().mean())
            stats["olr_eta_median"] = float(eta.nanmedian())  # η* is NaN where w = 0 (OW generator at step 0)
            stats["olr_eta_nan_fraction"] = float(torch.isnan(eta).double().mean())
            stats["olr_lr_over_scheduled_median"] = float((lr / base).median())
    return stats


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
