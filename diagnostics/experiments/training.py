"""Training helpers of experiment scripts: the paper's bias-free MLP, seeding, minibatches and MSE loops.

They take any ``torch.optim.Optimizer``: a script builds plain SGD or an ``slo_torch.SLOptimizer`` itself.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..common import eval_mode
from .console import progress

__all__ = [
    "eval_mode",
    "bias_free_mlp",
    "hidden_layers",
    "scale_init_",
    "set_seed",
    "minibatches",
    "mse",
    "eval_schedule",
    "train_mse",
    "train_epochs",
    "PhaseTimer",
]


def bias_free_mlp(d_in: int, width: int, depth: int, d_out: int) -> nn.Sequential:
    """``depth`` hidden layers ``Linear(bias=False) + ReLU`` of size ``width``, then a bias-free readout.

    The linear layers are the ``nn.Sequential`` entries ``"0", "2", ..., str(2 * depth)``;
    PyTorch's default initialisation is kept.
    """
    for name, value in (("d_in", d_in), ("width", width), ("d_out", d_out)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"bias_free_mlp: {name} must be a positive int, got {value!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"bias_free_mlp: depth (number of hidden layers) must be an int >= 0, got {depth!r}")
    mods: list[nn.Module] = []
    fan_in = d_in
    for _ in range(depth):
        mods += [nn.Linear(fan_in, width, bias=False), nn.ReLU()]
        fan_in = width
    mods.append(nn.Linear(fan_in, d_out, bias=False))
    return nn.Sequential(*mods)


def hidden_layers(depth: int) -> list[str]:
    """Module names of the hidden linear layers of ``bias_free_mlp(..., depth, ...)``: ``"0", "2", ...``
    (the readout, ``str(2 * depth)``, is left out)."""
    return [str(2 * i) for i in range(depth)]


@torch.no_grad()
def scale_init_(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every parameter of ``model`` by ``factor`` in place (``factor = 0.1``: "small init")."""
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"scale_init_: factor must be a finite positive number, got {factor!r}")
    for p in model.parameters():
        p.mul_(factor)
    return model


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed) and torch's default generator."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"set_seed: seed must be an int >= 0, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of the project
        return
    np.random.seed(seed % 2**32)


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of ``steps`` minibatches: reshuffled epochs, the last partial batch of an epoch dropped
    (full batch when ``batch_size >= n``)."""
    if batch_size < 1 or n < 1:
        raise ValueError(f"minibatches: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[start : start + batch_size]
            done += 1


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error ``mean((f(x) - y)^2)`` of ``model`` in eval mode (every submodule's mode restored)."""
    with eval_mode(model):
        return float(((model(x) - y) ** 2).mean())


def eval_schedule(steps: int, every: int) -> list[int]:
    """Steps at which to measure: ``0, every, 2·every, ...`` and always the last step ``steps``."""
    if steps < 0 or every < 1:
        raise ValueError(f"eval_schedule: need steps >= 0 and every >= 1, got steps={steps}, every={every}")
    return sorted({*range(0, steps + 1, every), steps})


def train_mse(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    eval_steps: Sequence[int],
    on_eval: Callable[[int], None],
    desc: str = "",
) -> None:
    """Minibatch training on the MSE ``mean((f(x) - y)^2)``; calls ``on_eval(step)`` for every step in
    ``eval_steps`` (``0`` = before the first update, ``t`` = after ``t`` updates). Shows progress
    (:class:`~diagnostics.experiments.console.Progress`: step, minibatch loss, elapsed time, ETA) labelled ``desc``."""
    wanted = set(eval_steps)
    if 0 in wanted:
        on_eval(0)
    bar = progress(minibatches(X.shape[0], batch_size, steps, generator), total=steps, desc=desc, leave=False)
    for step, idx in enumerate(bar, start=1):
        loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.report(loss.detach())
        if step in wanted:
            on_eval(step)


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    lr: Callable[[int], float],
    on_epoch: Callable[[int, float, float], None],
    timer: PhaseTimer,
    phase: str,
    desc: str = "",
) -> str:
    """Epochs ``1..epochs`` of ``len(X) // batch_size`` minibatch steps (at least one) on the MSE
    ``mean((f(x) - y)^2)``, every group's learning rate set to ``lr(epoch)``, the steps timed as ``phase``;
    after each epoch ``on_epoch(epoch, lr, mean minibatch loss)``. Returns ``"completed"``, or why it stopped
    (non-finite weights). Shows progress per epoch (mean minibatch loss, elapsed time, ETA) labelled ``desc``."""
    steps = max(1, X.shape[0] // batch_size)
    bar = progress(range(1, epochs + 1), desc=desc)
    for epoch in bar:
        epoch_lr = lr(epoch)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        total = X.new_zeros((), dtype=torch.float64)
        with timer(phase):
            for idx in minibatches(X.shape[0], batch_size, steps, generator):
                idx = idx.to(X.device)
                loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return f"diverged in epoch {epoch} (non-finite weights); stopped"
        bar.report(float(total) / steps)
        on_epoch(epoch, epoch_lr, float(total) / steps)
    return "completed"


class PhaseTimer:
    """Wall and CPU seconds per named phase of a run (``with timer("train"): ...``), summed over its blocks;
    CUDA work is synchronised at the end of each block so that it is counted in its own phase. On a busy
    machine the CPU time of a one-thread run is close to what the phase takes on an idle core."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - wall
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def per_epoch(self, epochs: int) -> str:
        """``"train 1.23 s (CPU 1.1 s), ... per epoch"``: each phase's totals divided by ``epochs``."""
        n = max(1, epochs)
        return ", ".join(f"{name} {self.wall[name] / n:.3g} s (CPU {self.cpu[name] / n:.3g} s)"
                         for name in self.wall) + " per epoch"
