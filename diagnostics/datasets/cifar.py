"""CIFAR-10 / CIFAR-100 in the "python" layout (read with a restricted unpickler) or the binary layout."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .core import DataError, ImageData, check_limit, image_split, label_names, read_bytes, require_dir

__all__ = ["CIFAR_URL", "load_cifar", "cifar_help"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def cifar_help(data_dir: Path, num_classes: int) -> str:
    """Where CIFAR-10/100's batches go under ``data_dir`` and where they are published (for error messages)."""
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

    obj = _restricted_unpickle(path, read_bytes(path, help_text), help_text)
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
    raw = read_bytes(path, help_text)
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
    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
    root = require_dir(data_dir, lambda p: cifar_help(p, num_classes))
    help_text = cifar_help(root, num_classes)
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
            obj = _restricted_unpickle(meta, read_bytes(meta, help_text), help_text)
            names = obj.get(key, obj.get(key.encode())) if isinstance(obj, dict) else None
            if isinstance(names, list) and len(names) == num_classes:
                classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    elif binary.is_dir():
        label_bytes = 1 if num_classes == 10 else 2
        parts = [[_cifar_binary_file(binary / f"{n}.bin", label_bytes, help_text) for n in names]
                 for names in (train_names, test_names)]
        classes = label_names(binary / ("batches.meta.txt" if num_classes == 10 else "fine_label_names.txt"),
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
        splits.append(image_split(images, labels, limit, g, 32))
    return ImageData(f"cifar{num_classes}", splits[0], splits[1], classes)
