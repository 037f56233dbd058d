"""Image data sets in their published formats, read from a local folder (no download, no torchvision).

- SVHN (cropped digits): ``train_32x32.mat`` and ``test_32x32.mat``, MATLAB v5 files with ``X`` of shape
  (32, 32, 3, N), uint8, and ``y`` of shape (N, 1) with labels 1..10, where 10 means the digit 0.
- CelebA (aligned): ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` (line 1: number of images;
  line 2: the attribute names; then ``000001.jpg -1 1 ...`` with values -1/1) and
  ``list_eval_partition.txt`` (``000001.jpg 0`` with 0 = train, 1 = valid, 2 = test). One binary
  attribute is the label; both classes are balanced by subsampling the larger one.
- Digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels), no files needed.

Every loader returns an :class:`ImageData` of float images in ``[0, 1]``, shape ``(n, c, h, w)``, and
int64 labels. A missing or malformed folder raises :class:`DataError`, whose message names the files
expected and where they are published. :func:`mlp_tensors` then gives the MLP inputs and targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "ImageSplit",
    "ImageData",
    "SVHN_URL",
    "CELEBA_URL",
    "load_svhn",
    "load_celeba",
    "load_digits",
    "load_dataset",
    "channel_stats",
    "standardize",
    "centered_one_hot",
    "mlp_tensors",
    "pixel_map",
]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTR = "list_attr_celeba.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


class DataError(ValueError):
    """A data folder is missing, incomplete or not in the published format."""


@dataclass(frozen=True)
class ImageSplit:
    """``images``: (n, c, h, w) float32 in [0, 1]; ``labels``: (n,) int64 class indices."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageData:
    """A train and a test split and the class names (``classes[i]`` is label ``i``)."""

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ helpers
def _svhn_help(data_dir: Path) -> str:
    return (f"SVHN needs {data_dir / SVHN_FILES[0]} and {data_dir / SVHN_FILES[1]} (the 'Format 2: cropped "
            f"digits' MATLAB files, X: 32x32x3xN uint8, y: Nx1 with labels 1..10), published at {SVHN_URL}")


def _celeba_help(data_dir: Path) -> str:
    return (f"CelebA needs {data_dir / CELEBA_IMAGES}/ (the aligned-and-cropped JPEGs 000001.jpg ...), "
            f"{data_dir / CELEBA_ATTR} and {data_dir / CELEBA_PARTITION} (from the 'Anno' and 'Eval' folders), "
            f"published at {CELEBA_URL}")


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None (all), got {value!r}")


def _subset(n: int, limit: int | None, generator: torch.Generator) -> Tensor:
    """A random order of ``range(n)``, cut to ``limit`` entries when given."""
    order = torch.randperm(n, generator=generator)
    return order if limit is None else order[:limit]


def _require_dir(data_dir: str | Path, help_text: Callable[[Path], str]) -> Path:
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist. {help_text(path)}.")
    return path


