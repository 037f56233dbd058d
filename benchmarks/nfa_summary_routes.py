"""Time the two routes of ``diagnostics.nfa.nfa_summary`` for a layer with fewer outputs than inputs.

The ``d x d`` route forms the NFM, AGOP and their decomposition terms (taken when the matrices are kept,
``keep_matrices=True``); the ``k x k`` route (``k < d``, AGOP power 1) works from the Gram matrices
``W W^T`` in float64 (``diagnostics/output_space.py``). Both routes are timed interleaved on the same float32
weights and ``K``; prints the median of each, their ratio and the largest difference of the records.

    python benchmarks/nfa_summary_routes.py --shapes 384x1536 768x3072 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diagnostics.nfa import nfa_summary


def shape(text: str) -> tuple[int, int]:
    """``"KxD"`` -> ``(k, d)`` with ``k < d``."""
    k, d = (int(v) for v in text.lower().split("x"))
    if not 0 < k < d:
        raise argparse.ArgumentTypeError(f"need KxD with 0 < K < D, got {text!r}")
    return k, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", type=shape, nargs="+", default=[(384, 1536), (768, 3072)], help="KxD weights")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls of each route")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); medians of {args.repeats} interleaved calls")
    for k, d in args.shapes:
        g = torch.Generator().manual_seed(0)
        W0 = torch.randn(k, d, generator=g) / d**0.5
        W = W0 + 0.1 * torch.randn(k, d, generator=g) / d**0.5
        J = torch.randn(k, k, generator=g)
        K = J @ J.t() / k
        times: dict[bool, list[float]] = {True: [], False: []}
        records = {}
        for _ in range(args.repeats):
            for keep in (True, False):  # keep=True: the d x d route
                start = time.perf_counter()
                records[keep] = nfa_summary(W, W0, K, "pearson", 1.0, keep_matrices=keep)
                times[keep].append(time.perf_counter() - start)
        diff = max(abs(records[True][key] - records[False][key]) for key in ("uc_nfa", "c_nfa", "kernel_alignment"))
        slow, fast = statistics.median(times[True]), statistics.median(times[False])
        print(f"k={k} d={d}: d x d route {slow:.3f} s, k x k route {fast:.3f} s, "
              f"ratio {slow / fast:.1f}; largest difference of the correlations {diff:.1e}")


if __name__ == "__main__":
    main()
