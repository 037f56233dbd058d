"""Vector-Jacobian products ``v^T df/dh`` through recorded layer outputs, for blocks of cotangents ``v``
shaped like the model output ``f`` (output basis vectors or random sketch vectors).

Samples are assumed independent in eval mode (the output of sample ``b`` depends only on input
``b``), so a cotangent with entries at every sample at once yields every per-sample gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from .common import check_choice

if TYPE_CHECKING:
    from .probe import Chunk

__all__ = [
    "VJPPlan",
    "vjp",
    "block_size",
    "basis_cotangents",
    "random_cotangents",
    "VJP_BUDGET_BYTES",
    "BATCHED_VJP",
    "SKETCHES",
]

#: Memory allowed for one block of batched VJP results (cotangents plus layer gradients).
VJP_BUDGET_BYTES = 64 * 2**20

# One batched VJP per block of cotangents (`is_grads_batched=True`, i.e. vmap over the backward)
# measured faster than a Python loop of single VJPs (1 thread, 2-core CPU): exact K on a tiny
# GPT-2 (many small ops, 44 outputs per sequence) 0.17 s batched vs 1.0 s looped; on the benchmark
# MLP (6 layers of width 256, 10 outputs, 2000 samples, few large ops) 0.35 s vs 0.31 s. Blocks are
# sized by VJP_BUDGET_BYTES. Ops without a vmap batching rule fall back to the loop (per measurement).
#: Whether a measurement starts with batched VJPs (read at the start of each measurement, never written).
BATCHED_VJP = True


def _missing_batching_rule(err: BaseException) -> bool:
    """True for the error vmap raises on an op it cannot batch (the only error that falls back to the loop)."""
    msg = str(err)
    return isinstance(err, (RuntimeError, NotImplementedError)) and (
        "atching rule not implemented" in msg or msg.startswith("vmap:")
    )


class VJPPlan:
    """How the VJPs of one measurement run: batched until an op without a vmap batching rule is met,
    then one cotangent at a time for the rest of that measurement (nothing outlives it).

    ``names`` label the targets in errors (a layer called several times has one target per call). A
    target the outputs do not depend on gets a zero gradient when another target of the same name does
    reach them (a layer with one call in an unused branch); a name none of whose targets reaches them is
    an error naming it, unless ``allow_unused=True`` (zero gradients)."""

    def __init__(self, names: list[str] | None = None, allow_unused: bool = False, batched: bool | None = None) -> None:
        self.names = names
        self.allow_unused = allow_unused
        self.batched = BATCHED_VJP if batched is None else batched

    def _complete(self, grads: tuple[Tensor | None, ...], targets: list[Tensor], b: int) -> list[Tensor]:
        unused = [i for i, g in enumerate(grads) if g is None]
        names = self.names or [f"target {i}" for i in range(len(targets))]
        reached = {names[i] for i, g in enumerate(grads) if g is not None}
        which = sorted({names[i] for i in unused} - reached)
        if which and not self.allow_unused:
            raise ValueError(
                f"the outputs f do not depend on the recorded output of layers {which} (the gradient is None), "
                "so their K would be silently 0. Likely causes: the layer feeds a branch that output_fn does not "
                "use, its output is detached (.detach(), an integer cast), or it runs in code that autograd "
                "cannot see (a compiled graph, torch.utils.checkpoint(..., use_reentrant=True)). Exclude them "
                "with layers=[...], or pass allow_unused=True to record K = 0 for layers no call of which the outputs use"
            )
        return [g if g is not None else t.new_zeros((b, *t.shape)) for g, t in zip(grads, targets)]

    def __call__(self, f: Tensor, targets: list[Tensor], cotangents: Tensor) -> Iterator[list[Tensor]]:
        if self.batched:
            try:
                grads = torch.autograd.grad(
                    f, targets, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            except (RuntimeError, NotImplementedError) as err:
                if not _missing_batching_rule(err):
                    raise
                self.batched = False  # an op without a vmap batching rule: loop for this measurement
            else:
                yield self._complete(grads, targets, cotangents.shape[0])
                return
        for v in cotangents:
            grads = torch.autograd.grad(f, targets, v, retain_graph=True, allow_unused=True)
            yield self._complete(tuple(g if g is None else g.unsqueeze(0) for g in grads), targets, 1)


def vjp(
    f: Tensor, targets: list[Tensor], cotangents: Tensor, plan: VJPPlan | None = None
) -> Iterator[list[Tensor]]:
    """Vector-Jacobian products ``v^T df/dt`` for a block of cotangents ``(b, *f.shape)``.

    Yields lists with one tensor ``(b', *t.shape)`` per target (``b'`` = 1 per step in the loop,
    ``b`` when batched). A target that ``f`` does not depend on is an error unless the ``plan``
    allows it (then zeros). Uses ``torch.autograd.grad``: no parameter ``.grad`` is touched, and the
    graph is kept for further blocks. Pass one :class:`VJPPlan` for all blocks of a measurement."""
    yield from (plan if plan is not None else VJPPlan())(f, targets, cotangents)


def block_size(chunk: "Chunk", budget: int = VJP_BUDGET_BYTES) -> int:
    """How many cotangents fit in one batched VJP within ``budget`` bytes."""
    per_vector = chunk.f.numel() + sum(t.numel() for ts in chunk.outputs.values() for t in ts)
    return max(1, budget // max(1, per_vector * chunk.f.element_size()))


def basis_cotangents(f: Tensor, start: int, stop: int) -> Tensor:
    """Output basis vectors ``e_c`` for ``c in [start, stop)``, each set at every sample:
    shape ``(stop - start, *f.shape)``."""
    n, c = f.shape[0], f[0].numel()
    v = f.new_zeros(stop - start, n, c)
    idx = torch.arange(stop - start, device=f.device)
    v[idx, :, start + idx] = 1
    return v.view(stop - start, *f.shape)


#: Distributions of the sketch vectors.
SKETCHES = ("rademacher", "gaussian")


def random_cotangents(
    f: Tensor, count: int, generator: torch.Generator | None, dist: str = "rademacher"
) -> Tensor:
    """``count`` random vectors with the full shape of ``f`` and ``E[v v^T] = I`` (i.i.d. entries,
    Gaussian or Rademacher): shape ``(count, *f.shape)``."""
    check_choice("sketch distribution", dist, SKETCHES)
    shape = (count, *f.shape)
    device = generator.device if generator is not None else f.device
    if dist == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=f.dtype)
    else:  # rademacher  # 8 signs per random byte: ~3x faster than randint(0, 2) per entry
        numel = math.prod(shape)
        octets = torch.randint(0, 256, ((numel + 7) // 8,), generator=generator, device=device, dtype=torch.uint8)
        bits = (octets.unsqueeze(-1) >> torch.arange(8, device=device, dtype=torch.uint8)) & 1
        v = bits.reshape(-1)[:numel].to(f.dtype).mul_(2).sub_(1).view(shape)
    return v.to(f.device)
