"""MNIST from its idx files (torchvision's ``MNIST/raw/`` layout or a plain folder, each file plain or ``.gz``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .core import DataError, ImageData, check_limit, image_split, read_bytes, require_dir

__all__ = ["MNIST_URL", "MNIST_FILES", "load_mnist", "mnist_help"]

MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (or torchvision.datasets.MNIST(root, download=True))"
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def mnist_help(data_dir: Path) -> str:
    """Where MNIST's IDX files go under ``data_dir`` and where they are published (for error messages)."""
    raw = data_dir / "MNIST" / "raw"
    names = ", ".join(n for pair in MNIST_FILES.values() for n in pair)
    return (f"MNIST needs the four idx files {names} (plain or .gz) in {raw} (torchvision's layout) or in "
            f"{data_dir}; published at {MNIST_URL}")


def _read_idx(path: Path, ndim: int, help_text: str) -> Tensor:
    """An idx file of unsigned bytes (magic ``0x0000 08 ndim``, big-endian int32 sizes, then the data)."""
    raw = read_bytes(path, help_text)
    head = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != 0x0800 + ndim or len(raw) < head:
        raise DataError(f"{path} is not an idx file of unsigned bytes with {ndim} dimension(s) (magic "
                        f"{0x0800 + ndim:#010x}, got {magic if magic is None else f'{magic:#010x}'}). {help_text}.")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(raw) - head != count:
        raise DataError(f"{path}: header says {dims} = {count} bytes of data, file has {len(raw) - head}. "
                        f"{help_text}.")
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).reshape(dims) if count else \
        torch.zeros(dims, dtype=torch.uint8)


def load_mnist(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> ImageData:
    """MNIST from its idx files (``DIR/MNIST/raw/`` or ``DIR/``, each plain or ``.gz``): 28x28, one channel."""
    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    root = require_dir(data_dir, mnist_help)
    help_text = mnist_help(root)

    def find(name: str) -> Path:
        for folder in (root / "MNIST" / "raw", root):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        raise DataError(f"missing {root / 'MNIST' / 'raw' / name} (or {name}.gz). {help_text}.")

    g = torch.Generator().manual_seed(seed)
    splits = []
    for (images_name, labels_name), limit in zip(MNIST_FILES.values(), (max_train, max_test)):
        images = _read_idx(find(images_name), 3, help_text)
        labels = _read_idx(find(labels_name), 1, help_text)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
            raise DataError(f"{find(images_name)}: expected N x 28 x 28 images for the {labels.shape[0]} labels of "
                            f"{find(labels_name)}, got {tuple(images.shape)}. {help_text}.")
        if labels.numel() and int(labels.max()) > 9:
            raise DataError(f"{find(labels_name)}: labels must lie in 0..9, got up to {int(labels.max())}. "
                            f"{help_text}.")
        splits.append(image_split(images[:, None], labels, limit, g, 28))
    return ImageData("mnist", splits[0], splits[1], tuple(str(i) for i in range(10)))
