"""Time spent inside a function, summed over its calls (imported by the scripts of this folder)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["summing_time"]


def summing_time(fn: Callable[..., Any], total: list[float]) -> Callable[..., Any]:
    """``fn`` wrapped so that each call adds its wall time (``time.perf_counter``) to ``total[0]``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t0

    return run
