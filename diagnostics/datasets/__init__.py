"""Data sets for NFA experiments: image data sets in their published formats, read from a local folder (no download,
no torchvision), and the synthetic chain-monomial task.

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
expected and where they are published. :func:`mlp_tensors` then gives the MLP inputs and targets. The loaders import their optional
packages (scipy, Pillow, scikit-learn: the ``examples`` extra) only when called.

- Chain monomial: ``x ~ N(0, I_d)``, ``f*(x) = sum_{i=1}^{r} x_i x_{i+1}`` (:func:`chain_monomial_data`).
"""

from .celeba import CELEBA_URL, load_celeba
from .cifar import CIFAR_URL, load_cifar
from .core import DataError, ImageData, ImageSplit
from .digits import load_digits
from .gtsrb import GTSRB_URL, load_gtsrb
from .mnist import MNIST_URL, load_mnist
from .preprocess import centered_one_hot, channel_stats, mlp_tensors, pixel_map, standardize
from .registry import DATASET_MODULES, DATASETS, NATIVE_SIZE, load_dataset
from .stl10 import STL10_URL, load_stl10
from .svhn import SVHN_URL, load_svhn
from .synthetic import chain_monomial, chain_monomial_data

__all__ = [
    "DataError",
    "ImageSplit",
    "ImageData",
    "SVHN_URL",
    "CELEBA_URL",
    "CIFAR_URL",
    "MNIST_URL",
    "STL10_URL",
    "GTSRB_URL",
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
    "chain_monomial",
    "chain_monomial_data",
]
