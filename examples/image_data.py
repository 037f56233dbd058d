"""Image data sets in their published formats, read from a local folder (no download, no torchvision).

- SVHN (cropped digits): ``train_32x32.mat`` and ``test_32x32.mat``, MATLAB v5 files with ``X`` of shape
  (32, 32, 3, N), uint8, and ``y`` of shape (N, 1) with labels 1..10, where 10 means the digit 0.
- CelebA (aligned): ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` (line 1: number of images;
  line 2: the attribute names; then ``000001.jpg -1 1 ...`` with values -1/1) and
  ``list_eval_partition.txt`` (``000001.jpg 0`` with 0 = train, 1 = valid, 2 = test). One binary
  attribute is the label; both classes are balanced by subsampling the larger one.
- CIFAR-10 / CIFAR-100: the "python" layout (``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5``,
  ``test_batch``; ``cifar-100-python/train``, ``test``: pickled dicts with ``data`` (N, 3072) uint8 in
  (channel, row, column) order and ``labels`` / ``fine_labels``), read with a restricted unpickler that
  admits only NumPy's array reconstruction, or the binary layout (``cifar-10-batches-bin/*.bin``: records of
  1 label byte + 3072 pixel bytes; ``cifar-100-binary/*.bin``: coarse and fine label bytes + 3072).
- MNIST: the idx files as torchvision stores them (``MNIST/raw/train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-*``), plain or ``.gz``; 28x28, one channel.
- STL-10: ``stl10_binary/train_X.bin`` (N x 3 x 96 x 96 uint8, each image column-major), ``train_y.bin``
  (labels 1..10), ``test_X.bin``, ``test_y.bin``; resized to 32x32 (bilinear, antialiased).
- GTSRB as torchvision lays it out: ``gtsrb/GTSRB/Training/<class>/*.ppm`` (class folders ``00000`` ...),
  ``gtsrb/GTSRB/Final_Test/Images/*.ppm`` and ``gtsrb/GT-final_test.csv`` (``;``-separated, columns
  ``Filename`` and ``ClassId``); every image resized to 32x32.
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

from common import require

__all__ = [
    "DataError",
    "ImageSplit",
    "ImageData",
    "SVHN_URL",
    "CELEBA_URL",
    "load_svhn",
    "load_celeba",
    "load_digits",
    "load_cifar",
    "load_mnist",
    "load_stl10",
    "load_gtsrb",
    "DATASETS",
    "NATIVE_SIZE",
    "load_dataset",
    "DATASET_MODULES",
    "channel_stats",
    "standardize",
    "centered_one_hot",
    "mlp_tensors",
    "pixel_map",
]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (or torchvision.datasets.MNIST(root, download=True))"
STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
GTSRB_URL = ("https://benchmark.ini.rub.de/gtsrb_dataset.html (or torchvision.datasets.GTSRB(root, "
             "download=True))")
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

    loadmat, MatReadError = require("scipy.io").loadmat, require("scipy.io.matlab").MatReadError

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


# -------------------------------------------------------------------------------------- shared readers
def _resize(images: Tensor, size: int) -> Tensor:
    """(n, c, h, w) uint8 -> (n, c, size, size) float32 in [0, 1] (bilinear, antialiased; a copy if the size fits),
    in blocks of 1000 images to bound memory."""
    if images.shape[-2:] == (size, size):
        return images.float() / 255.0
    out = [torch.nn.functional.interpolate(part.float() / 255.0, size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True).clamp_(0.0, 1.0)
           for part in images.split(1000)]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size), dtype=torch.float32)


def _split(images: Tensor, labels: Tensor, limit: int | None, generator: torch.Generator, size: int) -> ImageSplit:
    """A random subset (all images, shuffled, when ``limit`` is None) of uint8 images, as an :class:`ImageSplit`."""
    idx = _subset(labels.shape[0], limit, generator)
    return ImageSplit(_resize(images[idx], size), labels[idx].long())


def _read_bytes(path: Path, help_text: str) -> bytes:
    """The file's bytes (gunzipped for ``*.gz``); a missing or unreadable file is a :class:`DataError`."""
    import gzip

    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"missing {path}. {help_text}.") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is not readable ({exc}). {help_text}.") from exc


