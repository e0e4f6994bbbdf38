"""Datasets for the demo and ``orthofx train``: found locally first, downloaded only on request.

Fashion-MNIST is read straight from its IDX files (gzip or raw), which is how the Debian
package ``dataset-fashion-mnist`` ships it in ``/usr/share/datasets/fashion-mnist/``.
CIFAR-10/100 and ImageFolder go through torchvision.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

from orthofx.errors import OrthofxError

__all__ = [
    "DatasetNotFound",
    "FASHION_MNIST_DIRS",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "fashion_mnist_tensors",
]

#: Where Fashion-MNIST is looked for, after an explicit ``root`` and ``$ORTHOFX_DATA``.
FASHION_MNIST_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",
    "~/.cache/orthofx/fashion-mnist",
    "./data/fashion-mnist",
    "./data/FashionMNIST/raw",
)

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

FIX_COMMAND = (
    "sudo apt-get install -y dataset-fashion-mnist   "
    "(or: orthofx demo --download, which uses torchvision's download when online, "
    "or pass --data DIR holding the four *-idx?-ubyte[.gz] files)"
)


class DatasetNotFound(OrthofxError, FileNotFoundError):
    """A dataset is not on disk; the message holds the exact command that fixes it."""


#: decoded IDX files by (resolved path, size, mtime): the demo reads the same files once per
#: run, and gunzip of the 47 MB training images costs seconds
_IDX_CACHE: dict[tuple[str, int, int], torch.Tensor] = {}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) into a uint8/int tensor (a fresh copy;
    decoded files are cached per process, keyed by path, size and modification time).

    Format: 2 zero bytes, a type code (0x08 = uint8), the number of dims, then big-endian
    uint32 dims, then the data.
    """
    p = Path(path)
    try:
        st = p.stat()
        key: tuple[str, int, int] | None = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _IDX_CACHE:
        return _IDX_CACHE[key].clone()
    t = _read_idx(p)
    if key is not None:
        _IDX_CACHE[key] = t
    return t.clone()


def _read_idx(p: Path) -> torch.Tensor:
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise OrthofxError(f"{p} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code != 0x08:
        raise OrthofxError(f"{p}: only uint8 IDX files are supported (type code {type_code:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    n = 1
    for d in dims:
        n *= d
    if len(body) != n:
        raise OrthofxError(f"{p}: expected {n} bytes of data, found {len(body)} (truncated file?)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        cand = directory / name
        if cand.is_file():
            return cand
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None, extra: Sequence[str] = ()) -> Path:
    """The first directory holding all four Fashion-MNIST IDX files.

    Search order: ``root``, ``$ORTHOFX_DATA`` (and its ``fashion-mnist`` subfolder),
    ``extra``, then :data:`FASHION_MNIST_DIRS`. Raises :class:`DatasetNotFound` with the
    fixing command when none has them.
    """
    candidates: list[Path] = []
    if root is not None:
        candidates += [Path(root), Path(root) / "fashion-mnist", Path(root) / "FashionMNIST" / "raw"]
    env = os.environ.get("ORTHOFX_DATA")
    if env:
        candidates += [Path(env), Path(env) / "fashion-mnist", Path(env) / "FashionMNIST" / "raw"]
    candidates += [Path(e) for e in extra]
    candidates += [Path(d).expanduser() for d in FASHION_MNIST_DIRS]
    for c in candidates:
        if all(_find_file(c, s) is not None for pair in _FILES.values() for s in pair):
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetNotFound(f"Fashion-MNIST not found (looked in: {looked}). Fix: {FIX_COMMAND}")


def load_fashion_mnist(
    root: str | os.PathLike | None = None, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    With ``download=True`` and no local copy, torchvision downloads it into
    ``root`` (default ``~/.cache/orthofx``).
    """
    try:
        d = find_fashion_mnist(root)
    except DatasetNotFound:
        if not download:
            raise
        target = Path(root or "~/.cache/orthofx").expanduser()
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        except Exception as e:  # network errors differ by platform
            raise DatasetNotFound(
                f"Fashion-MNIST download into {target} failed ({e}). Fix: {FIX_COMMAND}"
            ) from e
        d = find_fashion_mnist(target / "FashionMNIST" / "raw")
    img_stem, lab_stem = _FILES[train]
    images = read_idx(_find_file(d, img_stem))  # type: ignore[arg-type]
    labels = read_idx(_find_file(d, lab_stem)).long()  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise OrthofxError(f"Fashion-MNIST in {d}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


#: Per-pixel mean and std of the Fashion-MNIST training set (on [0, 1] intensities).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def fashion_mnist_tensors(
    root: str | os.PathLike | None = None,
    train: bool = True,
    limit: int | None = None,
    download: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 images (N, 1, 28, 28) and labels; ``limit`` takes a fixed-seed
    class-balanced-in-expectation random subset."""
    x, y = load_fashion_mnist(root, train=train, download=download)
    if limit is not None and limit < x.shape[0]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(x.shape[0], generator=g)[:limit]
        x, y = x[idx], y[idx]
    xf = (x.float().div_(255.0) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return xf.unsqueeze(1).contiguous(), y
