"""CelebA (aligned and cropped JPEGs) with one binary attribute as the label, both classes balanced."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from ..optional import require
from .core import DataError, ImageData, ImageSplit, check_limit, require_dir

__all__ = ["CELEBA_URL", "load_celeba", "celeba_help"]

CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR = "list_attr_celeba.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


def celeba_help(data_dir: Path) -> str:
    """Where CelebA's files go under ``data_dir`` and where they are published (for error messages)."""
    return (f"CelebA needs {data_dir / CELEBA_IMAGES}/ (the aligned-and-cropped JPEGs 000001.jpg ...), "
            f"{data_dir / CELEBA_ATTR} and {data_dir / CELEBA_PARTITION} (from the 'Anno' and 'Eval' folders), "
            f"published at {CELEBA_URL}")



def _read_attributes(path: Path, data_dir: Path) -> tuple[list[str], list[str], Tensor]:
    """(attribute names, file names, values (n_images, n_attributes) int8 in {-1, 1}) of ``list_attr_celeba.txt``."""
    bad = f"{path} is not in CelebA's list_attr_celeba.txt layout"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 2:
        raise DataError(f"{bad}: need a count line, a line of attribute names, then one line per image. "
                        f"{celeba_help(data_dir)}.")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{bad}: line 1 must be the number of images, got {lines[0][:60]!r}. "
                        f"{celeba_help(data_dir)}.") from None
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    if not names or len(rows) != count:
        raise DataError(f"{bad}: line 1 says {count} images, found {len(rows)} image lines and {len(names)} "
                        f"attribute names. {celeba_help(data_dir)}.")
    files, values = [], []
    for lineno, parts in enumerate(rows, start=3):
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DataError(f"{bad}: line {lineno} must be a file name and {len(names)} values -1/1, got "
                            f"{' '.join(parts)[:80]!r}. {celeba_help(data_dir)}.")
        files.append(parts[0])
        values.append([int(v) for v in parts[1:]])
    return names, files, torch.tensor(values, dtype=torch.int8).reshape(len(files), len(names))


def _read_partition(path: Path, data_dir: Path) -> dict[str, int]:
    """``{file name: split}`` from ``list_eval_partition.txt`` (0 = train, 1 = valid, 2 = test)."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path} is not in CelebA's list_eval_partition.txt layout: line {lineno} must be "
                            f"'<file>.jpg 0|1|2', got {line[:80]!r}. {celeba_help(data_dir)}.")
        out[parts[0]] = int(parts[1])
    return out


def _read_face(path: Path, size: int, data_dir: Path) -> Tensor:
    """One aligned CelebA JPEG: centre-cropped to a square, resized to ``size``, (3, size, size) uint8."""
    import numpy as np

    Image, UnidentifiedImageError = require("PIL.Image"), require("PIL").UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing image {path} (listed in {CELEBA_ATTR}). {celeba_help(data_dir)}.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} is not a readable JPEG ({exc}). {celeba_help(data_dir)}.") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _balanced(labels: Tensor, limit: int | None, generator: torch.Generator) -> Tensor:
    """Indices with equally many 0s and 1s (``min`` of the two counts, at most ``limit // 2`` each), shuffled."""
    pos, neg = torch.nonzero(labels == 1).flatten(), torch.nonzero(labels == 0).flatten()
    per_class = min(len(pos), len(neg)) if limit is None else min(len(pos), len(neg), limit // 2)
    pick = [c[torch.randperm(len(c), generator=generator)[:per_class]] for c in (pos, neg)]
    both = torch.cat(pick)
    return both[torch.randperm(len(both), generator=generator)]


def load_celeba(
    data_dir: str | Path,
    attribute: str = "Smiling",
    size: int = 32,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> ImageData:
    """CelebA, label = ``attribute == 1``; train = partition 0, test = partition 2 (valid unused); each split
    balanced (equal numbers of both classes, drawn with ``seed``, at most ``max_* // 2`` per class);
    images centre-cropped to a square and resized to ``size`` x ``size`` (32 by default, 96 as in the NFA
    papers). ``progress``: optional wrapper for the image loop (e.g. tqdm)."""
    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (32 or 96), got {size!r}")
    root = require_dir(data_dir, celeba_help)
    expected = [root / CELEBA_IMAGES, root / CELEBA_ATTR, root / CELEBA_PARTITION]
    missing = [p for p in expected if not (p.is_dir() if p.name == CELEBA_IMAGES else p.is_file())]
    if missing:
        raise DataError(f"missing {', '.join(map(str, missing))}. {celeba_help(root)}.")
    names, files, values = _read_attributes(root / CELEBA_ATTR, root)
    if attribute not in names:
        raise DataError(f"attribute {attribute!r} is not in {root / CELEBA_ATTR}; choose one of: {', '.join(names)}")
    partition = _read_partition(root / CELEBA_PARTITION, root)
    unlisted = [f for f in files if f not in partition]
    if unlisted:
        raise DataError(f"{root / CELEBA_PARTITION} has no split for {len(unlisted)} image(s) of {CELEBA_ATTR}, "
                        f"e.g. {unlisted[0]}. {celeba_help(root)}.")
    split_of = torch.tensor([partition[f] for f in files])
    labels = (values[:, names.index(attribute)] == 1).long()
    g = torch.Generator().manual_seed(seed)
    splits = []
    for split, limit in (("train", max_train), ("test", max_test)):
        rows = torch.nonzero(split_of == CELEBA_SPLITS[split]).flatten()
        idx = rows[_balanced(labels[rows], limit, g)]
        if len(idx) == 0:
            raise DataError(f"CelebA {split} split (partition {CELEBA_SPLITS[split]}) has no images with both "
                            f"values of {attribute!r}; check {root / CELEBA_PARTITION}")
        paths = [root / CELEBA_IMAGES / files[i] for i in idx.tolist()]
        loop = progress(paths, desc=f"CelebA {split}") if progress else paths
        images = torch.stack([_read_face(p, size, root) for p in loop])
        splits.append(ImageSplit(images.float() / 255.0, labels[idx]))
    return ImageData("celeba", splits[0], splits[1], (f"not {attribute}", attribute))
