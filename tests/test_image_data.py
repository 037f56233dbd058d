"""Image loaders on tiny files written in the published SVHN and CelebA formats, plus the bundled digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnostics.datasets import (
    CELEBA_URL,
    SVHN_URL,
    DataError,
    centered_one_hot,
    load_celeba,
    load_dataset,
    load_digits,
    mlp_tensors,
    pixel_map,
)

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
SMILING = CELEBA_ATTRIBUTES.index("Smiling")
MALE = CELEBA_ATTRIBUTES.index("Male")


def write_svhn(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """``train_32x32.mat`` / ``test_32x32.mat`` in the SVHN layout (X: 32x32x3xN uint8, y: Nx1 in 1..10)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        savemat(root / f"{name}_32x32.mat", {"X": X, "y": y})
        arrays[f"X_{name}"], arrays[f"y_{name}"] = X, y
    return arrays


def write_celeba(root: Path, n: int = 16, size: tuple[int, int] = (18, 22)) -> np.ndarray:
    """``img_align_celeba/*.jpg``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt`` in CelebA's layout.

    Image i is a flat colour; Smiling = +1 for every third image, partition: first 10 train, 2 valid, rest test.
    Returns the (n, 40) attribute values."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    values[:, SMILING] = np.where(np.arange(n) % 3 == 0, 1, -1)
    attr_lines, part_lines = [str(n), " ".join(CELEBA_ATTRIBUTES)], []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        colour = (10 * i % 256, 255 - 10 * i % 256, 128)
        Image.new("RGB", size, colour).save(root / "img_align_celeba" / name, quality=95)
        attr_lines.append(f"{name} " + " ".join(f"{v:2d}" for v in values[i]))
        part_lines.append(f"{name} {0 if i < 10 else 1 if i < 12 else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")
    return values


# --------------------------------------------------------------------------------------------- SVHN
def test_svhn_shapes_labels_and_pixel_layout(tmp_path: Path) -> None:
    arrays = write_svhn(tmp_path)
    data = load_dataset("svhn", tmp_path)
    assert data.train.images.shape == (30, 3, 32, 32) and data.test.images.shape == (12, 3, 32, 32)
    assert data.train.images.dtype == torch.float32 and data.num_classes == 10
    assert float(data.train.images.min()) >= 0.0 and float(data.train.images.max()) <= 1.0
    # the loader shuffles: find each image back in the file and check its pixels and label
    X, y = arrays["X_train"], arrays["y_train"].ravel()
    for img, label in zip(data.train.images[:5], data.train.labels[:5]):
        u8 = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (32, 32, 3)
        matches = [n for n in range(X.shape[3]) if np.array_equal(X[..., n], u8)]
        assert len(matches) == 1
        assert int(label) == y[matches[0]] % 10
    assert sorted(data.train.labels.tolist()) == sorted((y % 10).tolist())
    assert 0 in data.train.labels.tolist() and 10 not in data.train.labels.tolist()  # 10 means digit 0


def test_svhn_max_train_subset(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    data = load_dataset("svhn", tmp_path, max_train=7, max_test=5)
    assert len(data.train) == 7 and len(data.test) == 5


def test_svhn_missing_dir_and_files_name_the_files_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as exc:
        load_dataset("svhn", tmp_path / "nope")
    assert "train_32x32.mat" in str(exc.value) and SVHN_URL in str(exc.value)
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="missing .*test_32x32.mat") as exc:
        load_dataset("svhn", tmp_path)
    assert SVHN_URL in str(exc.value)


@pytest.mark.parametrize("problem", ["not_mat", "wrong_shape", "bad_labels", "no_y"])
def test_svhn_malformed_file(tmp_path: Path, problem: str) -> None:
    from scipy.io import savemat

    write_svhn(tmp_path)
    target = tmp_path / "train_32x32.mat"
    if problem == "not_mat":
        target.write_bytes(b"this is not a MATLAB file" * 10)
    elif problem == "wrong_shape":
        savemat(target, {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))})
    elif problem == "bad_labels":
        savemat(target, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.array([[0], [1], [2], [11]])})
    else:
        savemat(target, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(DataError, match="train_32x32.mat") as exc:
        load_dataset("svhn", tmp_path)
    assert SVHN_URL in str(exc.value)


# ------------------------------------------------------------------------------------------- CelebA
def test_celeba_balanced_split_labels_and_resize(tmp_path: Path) -> None:
    values = write_celeba(tmp_path)
    data = load_celeba(tmp_path, attribute="Smiling", size=32)
    # train = images 1..10 (Smiling at 0, 3, 6, 9 -> 4 positives), test = 13..16 (index 12, 15 -> 2 positives)
    assert data.train.images.shape == (8, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.train.labels.sum() == 4 and data.test.labels.sum() == 2
    assert data.classes == ("not Smiling", "Smiling")
    # flat-colour images: recover the index from the red channel and check the label against the file
    for img, label in zip(data.train.images, data.train.labels):
        red = round(float(img[0].mean()) * 255 / 10)
        assert int(label) == int(values[red, SMILING] == 1)
        assert float(img[0].std()) < 0.02  # a flat colour stays flat after crop + resize
    big = load_celeba(tmp_path, size=96, max_train=4)
    assert big.train.images.shape == (4, 3, 96, 96) and big.train.labels.sum() == 2


def test_celeba_attribute_by_name(tmp_path: Path) -> None:
    values = write_celeba(tmp_path)
    data = load_celeba(tmp_path, attribute="Male", size=8)
    for img, label in zip(data.train.images, data.train.labels):
        red = round(float(img[0].mean()) * 255 / 10)
        assert int(label) == int(values[red, MALE] == 1)
    assert data.train.labels.sum() * 2 == len(data.train)
    with pytest.raises(DataError, match="choose one of: .*Smiling"):
        load_celeba(tmp_path, attribute="Smilng")


@pytest.mark.parametrize("problem", ["missing_dir", "no_partition", "count", "value", "image", "jpeg"])
def test_celeba_missing_or_malformed(tmp_path: Path, problem: str) -> None:
    write_celeba(tmp_path)
    attr = tmp_path / "list_attr_celeba.txt"
    root = tmp_path
    expect = "list_attr_celeba.txt"
    if problem == "missing_dir":
        root, expect = tmp_path / "absent", "img_align_celeba"
    elif problem == "no_partition":
        (tmp_path / "list_eval_partition.txt").unlink()
        expect = "missing .*list_eval_partition.txt"
    elif problem == "count":
        lines = attr.read_text().splitlines()
        attr.write_text("\n".join(["99", *lines[1:]]) + "\n")
        expect = "line 1 says 99 images"
    elif problem == "value":
        attr.write_text(attr.read_text().replace(" 1", " 0", 1))
        expect = "values -1/1"
    elif problem == "image":
        (tmp_path / "img_align_celeba" / "000001.jpg").unlink()
        expect = "missing image .*000001.jpg"
    else:
        (tmp_path / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg")
        expect = "000001.jpg is not a readable JPEG"
    with pytest.raises(DataError, match=expect) as exc:
        load_celeba(root, max_train=20)
    assert CELEBA_URL in str(exc.value)


# ------------------------------------------------------------------------------------------- digits
def test_digits_split_and_range() -> None:
    data = load_digits()
    assert len(data.train) + len(data.test) == 1797 and data.image_shape == (1, 8, 8)
    assert set(data.train.labels.tolist()) == set(range(10))
    assert float(data.train.images.min()) == 0.0 and float(data.train.images.max()) == 1.0
    again = load_digits(seed=3)
    # the test set does not depend on the seed (only its order does)
    assert torch.equal(data.test.labels.sort().values, again.test.labels.sort().values)
    assert torch.isclose(data.test.images.sum(), again.test.images.sum())
    assert load_digits(size=16, max_train=5).train.images.shape == (5, 1, 16, 16)


# ------------------------------------------------------------------------------------ preprocessing
def test_mlp_tensors_standardise_with_training_stats(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    data = load_dataset("svhn", tmp_path)
    X, Y, Xt, Yt = mlp_tensors(data)
    assert X.shape == (30, 3 * 32 * 32) and Xt.shape == (12, 3 * 32 * 32)
    per_channel = X.reshape(30, 3, -1).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(3), atol=1e-5, rtol=0)
    # the test set uses the training mean/std
    mean = data.train.images.transpose(0, 1).reshape(3, -1).mean(1)
    std = data.train.images.transpose(0, 1).reshape(3, -1).std(1)
    expected = ((data.test.images - mean[None, :, None, None]) / std[None, :, None, None]).flatten(1)
    torch.testing.assert_close(Xt, expected)
    torch.testing.assert_close(Y.sum(1), torch.zeros(30), atol=1e-6, rtol=0)
    assert torch.equal(Y.argmax(1), data.train.labels)


def test_centered_one_hot_and_pixel_map() -> None:
    Y = centered_one_hot(torch.tensor([0, 2]), 4)
    torch.testing.assert_close(Y, torch.tensor([[0.75, -0.25, -0.25, -0.25], [-0.25, -0.25, 0.75, -0.25]]))
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        centered_one_hot(torch.tensor([4]), 4)
    v = torch.arange(2 * 3 * 4, dtype=torch.float64)  # (channel, row, col) order
    m = pixel_map(v, (2, 3, 4))
    assert m.shape == (3, 4) and m[1, 2] == v[1 * 4 + 2] + v[12 + 1 * 4 + 2]
    with pytest.raises(ValueError, match="do not fit"):
        pixel_map(v, (1, 3, 4))


def test_datasets_and_experiments_import_without_optional_packages_or_slo_torch() -> None:
    """The loaders import scipy, Pillow and scikit-learn only when called; nothing in diagnostics imports slo_torch."""
    code = ("import sys, diagnostics.datasets, diagnostics.experiments; "
            "print(sorted(m for m in ('slo_torch', 'scipy', 'PIL', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
