"""Loaders of CIFAR-10/100 (python and binary), MNIST (idx, .gz), STL-10 (binary) and GTSRB (torchvision layout)
on tiny files written here in each published format, including a tampered pickle that must be refused."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnostics.datasets import (
    CIFAR_URL,
    GTSRB_URL,
    MNIST_URL,
    STL10_URL,
    DataError,
    load_cifar,
    load_dataset,
    load_gtsrb,
    load_mnist,
    load_stl10,
)


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 with bytes written as Python 2 ``str`` opcodes (BINSTRING), as in the published CIFAR batches."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[bytes] = save_bytes


def _dump(obj: object, path: Path, style: str) -> None:
    with open(path, "wb") as fh:
        if style == "py2":
            Py2Pickler(fh, protocol=2).dump(obj)
        else:
            pickle.dump(obj, fh, protocol=int(style))


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar(root: Path, num_classes: int = 10, layout: str = "python", style: str = "py2",
                per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    """CIFAR-10 (5 training batches) or CIFAR-100 (one) in the "python" (pickles) or "binary" layout."""
    rng = np.random.default_rng(num_classes)
    n_batches = 5 if num_classes == 10 else 1
    train = [(_pixels(rng, per_batch), rng.integers(0, num_classes, per_batch)) for _ in range(n_batches)]
    test = (_pixels(rng, n_test), rng.integers(0, num_classes, n_test))
    names = [f"data_batch_{i}" for i in range(1, 6)] if num_classes == 10 else ["train"]
    if layout == "python":
        folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
        folder.mkdir(parents=True, exist_ok=True)
        key = b"labels" if num_classes == 10 else b"fine_labels"
        for name, (x, y) in zip([*names, "test_batch" if num_classes == 10 else "test"], [*train, test]):
            batch = {b"batch_label": b"batch", b"data": x, key: [int(v) for v in y],
                     b"filenames": [b"img_%d.png" % i for i in range(len(y))]}
            if num_classes == 100:
                batch[b"coarse_labels"] = [int(v) // 5 for v in y]
            _dump(batch, folder / name, style)
        meta = {b"label_names": [b"class%d" % i for i in range(10)]} if num_classes == 10 else \
            {b"fine_label_names": [b"fine%d" % i for i in range(100)]}
        _dump(meta, folder / ("batches.meta" if num_classes == 10 else "meta"), style)
    else:
        folder = root / ("cifar-10-batches-bin" if num_classes == 10 else "cifar-100-binary")
        folder.mkdir(parents=True, exist_ok=True)
        for name, (x, y) in zip([*names, "test_batch" if num_classes == 10 else "test"], [*train, test]):
            labels = y[:, None].astype(np.uint8) if num_classes == 10 else \
                np.stack([y // 5, y], axis=1).astype(np.uint8)
            (folder / f"{name}.bin").write_bytes(np.concatenate([labels, x], axis=1).tobytes())
    return {"x_train": np.concatenate([x for x, _ in train]), "y_train": np.concatenate([y for _, y in train]),
            "x_test": test[0], "y_test": test[1]}


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(root: Path, n_train: int = 20, n_test: int = 8, gz: bool = False) -> dict[str, np.ndarray]:
    """The four idx files in ``root/MNIST/raw`` (torchvision's layout), plain or gzipped."""
    rng = np.random.default_rng(3)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = folder / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{path}.gz", "wb") as fh:
                    fh.write(_idx(arr))
            else:
                path.write_bytes(_idx(arr))
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """``stl10_binary/{train,test}_{X,y}.bin``: images (channel, column, row) bytes, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        hwc = np.zeros((n, 96, 96, 3), dtype=np.uint8)
        for i in range(n):  # a horizontal gradient in red, a vertical one in green, a constant blue per image
            hwc[i, :, :, 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
            hwc[i, :, :, 1] = np.linspace(0, 255, 96, dtype=np.uint8)[:, None]
            hwc[i, :, :, 2] = 20 * i
        (folder / f"{split}_X.bin").write_bytes(hwc.transpose(0, 3, 2, 1).tobytes())  # column-major per channel
        y = (np.arange(n) % 10 + 1).astype(np.uint8)
        (folder / f"{split}_y.bin").write_bytes(y.tobytes())
        out[f"x_{split}"], out[f"y_{split}"] = hwc, y
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return out


def write_gtsrb(root: Path, classes: int = 3, per_class: int = 3, n_test: int = 5) -> list[int]:
    """torchvision's GTSRB layout with flat-colour PPMs of varied sizes; image colour (10·class, 40, 200).
    Returns the test ClassIds."""
    from PIL import Image

    base = root / "gtsrb"
    for c in range(classes):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (20 + 7 * i, 25 + 3 * i), (10 * c, 40, 200)).save(folder / f"{c:05d}_{i:05d}.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True, exist_ok=True)
    ids = [i % classes for i in range(n_test)]
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate(ids):
        Image.new("RGB", (31, 40), (10 * c, 40, 200)).save(test_dir / f"{i:05d}.ppm")
        lines.append(f"{i:05d}.ppm;31;40;5;5;26;35;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    return ids


def assert_loaded_as_written(data: object, arrays: dict[str, np.ndarray]) -> None:
    """Each split holds every written image once, pixels in (channel, row, column) order, with its own label."""
    for split in ("train", "test"):
        part = getattr(data, split)
        flat = arrays[f"x_{split}"].reshape(len(part), -1)
        u8 = (part.images * 255).round().to(torch.uint8).flatten(1).numpy()
        rows = [int(np.flatnonzero((flat == row).all(axis=1))[0]) for row in u8]
        assert sorted(rows) == list(range(len(part)))
        assert part.labels.tolist() == [int(arrays[f"y_{split}"][r]) for r in rows]


def assert_data_error(load: Callable[[Path], object], root: Path, expect: str, url: str) -> None:
    """``load(root)`` raises a :class:`DataError` matching ``expect`` that names where the data are published."""
    with pytest.raises(DataError, match=expect) as exc:
        load(root)
    assert url in str(exc.value)


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


# -------------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("num_classes,layout,style", [(10, "python", "py2"), (10, "python", "2"),
                                                      (100, "python", "4"), (10, "binary", ""), (100, "binary", "")])
def test_cifar_layouts_pixels_and_labels(tmp_path: Path, num_classes: int, layout: str, style: str) -> None:
    arrays = write_cifar(tmp_path, num_classes, layout, style)
    data = load_dataset(f"cifar{num_classes}", tmp_path)
    n_train = 20 if num_classes == 10 else 4
    assert data.train.images.shape == (n_train, 3, 32, 32) and data.test.images.shape == (6, 3, 32, 32)
    assert data.num_classes == num_classes and data.name == f"cifar{num_classes}"
    assert_loaded_as_written(data, arrays)
    if layout == "python":
        assert data.classes[1] == ("class1" if num_classes == 10 else "fine1")
    assert len(load_cifar(tmp_path, num_classes, max_train=3, max_test=2).train) == 3


def test_tampered_cifar_pickle_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    # what a malicious file looks like: os.system('touch <marker>') on load
    batch.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR python batch: refused to load the global "
                                        r"os\.system") as exc:
        load_cifar(tmp_path)
    assert CIFAR_URL in str(exc.value) and not marker.exists()
    batch.write_bytes(pickle.dumps({"data": eval}))  # builtins.eval is not admitted either
    with pytest.raises(DataError, match="refused to load the global builtins.eval"):
        load_cifar(tmp_path)


@pytest.mark.parametrize("problem", ["missing_dirs", "missing_batch", "truncated", "wrong_keys", "binary_size"])
def test_cifar_missing_or_malformed(tmp_path: Path, problem: str) -> None:
    layout = "binary" if problem == "binary_size" else "python"
    write_cifar(tmp_path, layout=layout)
    folder = tmp_path / ("cifar-10-batches-bin" if layout == "binary" else "cifar-10-batches-py")
    if problem == "missing_dirs":
        root, expect = tmp_path / "empty", "found neither .*cifar-10-batches-py nor .*cifar-10-batches-bin"
        root.mkdir()
    else:
        root = tmp_path
        if problem == "missing_batch":
            (folder / "test_batch").unlink()
            expect = "missing .*cifar-10-batches-py/test_batch"
        elif problem == "truncated":
            (folder / "data_batch_1").write_bytes((folder / "data_batch_1").read_bytes()[:500])
            expect = "data_batch_1 is not a readable CIFAR python batch"
        elif problem == "wrong_keys":
            _dump({b"pixels": np.zeros((2, 3072), np.uint8)}, folder / "data_batch_2", "2")
            expect = "data_batch_2 must hold a dict with 'data'"
        else:
            (folder / "test_batch.bin").write_bytes(b"\x00" * 3000)
            expect = "test_batch.bin: 3000 bytes is not a whole number of 3073-byte records"
    with pytest.raises(DataError, match=expect) as exc:
        load_cifar(root)
    assert CIFAR_URL in str(exc.value) and "data_batch_1" in str(exc.value)


# -------------------------------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    assert data.train.images.shape == (20, 1, 28, 28) and data.test.images.shape == (8, 1, 28, 28)
    assert_loaded_as_written(data, arrays)


MNIST_DAMAGE = {  # problem: (what is done to MNIST/raw, the error it causes)
    "missing": (lambda raw: (raw / "t10k-labels-idx1-ubyte").unlink(), "missing .*MNIST/raw/t10k-labels-idx1-ubyte"),
    "magic": (lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros((2, 2), np.uint8))),
              "train-labels-idx1-ubyte is not an idx file of unsigned bytes with 1 dimension"),
    "length": (lambda raw: _truncate(raw / "train-images-idx3-ubyte", 10),
               r"train-images-idx3-ubyte: header says \[20, 28, 28\]"),
    "bad_gzip": (lambda raw: (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all"),
                 "train-images-idx3-ubyte.gz is not readable"),
}


@pytest.mark.parametrize("problem", list(MNIST_DAMAGE))
def test_mnist_missing_or_malformed(tmp_path: Path, problem: str) -> None:
    write_mnist(tmp_path, gz=problem == "bad_gzip")
    damage, expect = MNIST_DAMAGE[problem]
    damage(tmp_path / "MNIST" / "raw")
    assert_data_error(load_mnist, tmp_path, expect, MNIST_URL)


# ------------------------------------------------------------------------------------------- STL-10
def test_stl10_column_major_images_resized_and_labels(tmp_path: Path) -> None:
    arrays = write_stl10(tmp_path)
    data = load_stl10(tmp_path)
    assert data.train.images.shape == (6, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.classes[0] == "c0"
    for split in ("train", "test"):
        part = getattr(data, split)
        y = arrays[f"y_{split}"]
        for img, label in zip(part.images, part.labels):
            i = round(float(img[2].mean()) * 255 / 20)  # blue encodes the image index
            assert int(label) == y[i] - 1
            # red grows along columns (x), green along rows (y): the column-major storage was undone
            assert float(img[0, :, -1].mean()) > 0.9 and float(img[0, :, 0].mean()) < 0.1
            assert float(img[1, -1, :].mean()) > 0.9 and float(img[1, 0, :].mean()) < 0.1
            assert float(img[0].std(dim=0).max()) < 1e-6  # red constant down each column


STL10_DAMAGE = {  # problem: (what is done to stl10_binary, the error it causes)
    "missing": (lambda folder: (folder / "test_X.bin").unlink(), "missing .*stl10_binary/test_X.bin"),
    "size": (lambda folder: (folder / "train_y.bin").write_bytes(bytes([1, 2, 3])),
             "train_X.bin .* must hold one 3x96x96 image per label"),
    "labels": (lambda folder: (folder / "train_y.bin").write_bytes(bytes([0] * 6)), "train_y.bin: labels must lie in 1..10"),
}


@pytest.mark.parametrize("problem", list(STL10_DAMAGE))
def test_stl10_missing_or_malformed(tmp_path: Path, problem: str) -> None:
    write_stl10(tmp_path)
    damage, expect = STL10_DAMAGE[problem]
    damage(tmp_path / "stl10_binary")
    assert_data_error(load_stl10, tmp_path, expect, STL10_URL)


# -------------------------------------------------------------------------------------------- GTSRB
def test_gtsrb_torchvision_layout(tmp_path: Path) -> None:
    ids = write_gtsrb(tmp_path)
    data = load_gtsrb(tmp_path)
    assert data.classes == ("00000", "00001", "00002")
    assert data.train.images.shape == (9, 3, 32, 32) and data.test.images.shape == (5, 3, 32, 32)
    for part in (data.train, data.test):
        red = (part.images[:, 0].mean(dim=(1, 2)) * 255 / 10).round().long()
        assert torch.equal(red, part.labels)  # the flat colour encodes the class
    assert sorted(data.test.labels.tolist()) == sorted(ids)
    assert sorted(data.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(load_gtsrb(tmp_path, max_train=4).train) == 4


@pytest.mark.parametrize("problem", ["no_csv", "bad_class", "bad_image", "missing_image"])
def test_gtsrb_missing_or_malformed(tmp_path: Path, problem: str) -> None:
    write_gtsrb(tmp_path)
    base = tmp_path / "gtsrb"
    csv_path = base / "GT-final_test.csv"
    if problem == "no_csv":
        csv_path.unlink()
        expect = "missing .*gtsrb/GT-final_test.csv"
    elif problem == "bad_class":
        csv_path.write_text(csv_path.read_text().replace(";2\n", ";7\n"))
        expect = "ClassId '7' has no class folder"
    elif problem == "bad_image":
        (base / "GTSRB" / "Training" / "00001" / "00001_00000.ppm").write_bytes(b"P6 garbage")
        expect = "00001_00000.ppm is not a readable image"
    else:
        (base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm").unlink()
        expect = "missing image .*Final_Test/Images/00000.ppm"
    assert_data_error(load_gtsrb, tmp_path, expect, GTSRB_URL)


def test_dataset_names_and_fixed_sizes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--dataset stl10 needs --data-dir DIR. STL-10 needs DIR/stl10_binary"):
        load_dataset("stl10")
    with pytest.raises(ValueError, match="mnist images are loaded at 28x28"):
        load_dataset("mnist", tmp_path, image_size=32)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("gtsrb", tmp_path / "absent")
