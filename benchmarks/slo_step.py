"""Time ``SLOptimizer.step()`` against the bare wrapped optimizer, interleaved in one run.

The model has ``2 * layers`` parameter tensors (Linear weight + bias). Gradients are set once, so
only the optimizer step is timed. Prints per-step medians, their ratio SLO / bare, and the median
of the per-iteration ratios (more robust on a busy machine).

    python benchmarks/slo_step.py --layers 100 --width 64 --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from slo_torch import SLOptimizer


def make_model(layers: int, width: int, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def cases(layers: int, width: int, device: str) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """``{name: (bare step, SLO step)}`` on identical models."""
    out = {}
    configs = {
        "SGD(momentum=0.9, foreach) grad mode": (
            lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True), "grad"),
        "AdamW(foreach) grad mode": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), "grad"),
        "AdamW(foreach) update mode": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), "update"),
    }
    for name, (make, mode) in configs.items():
        bare_model = make_model(layers, width, device)
        slo_model = make_model(layers, width, device)
        bare = make(bare_model.parameters())
        slo = SLOptimizer(make(slo_model.parameters()), model=slo_model,
                          speeds={"0": 500.0, "*": 0.002}, mode=mode)
        out[name] = (bare.step, slo.step)
    return out


def timed(fn: Callable[[], None], device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {2 * args.layers} parameter tensors "
          f"({args.layers} x Linear({args.width}, {args.width})), {args.steps} steps, "
          f"{args.threads} thread(s)")
    print("| optimizer | bare step (ms) | SLOptimizer step (ms) | ratio of medians | median of paired ratios |")
    print("|---|---|---|---|---|")
    for name, (bare, slo) in cases(args.layers, args.width, args.device).items():
        for _ in range(args.warmup):
            bare()
            slo()
        t_bare, t_slo = [], []
        for i in range(args.steps):  # interleaved, alternating which goes first
            pair = (bare, slo) if i % 2 == 0 else (slo, bare)
            times = {id(fn): timed(fn, args.device) for fn in pair}
            t_bare.append(times[id(bare)])
            t_slo.append(times[id(slo)])
        mb, ms = statistics.median(t_bare) * 1e3, statistics.median(t_slo) * 1e3
        paired = statistics.median(s / b for s, b in zip(t_slo, t_bare))
        print(f"| {name} | {mb:.3f} | {ms:.3f} | {ms / mb:.2f}x | {paired:.2f}x |")


if __name__ == "__main__":
    main()
