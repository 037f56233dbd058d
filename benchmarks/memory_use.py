"""Memory a call uses, as the benchmarks measure it (CPU; imported by the scripts of this folder).

- :func:`peak_rss_mb`: peak resident set size during the call (``VmHWM``, reset via
  ``/proc/self/clear_refs``) minus the resident size just before it; torch's CPU allocator keeps no
  statistics, and tracemalloc does not see torch. Linux only.
- :func:`peak_cuda_mb`: peak of ``torch.cuda.max_memory_allocated`` during the call minus the memory
  allocated just before it (CUDA).
- :func:`peak_bytes`: the largest sum of the sizes of the tensors allocated and not yet freed during
  the call, from the profiler's memory events.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_bytes", "peak_cuda_mb", "peak_rss_mb", "status_kb"]


def status_kb(key: str) -> int:
    """The value in kB of ``key`` (e.g. ``"VmRSS"``, ``"VmHWM"``) in ``/proc/self/status``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """``(seconds, (VmHWM during fn() - VmRSS before) / 1024)`` of one call of ``fn``."""
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, (status_kb("VmHWM") - base) / 1024


def peak_cuda_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """``(seconds, (peak allocated on the current CUDA device during fn() - allocated before) / 2**20)``."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_bytes(fn: Callable[[], object]) -> int:
    """``max_t sum(bytes allocated - bytes freed up to t)`` over the profiler's memory events of ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