def _label_names(path: Path, count: int) -> tuple[str, ...]:
    """Class names, one per line of ``path`` when it exists and has ``count`` names, else ``"0"``, ``"1"``, ..."""
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        names = [n for n in names if n]
        if len(names) == count:
            return tuple(names)
    return tuple(str(i) for i in range(count))


# -------------------------------------------------------------------------------------------- CIFAR
def _cifar_help(data_dir: Path, num_classes: int) -> str:
    if num_classes == 10:
        py, binary = data_dir / "cifar-10-batches-py", data_dir / "cifar-10-batches-bin"
        files = f"{py}/data_batch_1 ... data_batch_5 and {py}/test_batch, or {binary}/data_batch_1.bin ... " \
                f"data_batch_5.bin and {binary}/test_batch.bin"
    else:
        py, binary = data_dir / "cifar-100-python", data_dir / "cifar-100-binary"
        files = f"{py}/train and {py}/test, or {binary}/train.bin and {binary}/test.bin"
    return (f"CIFAR-{num_classes} needs {files} (the 'python version' or 'binary version' archive, unpacked in "
            f"--data-dir), published at {CIFAR_URL}")


def _restricted_unpickle(path: Path, data: bytes, help_text: str) -> object:
    """Unpickle ``data`` resolving only the globals a pickled dict of NumPy arrays needs (NumPy's array
    reconstruction, ``numpy.dtype``, and ``_codecs.encode`` / ``bytearray`` for bytes written by Python 3 at
    protocol 2); any other global (``os.system``, ``builtins.eval``, ...) is refused, so a file cannot run code."""
    import codecs
    import io
    import pickle

    import numpy as np

    allowed = {  # name -> (object, the modules it may be looked up in)
        "_reconstruct": (np.ndarray.__reduce__(np.empty(0))[0], ("numpy.core.multiarray", "numpy._core.multiarray")),
        "_frombuffer": (np.empty(1).__reduce_ex__(5)[0], ("numpy.core.numeric", "numpy._core.numeric")),
        "ndarray": (np.ndarray, ("numpy",)),
        "dtype": (np.dtype, ("numpy",)),
        "encode": (codecs.encode, ("_codecs",)),
        "bytearray": (bytearray, ("builtins", "__builtin__")),
    }

    class Refused(pickle.UnpicklingError):
        pass

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            obj, modules = allowed.get(name, (None, ()))
            if module not in modules:
                raise Refused(f"refused to load the global {module}.{name}")
            return obj

    try:
        return Restricted(io.BytesIO(data), encoding="latin1").load()
    except Refused as exc:
        raise DataError(f"{path} is not a CIFAR python batch: {exc} (only NumPy arrays, lists, numbers and strings "
                        f"are accepted). {help_text}.") from exc
    except Exception as exc:  # truncated or garbage bytes raise many exception types inside pickle
        raise DataError(f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}). "
                        f"{help_text}.") from exc


def _cifar_python_file(path: Path, label_key: str, help_text: str) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one pickled CIFAR batch."""
    import numpy as np

    obj = _restricted_unpickle(path, _read_bytes(path, help_text), help_text)
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()} \
        if isinstance(obj, dict) else {}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path} must hold a dict with 'data' (an array) and {label_key!r}; found keys "
                        f"{sorted(batch) if batch else type(obj).__name__}. {help_text}.")
    labels = np.asarray(labels).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: 'data' must be (N, 3072) uint8 with N labels, got {data.shape} {data.dtype} and "
                        f"{labels.shape[0]} labels. {help_text}.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def _cifar_binary_file(path: Path, label_bytes: int, help_text: str) -> tuple[Tensor, Tensor]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one CIFAR binary file: records of ``label_bytes`` label
    bytes (CIFAR-100: coarse, fine; the last one is used) and 3072 pixel bytes."""
    raw = _read_bytes(path, help_text)
    record = label_bytes + 3072
    if not raw or len(raw) % record:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte records. {help_text}.")
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).clone(), rows[:, label_bytes - 1].long()


