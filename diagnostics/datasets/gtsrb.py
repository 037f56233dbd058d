"""GTSRB in torchvision's layout (``.ppm`` class folders and the test CSV), resized to 32x32."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from ..optional import require
from .core import DataError, ImageData, ImageSplit, check_limit, random_subset, require_dir

__all__ = ["GTSRB_URL", "load_gtsrb", "gtsrb_help"]

GTSRB_URL = ("https://benchmark.ini.rub.de/gtsrb_dataset.html (or torchvision.datasets.GTSRB(root, "
             "download=True))")


def gtsrb_help(data_dir: Path) -> str:
    """Where GTSRB's files go under ``data_dir`` and where they are published (for error messages)."""
    base = data_dir / "gtsrb"
    return (f"GTSRB needs {base}/GTSRB/Training/<class>/*.ppm (class folders 00000 ... 00042), "
            f"{base}/GTSRB/Final_Test/Images/*.ppm and {base}/GT-final_test.csv (torchvision's layout; the "
            f"archives GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip), "
            f"published at {GTSRB_URL}")


def _read_image(path: Path, size: int, help_text: str) -> Tensor:
    """One image file (any format Pillow reads, e.g. PPM) as RGB, resized to ``size`` x ``size`` (bilinear),
    (3, size, size) uint8."""
    import numpy as np

    Image, UnidentifiedImageError = require("PIL.Image"), require("PIL").UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing image {path}. {help_text}.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}). {help_text}.") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_gtsrb(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> ImageData:
    """GTSRB in torchvision's layout: label = index of the class folder (sorted) for training images, the
    test CSV's ``ClassId`` (the folder ``f"{ClassId:05d}"``) for test images; whole images resized to 32x32."""
    import csv

    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    root = require_dir(data_dir, gtsrb_help)
    help_text = gtsrb_help(root)
    base = root / "gtsrb"
    train_dir, test_dir, test_csv = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", \
        base / "GT-final_test.csv"
    for path in (train_dir, test_dir, test_csv):
        if not (path.is_file() if path.suffix == ".csv" else path.is_dir()):
            raise DataError(f"missing {path}. {help_text}.")
    classes = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    train = [(p, i) for i, c in enumerate(classes) for p in sorted((train_dir / c).glob("*.ppm"))]
    if not train:
        raise DataError(f"no .ppm images in the class folders of {train_dir}. {help_text}.")
    index = {c: i for i, c in enumerate(classes)}
    test = []
    with open(test_csv, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter=";", skipinitialspace=True)
        if not reader.fieldnames or not {"Filename", "ClassId"} <= set(reader.fieldnames):
            raise DataError(f"{test_csv} must be ';'-separated with columns Filename and ClassId, got header "
                            f"{reader.fieldnames}. {help_text}.")
        for lineno, row in enumerate(reader, start=2):
            folder = f"{int(row['ClassId']):05d}" if (row["ClassId"] or "").strip().isdigit() else None
            if folder not in index:
                raise DataError(f"{test_csv} line {lineno}: ClassId {row['ClassId']!r} has no class folder in "
                                f"{train_dir}. {help_text}.")
            test.append((test_dir / row["Filename"], index[folder]))
    g = torch.Generator().manual_seed(seed)
    splits = []
    for split, items, limit in (("train", train, max_train), ("test", test, max_test)):
        picked = [items[i] for i in random_subset(len(items), limit, g).tolist()]
        loop = progress(picked, desc=f"GTSRB {split}") if progress else picked
        images = torch.stack([_read_image(p, 32, help_text) for p, _ in loop]) if picked else \
            torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
        splits.append(ImageSplit(images.float() / 255.0, torch.tensor([c for _, c in picked], dtype=torch.int64)))
    return ImageData("gtsrb", splits[0], splits[1], classes)
