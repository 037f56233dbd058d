"""One entry point for every image data set: :func:`load_dataset` by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .celeba import load_celeba, celeba_help
from .cifar import load_cifar, cifar_help
from .core import DataError, ImageData
from .digits import load_digits
from .gtsrb import load_gtsrb, gtsrb_help
from .mnist import load_mnist, mnist_help
from .stl10 import load_stl10, stl10_help
from .svhn import load_svhn, svhn_help

__all__ = ["DATASETS", "NATIVE_SIZE", "DATASET_MODULES", "load_dataset"]

#: Data sets :func:`load_dataset` knows, and whether they need ``data_dir``.
DATASETS = ("svhn", "celeba", "cifar10", "cifar100", "mnist", "stl10", "gtsrb", "digits")
_HELP = {"svhn": svhn_help, "celeba": celeba_help, "cifar10": lambda p: cifar_help(p, 10),
         "cifar100": lambda p: cifar_help(p, 100), "mnist": mnist_help, "stl10": stl10_help, "gtsrb": gtsrb_help}
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