# --------------------------------------------------------------------------------------------- SVHN
def _read_svhn_file(path: Path, data_dir: Path) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64 with 10 -> 0) from one SVHN ``.mat`` file."""
    import numpy as np
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError, KeyError) as exc:  # scipy's read errors
        raise DataError(f"{path} is not a readable MATLAB v5 file ({exc}). {_svhn_help(data_dir)}.") from exc
    X, y = mat.get("X"), mat.get("y")
    if X is None or y is None:
        raise DataError(f"{path} lacks the variable(s) {[k for k in ('X', 'y') if mat.get(k) is None]}. "
                        f"{_svhn_help(data_dir)}.")
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise DataError(f"{path}: X must be 32x32x3xN uint8, got shape {X.shape} dtype {X.dtype}. "
                        f"{_svhn_help(data_dir)}.")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != X.shape[3]:
        raise DataError(f"{path}: y has {y.shape[0]} labels for {X.shape[3]} images. {_svhn_help(data_dir)}.")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10 (10 = digit 0), got {y.min()}..{y.max()}. "
                        f"{_svhn_help(data_dir)}.")
    images = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))  # (N, 3, 32, 32)
    labels = torch.from_numpy(y.astype(np.int64)) % 10
    return images, labels


def load_svhn(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> ImageData:
    """SVHN from ``train_32x32.mat`` / ``test_32x32.mat``: label ``y % 10`` (the file's 10 is digit 0);
    ``max_train`` / ``max_test`` keep a random subset (drawn with ``seed``)."""
    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    root = _require_dir(data_dir, _svhn_help)
    missing = [f for f in SVHN_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(f"missing {', '.join(str(root / f) for f in missing)}. {_svhn_help(root)}.")
    g = torch.Generator().manual_seed(seed)
    splits = []
    for fname, limit in zip(SVHN_FILES, (max_train, max_test)):
        images, labels = _read_svhn_file(root / fname, root)
        idx = _subset(labels.shape[0], limit, g)
        splits.append(ImageSplit(images[idx].float() / 255.0, labels[idx]))
    return ImageData("svhn", splits[0], splits[1], tuple(str(i) for i in range(10)))


# ------------------------------------------------------------------------------------------- CelebA
def _read_attributes(path: Path, data_dir: Path) -> tuple[list[str], list[str], Tensor]:
    """(attribute names, file names, values (n_images, n_attributes) int8 in {-1, 1}) of ``list_attr_celeba.txt``."""
    bad = f"{path} is not in CelebA's list_attr_celeba.txt layout"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if len(lines) < 2:
        raise DataError(f"{bad}: need a count line, a line of attribute names, then one line per image. "
                        f"{_celeba_help(data_dir)}.")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{bad}: line 1 must be the number of images, got {lines[0][:60]!r}. "
                        f"{_celeba_help(data_dir)}.") from None
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    if not names or len(rows) != count:
        raise DataError(f"{bad}: line 1 says {count} images, found {len(rows)} image lines and {len(names)} "
                        f"attribute names. {_celeba_help(data_dir)}.")
    files, values = [], []
    for lineno, parts in enumerate(rows, start=3):
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DataError(f"{bad}: line {lineno} must be a file name and {len(names)} values -1/1, got "
                            f"{' '.join(parts)[:80]!r}. {_celeba_help(data_dir)}.")
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
                            f"'<file>.jpg 0|1|2', got {line[:80]!r}. {_celeba_help(data_dir)}.")
        out[parts[0]] = int(parts[1])
    return out


def _read_face(path: Path, size: int, data_dir: Path) -> Tensor:
    """One aligned CelebA JPEG: centre-cropped to a square, resized to ``size``, (3, size, size) uint8."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"missing image {path} (listed in {CELEBA_ATTR}). {_celeba_help(data_dir)}.") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} is not a readable JPEG ({exc}). {_celeba_help(data_dir)}.") from exc
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
    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (32 or 96), got {size!r}")
    root = _require_dir(data_dir, _celeba_help)
    expected = [root / CELEBA_IMAGES, root / CELEBA_ATTR, root / CELEBA_PARTITION]
    missing = [p for p in expected if not (p.is_dir() if p.name == CELEBA_IMAGES else p.is_file())]
    if missing:
        raise DataError(f"missing {', '.join(map(str, missing))}. {_celeba_help(root)}.")
    names, files, values = _read_attributes(root / CELEBA_ATTR, root)
    if attribute not in names:
        raise DataError(f"attribute {attribute!r} is not in {root / CELEBA_ATTR}; choose one of: {', '.join(names)}")
    partition = _read_partition(root / CELEBA_PARTITION, root)
    unlisted = [f for f in files if f not in partition]
    if unlisted:
        raise DataError(f"{root / CELEBA_PARTITION} has no split for {len(unlisted)} image(s) of {CELEBA_ATTR}, "
                        f"e.g. {unlisted[0]}. {_celeba_help(root)}.")
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


