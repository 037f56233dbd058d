"""Deprecated: the image loaders are public API now, in ``diagnostics.datasets`` (same names)."""

from __future__ import annotations

import warnings

from diagnostics.datasets import *  # noqa: F401,F403
from diagnostics.datasets import __all__  # noqa: F401
from diagnostics.datasets.celeba import CELEBA_ATTR, CELEBA_IMAGES, CELEBA_PARTITION, CELEBA_SPLITS  # noqa: F401
from diagnostics.datasets.mnist import MNIST_FILES  # noqa: F401
from diagnostics.datasets.svhn import SVHN_FILES  # noqa: F401
from diagnostics.optional import require  # noqa: F401

warnings.warn("examples/image_data.py is deprecated: import from diagnostics.datasets instead", DeprecationWarning,
              stacklevel=2)
