"""STL-10's labelled splits from ``stl10_binary/*.bin``, resized to 32x32."""

from __future__ import annotations

from pathlib import Path

import torch

from .core import DataError, ImageData, check_limit, image_split, label_names, read_bytes, require_dir

__all__ = ["STL10_URL", "load_stl10", "stl10_help"]

STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"


def stl10_help(data_dir: Path) -> str:
    """Where STL-10's binary files go under ``data_dir`` and where they are published (for error messages)."""
    folder = data_dir / "stl10_binary"
    return (f"STL-10 needs {folder}/train_X.bin, train_y.bin, test_X.bin and test_y.bin (the binary archive "
            f"stl10_binary.tar.gz unpacked in --data-dir), published at {STL10_URL}")


def load_stl10(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> ImageData:
    """STL-10's labelled splits (5000 train, 8000 test, labels 1..10 mapped to 0..9; the unlabelled set is not
    used), 96x96 RGB stored column-major, resized to 32x32 (bilinear, antialiased)."""
    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    root = require_dir(data_dir, stl10_help)
    help_text = stl10_help(root)
    folder = root / "stl10_binary"
    g = torch.Generator().manual_seed(seed)
    splits = []
    for split, limit in (("train", max_train), ("test", max_test)):
        raw_x = read_bytes(folder / f"{split}_X.bin", help_text)
        raw_y = read_bytes(folder / f"{split}_y.bin", help_text)
        per_image = 3 * 96 * 96
        if not raw_x or len(raw_x) % per_image or len(raw_x) // per_image != len(raw_y):
            raise DataError(f"{folder / f'{split}_X.bin'} ({len(raw_x)} bytes) must hold one 3x96x96 image per label "
                            f"of {folder / f'{split}_y.bin'} ({len(raw_y)} labels). {help_text}.")
        labels = torch.frombuffer(bytearray(raw_y), dtype=torch.uint8).long()
        if int(labels.min()) < 1 or int(labels.max()) > 10:
            raise DataError(f"{folder / f'{split}_y.bin'}: labels must lie in 1..10, got "
                            f"{int(labels.min())}..{int(labels.max())}. {help_text}.")
        images = torch.frombuffer(bytearray(raw_x), dtype=torch.uint8).reshape(-1, 3, 96, 96).transpose(2, 3)
        splits.append(image_split(images, labels - 1, limit, g, 32))
    return ImageData("stl10", splits[0], splits[1], label_names(folder / "class_names.txt", 10))
