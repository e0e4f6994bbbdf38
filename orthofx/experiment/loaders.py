"""The data of a training run: in-memory Fashion-MNIST / synthetic tensors or torchvision
datasets (CIFAR, ImageFolder), in mini-batches sharded across DDP ranks (:class:`_Dist`, from
``torchrun``'s environment)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from orthofx.experiment.config import ExperimentConfig

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