# ------------------------------------------------------------------------------------------- digits
def load_digits(
    size: int = 8, test_fraction: float = 0.25, max_train: int | None = None, max_test: int | None = None,
    seed: int = 0,
) -> ImageData:
    """scikit-learn's 8x8 digits (grey levels 0..16 scaled to [0, 1]); a fixed random split (always drawn
    with seed 0, so every run sees the same test set) and, with ``max_*``, a random subset drawn with
    ``seed``; ``size > 8`` upsamples bilinearly (adds no information)."""
    from sklearn.datasets import load_digits as sk_digits

    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (8 keeps the original resolution), got {size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    bunch = sk_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * len(labels)))
    g = torch.Generator().manual_seed(seed)
    parts = []
    for rows, limit in ((order[n_test:], max_train), (order[:n_test], max_test)):
        rows = rows[_subset(len(rows), limit, g)]
        parts.append(ImageSplit(images[rows].contiguous(), labels[rows]))
    return ImageData("digits", parts[0], parts[1], tuple(str(i) for i in range(10)))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    attribute: str = "Smiling",
    image_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
) -> ImageData:
    """Dispatch to :func:`load_svhn`, :func:`load_celeba` or :func:`load_digits` by ``name``."""
    if name == "digits":
        return load_digits(size=image_size or 8, max_train=max_train, max_test=max_test, seed=seed)
    if data_dir is None:
        raise DataError(f"--dataset {name} needs --data-dir DIR. "
                        + (_svhn_help(Path("DIR")) if name == "svhn" else _celeba_help(Path("DIR"))) + ".")
    if name == "svhn":
        if image_size not in (None, 32):
            raise ValueError(f"SVHN images are 32x32; got image_size={image_size}")
        return load_svhn(data_dir, max_train=max_train, max_test=max_test, seed=seed)
    if name == "celeba":
        return load_celeba(data_dir, attribute=attribute, size=image_size or 32, max_train=max_train,
                           max_test=max_test, seed=seed, progress=progress)
    raise ValueError(f"unknown dataset {name!r}; use 'svhn', 'celeba' or 'digits'")


# ------------------------------------------------------------------------------------ preprocessing
def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation over samples and pixels of (n, c, h, w) images, each (c,)."""
    if images.ndim != 4:
        raise ValueError(f"channel_stats: expected (n, c, h, w) images, got shape {tuple(images.shape)}")
    flat = images.transpose(0, 1).reshape(images.shape[1], -1)
    return flat.mean(dim=1), flat.std(dim=1)


def standardize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x[:, c] - mean[c]) / std[c]`` per channel (a channel with zero spread is only centred)."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return (images - mean[None, :, None, None]) / safe[None, :, None, None]


def centered_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Targets ``y = e_label - 1/C`` (one-hot minus ``1/C``), shape (n, C)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"centered_one_hot: labels must lie in 0..{num_classes - 1}, got "
                         f"{int(labels.min())}..{int(labels.max())}")
    return torch.nn.functional.one_hot(labels, num_classes).float() - 1.0 / num_classes


def mlp_tensors(data: ImageData) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, Y_train, X_test, Y_test)`` for an MLP: images standardised per channel with the training
    mean/std, flattened in (channel, row, column) order; targets from :func:`centered_one_hot`."""
    mean, std = channel_stats(data.train.images)
    out = []
    for split in (data.train, data.test):
        out.append(standardize(split.images, mean, std).flatten(1))
        out.append(centered_one_hot(split.labels, data.num_classes))
    return out[0], out[1], out[2], out[3]


def pixel_map(diagonal: Tensor, image_shape: Sequence[int]) -> Tensor:
    """A per-input-feature vector (e.g. the NFM diagonal ``diag(W_1^T W_1)``) as an (h, w) image, summed over
    channels: ``M[i, j] = sum_c v[c, i, j]`` (inputs flattened in (channel, row, column) order)."""
    c, h, w = image_shape
    if diagonal.numel() != c * h * w:
        raise ValueError(f"pixel_map: {diagonal.numel()} values do not fit an image of shape {tuple(image_shape)}")
    return diagonal.reshape(c, h, w).sum(dim=0)
