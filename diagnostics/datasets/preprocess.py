"""From loaded images to network inputs and targets, and a per-pixel vector back to an image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .core import ImageData

__all__ = ["channel_stats", "standardize", "centered_one_hot", "mlp_tensors", "pixel_map"]


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
