"""The containers every image loader returns, its error type and the readers the loaders share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DataError", "ImageSplit", "ImageData"]


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


def check_limit(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None (all), got {value!r}")


def random_subset(n: int, limit: int | None, generator: torch.Generator) -> Tensor:
    """A random order of ``range(n)``, cut to ``limit`` entries when given."""
    order = torch.randperm(n, generator=generator)
    return order if limit is None else order[:limit]


def require_dir(data_dir: str | Path, help_text: Callable[[Path], str]) -> Path:
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist. {help_text(path)}.")
    return path


def _resize(images: Tensor, size: int) -> Tensor:
    """(n, c, h, w) uint8 -> (n, c, size, size) float32 in [0, 1] (bilinear, antialiased; a copy if the size fits),
    in blocks of 1000 images to bound memory."""
    if images.shape[-2:] == (size, size):
        return images.float() / 255.0
    out = [torch.nn.functional.interpolate(part.float() / 255.0, size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True).clamp_(0.0, 1.0)
           for part in images.split(1000)]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size), dtype=torch.float32)


def image_split(images: Tensor, labels: Tensor, limit: int | None, generator: torch.Generator, size: int) -> ImageSplit:
    """A random subset (all images, shuffled, when ``limit`` is None) of uint8 images, as an :class:`ImageSplit`."""
    idx = random_subset(labels.shape[0], limit, generator)
    return ImageSplit(_resize(images[idx], size), labels[idx].long())


def read_bytes(path: Path, help_text: str) -> bytes:
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


def label_names(path: Path, count: int) -> tuple[str, ...]:
    """Class names, one per line of ``path`` when it exists and has ``count`` names, else ``"0"``, ``"1"``, ..."""
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        names = [n for n in names if n]
        if len(names) == count:
            return tuple(names)
    return tuple(str(i) for i in range(count))