def load_cifar(
    data_dir: str | Path, num_classes: int = 10, max_train: int | None = None, max_test: int | None = None,
    seed: int = 0,
) -> ImageData:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (fine labels) from the "python" layout (restricted
    unpickler) or, if that folder is absent, the binary layout; 32x32 RGB. ``max_*``: random subsets."""
    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
    root = _require_dir(data_dir, lambda p: _cifar_help(p, num_classes))
    help_text = _cifar_help(root, num_classes)
    if num_classes == 10:
        py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
        train_names, test_names = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    else:
        py, binary = root / "cifar-100-python", root / "cifar-100-binary"
        train_names, test_names = ["train"], ["test"]
    if py.is_dir():
        label_key = "labels" if num_classes == 10 else "fine_labels"
        parts = [[_cifar_python_file(py / n, label_key, help_text) for n in names]
                 for names in (train_names, test_names)]
        meta, key = (py / "batches.meta", "label_names") if num_classes == 10 else (py / "meta", "fine_label_names")
        classes = tuple(str(i) for i in range(num_classes))
        if meta.is_file():
            obj = _restricted_unpickle(meta, _read_bytes(meta, help_text), help_text)
            names = obj.get(key, obj.get(key.encode())) if isinstance(obj, dict) else None
            if isinstance(names, list) and len(names) == num_classes:
                classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    elif binary.is_dir():
        label_bytes = 1 if num_classes == 10 else 2
        parts = [[_cifar_binary_file(binary / f"{n}.bin", label_bytes, help_text) for n in names]
                 for names in (train_names, test_names)]
        classes = _label_names(binary / ("batches.meta.txt" if num_classes == 10 else "fine_label_names.txt"),
                               num_classes)
    else:
        raise DataError(f"found neither {py} nor {binary}. {help_text}.")
    g = torch.Generator().manual_seed(seed)
    splits = []
    for batches, limit in zip(parts, (max_train, max_test)):
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(f"CIFAR-{num_classes} labels must lie in 0..{num_classes - 1}, got "
                            f"{int(labels.min())}..{int(labels.max())}. {help_text}.")
        splits.append(_split(images, labels, limit, g, 32))
    return ImageData(f"cifar{num_classes}", splits[0], splits[1], classes)


# -------------------------------------------------------------------------------------------- MNIST
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _mnist_help(data_dir: Path) -> str:
    raw = data_dir / "MNIST" / "raw"
    names = ", ".join(n for pair in MNIST_FILES.values() for n in pair)
    return (f"MNIST needs the four idx files {names} (plain or .gz) in {raw} (torchvision's layout) or in "
            f"{data_dir}; published at {MNIST_URL}")


def _read_idx(path: Path, ndim: int, help_text: str) -> Tensor:
    """An idx file of unsigned bytes (magic ``0x0000 08 ndim``, big-endian int32 sizes, then the data)."""
    raw = _read_bytes(path, help_text)
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
    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    root = _require_dir(data_dir, _mnist_help)
    help_text = _mnist_help(root)

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
        splits.append(_split(images[:, None], labels, limit, g, 28))
    return ImageData("mnist", splits[0], splits[1], tuple(str(i) for i in range(10)))


# ------------------------------------------------------------------------------------------- STL-10
def _stl10_help(data_dir: Path) -> str:
    folder = data_dir / "stl10_binary"
    return (f"STL-10 needs {folder}/train_X.bin, train_y.bin, test_X.bin and test_y.bin (the binary archive "
            f"stl10_binary.tar.gz unpacked in --data-dir), published at {STL10_URL}")


def load_stl10(
    data_dir: str | Path, max_train: int | None = None, max_test: int | None = None, seed: int = 0
) -> ImageData:
    """STL-10's labelled splits (5000 train, 8000 test, labels 1..10 mapped to 0..9; the unlabelled set is not
    used), 96x96 RGB stored column-major, resized to 32x32 (bilinear, antialiased)."""
    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    root = _require_dir(data_dir, _stl10_help)
    help_text = _stl10_help(root)
    folder = root / "stl10_binary"
    g = torch.Generator().manual_seed(seed)
    splits = []
    for split, limit in (("train", max_train), ("test", max_test)):
        raw_x = _read_bytes(folder / f"{split}_X.bin", help_text)
        raw_y = _read_bytes(folder / f"{split}_y.bin", help_text)
        per_image = 3 * 96 * 96
        if not raw_x or len(raw_x) % per_image or len(raw_x) // per_image != len(raw_y):
            raise DataError(f"{folder / f'{split}_X.bin'} ({len(raw_x)} bytes) must hold one 3x96x96 image per label "
                            f"of {folder / f'{split}_y.bin'} ({len(raw_y)} labels). {help_text}.")
        labels = torch.frombuffer(bytearray(raw_y), dtype=torch.uint8).long()
        if int(labels.min()) < 1 or int(labels.max()) > 10:
            raise DataError(f"{folder / f'{split}_y.bin'}: labels must lie in 1..10, got "
                            f"{int(labels.min())}..{int(labels.max())}. {help_text}.")
        images = torch.frombuffer(bytearray(raw_x), dtype=torch.uint8).reshape(-1, 3, 96, 96).transpose(2, 3)
        splits.append(_split(images, labels - 1, limit, g, 32))
    return ImageData("stl10", splits[0], splits[1], _label_names(folder / "class_names.txt", 10))


# -------------------------------------------------------------------------------------------- GTSRB
def _gtsrb_help(data_dir: Path) -> str:
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

    _check_limit("max_train", max_train)
    _check_limit("max_test", max_test)
    root = _require_dir(data_dir, _gtsrb_help)
    help_text = _gtsrb_help(root)
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
        picked = [items[i] for i in _subset(len(items), limit, g).tolist()]
        loop = progress(picked, desc=f"GTSRB {split}") if progress else picked
        images = torch.stack([_read_image(p, 32, help_text) for p, _ in loop]) if picked else \
            torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
        splits.append(ImageSplit(images.float() / 255.0, torch.tensor([c for _, c in picked], dtype=torch.int64)))
    return ImageData("gtsrb", splits[0], splits[1], classes)


# ------------------------------------------------------------------------------------------- digits
def load_digits(
    size: int = 8, test_fraction: float = 0.25, max_train: int | None = None, max_test: int | None = None,
    seed: int = 0,
) -> ImageData:
    """scikit-learn's 8x8 digits (grey levels 0..16 scaled to [0, 1]); a fixed random split (always drawn
    with seed 0, so every run sees the same test set) and, with ``max_*``, a random subset drawn with
    ``seed``; ``size > 8`` upsamples bilinearly (adds no information)."""
    sk_digits = require("sklearn.datasets").load_digits

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


#: Data sets :func:`load_dataset` knows, and whether they need ``data_dir``.
DATASETS = ("svhn", "celeba", "cifar10", "cifar100", "mnist", "stl10", "gtsrb", "digits")
_HELP = {"svhn": _svhn_help, "celeba": _celeba_help, "cifar10": lambda p: _cifar_help(p, 10),
         "cifar100": lambda p: _cifar_help(p, 100), "mnist": _mnist_help, "stl10": _stl10_help, "gtsrb": _gtsrb_help}
#: Image side length of each data set as loaded (CelebA and digits take ``image_size``).
NATIVE_SIZE = {"svhn": 32, "cifar10": 32, "cifar100": 32, "mnist": 28, "stl10": 32, "gtsrb": 32}
#: The optional package each data set's loader needs (``examples`` extra); the others need only numpy.
DATASET_MODULES = {"svhn": "scipy.io", "celeba": "PIL.Image", "gtsrb": "PIL.Image", "digits": "sklearn.datasets"}


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
    """Dispatch to the loader of ``name`` (one of :data:`DATASETS`). ``image_size`` applies to CelebA and digits;
    the others have a fixed size (:data:`NATIVE_SIZE`: 32x32, MNIST 28x28)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits(size=image_size or 8, max_train=max_train, max_test=max_test, seed=seed)
    if data_dir is None:
        raise DataError(f"--dataset {name} needs --data-dir DIR. {_HELP[name](Path('DIR'))}.")
    if name in NATIVE_SIZE and image_size not in (None, NATIVE_SIZE[name]):
        size = NATIVE_SIZE[name]
        raise ValueError(f"{name} images are loaded at {size}x{size}; got image_size={image_size}")
    limits = dict(max_train=max_train, max_test=max_test, seed=seed)
    if name == "svhn":
        return load_svhn(data_dir, **limits)
    if name == "celeba":
        return load_celeba(data_dir, attribute=attribute, size=image_size or 32, progress=progress, **limits)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_dir, num_classes=int(name[5:]), **limits)
    if name == "mnist":
        return load_mnist(data_dir, **limits)
    if name == "stl10":
        return load_stl10(data_dir, **limits)
    return load_gtsrb(data_dir, progress=progress, **limits)


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
