"""Deprecated: the image loaders are public API now, in ``diagnostics.datasets`` (same names)."""

from __future__ import annotations

import warnings

from diagnostics.datasets import *  # noqa: F401,F403
from diagnostics.datasets import __all__  # noqa: F401

warnings.warn("examples/image_data.py is deprecated: import from diagnostics.datasets instead", DeprecationWarning,
              stacklevel=2)
