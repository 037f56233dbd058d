"""scikit-learn's bundled 8x8 handwritten digits (no files needed)."""

from __future__ import annotations

import torch

from ..optional import require
from .core import ImageData, ImageSplit, check_limit, random_subset

__all__ = ["load_digits"]


def load_digits(
    size: int = 8, test_fraction: float = 0.25, max_train: int | None = None, max_test: int | None = None,
    seed: int = 0,
) -> ImageData:
    """scikit-learn's 8x8 digits (grey levels 0..16 scaled to [0, 1]); a fixed random split (always drawn
    with seed 0, so every run sees the same test set) and, with ``max_*``, a random subset drawn with
    ``seed``; ``size > 8`` upsamples bilinearly (adds no information)."""
    sk_digits = require("sklearn.datasets").load_digits

    check_limit("max_train", max_train)
    check_limit("max_test", max_test)
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
        rows = rows[random_subset(len(rows), limit, g)]
        parts.append(ImageSplit(images[rows].contiguous(), labels[rows]))
    return ImageData("digits", parts[0], parts[1], tuple(str(i) for i in range(10)))
