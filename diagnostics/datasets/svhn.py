"""SVHN (cropped digits) from its MATLAB v5 files ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..optional import require
from .core import DataError, ImageData, ImageSplit, check_limit, random_subset, require_dir

__all__ = ["SVHN_URL", "SVHN_FILES", "load_svhn", "svhn_help"]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def svhn_help(data_dir: Path) -> str:
    """Where SVHN's .mat files go under ``data_dir`` and where they are published (for error messages)."""
    return (f"SVHN needs {data_dir / SVHN_FILES[0]} and {data_dir / SVHN_FILES[1]} (the 'Format 2: cropped "
            f"digits' MATLAB files, X: 32x32x3xN uint8, y: Nx1 with labels 1..10), published at {SVHN_URL}")



def _read_svhn_file(path: Path, data_dir: Path) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64 with 10 -> 0) from one SVHN ``.mat`` file."""
    import numpy as np

    loadmat, MatReadError = require("scipy.io").loadmat, require("scipy.io.matlab").MatReadError

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError, KeyError) as exc:  # scipy's read errors
        raise DataError(f"{path} is not a readable MATLAB v5 file ({exc}). {svhn_help(data_dir)}.") from exc
    X, y = mat.get("X"), mat.get("y")
    if X is None or y is None:
        raise DataError(f"{path} lacks the variable(s) {[k for k in ('X', 'y') if mat.get(k) is None]}. "
                        f"{svhn_help(data_dir)}.")
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise DataError(f"{path}: X must be 32x32x3xN uint8, got shape {X.shape} dtype {X.dtype}. "
                        f"{svhn_help(data_dir)}.")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != X.shape[3]:
        raise DataError(f"{path}: y has {y.shape[0]} labels for {X.shape[3]} images. {svhn_help(data_dir)}.")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10 (10 = digit 0), got {y.min()}..{y.max()}. "
                        f"{svhn_help(data_dir)}.")
    images = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))  # (N, 3, 32, 32)
    labels = torch.from_numpy(y.astype(np.int64)) % 10
    return images, labels


def load_svhn(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> ImageData:
    """SVHN from ``train_32x32.mat`` / ``test_32x32.mat``: label ``y % 10`` (the file's 10 is digit 0);
    ``max_train`` / ``max_test`` keep a random subset (drawn with ``seed``)."""
    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    root = require_dir(data_dir, svhn_help)
    missing = [f for f in SVHN_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(f"missing {', '.join(str(root / f) for f in missing)}. {svhn_help(root)}.")
    g = torch.Generator().manual_seed(seed)
    splits = []
    for fname, limit in zip(SVHN_FILES, (max_train, max_test)):
        images, labels = _read_svhn_file(root / fname, root)
        idx = random_subset(labels.shape[0], limit, g)
        splits.append(ImageSplit(images[idx].float() / 255.0, labels[idx]))
    return ImageData("svhn", splits[0], splits[1], tuple(str(i) for i in range(10)))
