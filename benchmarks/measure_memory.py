"""Peak memory one ``NFAMonitor.measure()`` allocates for one square float32 layer, against the estimate.

    python benchmarks/measure_memory.py --k 4096

The peak is the largest sum of the sizes of the tensors allocated and not yet freed during the call,
from the profiler's memory events (``memory_use.peak_bytes``; torch's CPU allocator keeps no statistics).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from diagnostics import NFAMonitor
from diagnostics.memory import estimate_memory

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling modules, also when this file is loaded by path rather than run
    sys.path.insert(0, HERE)
from memory_use import peak_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--k", type=int, default=4096, help="width of the measured layer (k = d)")
    parser.add_argument("--keep-matrices", action="store_true", help="also keep K, the NFM and the AGOP")
    args = parser.parse_args()
    torch.manual_seed(0)
    k = args.k
    model = nn.Sequential(nn.Linear(16, k), nn.Tanh(), nn.Linear(k, k), nn.Tanh(), nn.Linear(k, 4))
    x = torch.randn(64, 16)
    NFAMonitor(model, layers=["2"], max_k=None).measure(x)  # warm-up
    mon = NFAMonitor(model, layers=["2"], max_k=None)
    t0 = time.perf_counter()
    peak = peak_bytes(lambda: mon.measure(x, keep_matrices=args.keep_matrices))
    seconds = time.perf_counter() - t0
    estimate = estimate_memory(mon.adapters, keep_matrices=args.keep_matrices)["total"]
    mib = 2**20
    print(f"k = d = {k}, float32, keep_matrices={args.keep_matrices}: peak {peak / mib:.0f} MiB "
          f"= {peak / (4 * k * k):.2f} k x k float32 matrices; estimate {estimate / mib:.0f} MiB; {seconds:.1f} s")


if __name__ == "__main__":
    main()
