"""Time ``SLOptimizer.step()`` against the bare wrapped optimizer, interleaved in one run.

1. The optimizer step alone: the model has ``2 * layers`` parameter tensors (Linear weight + bias);
   gradients are set once, so only the step is timed. Prints per-step medians, their ratio
   SLO / bare, and the median of the per-iteration ratios (more robust on a busy machine).
2. A whole training step (forward + backward + step) of a GPT-2-config language model
   (``transformers.GPT2LMHeadModel`` built from ``GPT2Config``, GPT-2's vocabulary, random tokens)
   with foreach AdamW, bare and under SLO in grad, update and auto mode (``speed_unit="relative"``),
   and with foreach momentum SGD, bare and under SLO in grad mode (``"relative"``), on identical
   models, interleaved. SLO's own time is the SLO step minus the wrapped base step inside the same
   call (paired, so robust on a busy machine); its share is ``median(SLO time) / median(whole step)``.
   The end-to-end ratio of whole-step medians (SLO / the same base, bare) is printed beside it.

    python benchmarks/slo_step.py --layers 100 --width 64 --steps 300 --whole-steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slo_torch import SLOptimizer

# the grad-mode rows over AdamW time that mode's work; the warning that it does not set AdamW's step is known here
warnings.filterwarnings("ignore", message="mode='grad' rescales the gradients", category=UserWarning)


def make_model(layers: int, width: int, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


# the gradients stay fixed, so a relative speed compounds: layer "0" grows by lr * C per step, 0.1% at C = 1
SPEEDS = {"frobenius": {"0": 500.0, "*": 0.002}, "relative": {"0": 1.0, "*": 0.01}}


def cases(layers: int, width: int, device: str) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """``{name: (bare step, SLO step)}`` on identical models."""
    out = {}
    sgd = lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)  # noqa: E731
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)  # noqa: E731
    configs = {
        "SGD(momentum=0.9, foreach) grad mode": (sgd, "grad", "frobenius"),
        "SGD(momentum=0.9, foreach) grad mode, relative": (sgd, "grad", "relative"),
        "AdamW(foreach) grad mode": (adamw, "grad", "frobenius"),
        "AdamW(foreach) update mode": (adamw, "update", "frobenius"),
        "AdamW(foreach) auto (update) mode, relative": (adamw, "auto", "relative"),
    }
    for name, (make, mode, unit) in configs.items():
        bare_model = make_model(layers, width, device)
        slo_model = make_model(layers, width, device)
        bare = make(bare_model.parameters())
        slo = SLOptimizer(make(slo_model.parameters()), model=slo_model, speeds=SPEEDS[unit], mode=mode,
                          speed_unit=unit)
        out[name] = (bare.step, slo.step)
    return out


def make_gpt2(blocks: int, width: int, seq: int, device: str, seed: int = 0) -> Any:
    """A GPT-2-config language model (GPT-2's vocabulary and defaults, ``blocks`` x ``width``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=blocks, n_embd=width, n_head=max(1, width // 64))
    if seq > config.n_positions:
        raise ValueError(f"--seq {seq} exceeds GPT-2's {config.n_positions} positions")
    return GPT2LMHeadModel(config).to(device)


WHOLE_STEP_CASES = {  # name -> (base optimizer, SLO mode (None: bare), speed unit, the bare row it is compared with)
    "AdamW(foreach), bare": ("adamw", None, None, "AdamW(foreach), bare"),
    "SLO grad mode": ("adamw", "grad", "frobenius", "AdamW(foreach), bare"),
    "SLO update mode": ("adamw", "update", "frobenius", "AdamW(foreach), bare"),
    "SLO auto (update) mode, relative": ("adamw", "auto", "relative", "AdamW(foreach), bare"),
    "SGD(momentum=0.9, foreach), bare": ("sgd", None, None, "SGD(momentum=0.9, foreach), bare"),
    "SLO over SGD, grad mode, relative": ("sgd", "grad", "relative", "SGD(momentum=0.9, foreach), bare"),
}


def whole_step_cases(blocks: int, width: int, seq: int, device: str) -> dict[str, tuple[Any, torch.optim.Optimizer]]:
    """``{name: (model, optimizer)}`` of :data:`WHOLE_STEP_CASES`: bare foreach AdamW / momentum SGD and SLO around
    them."""
    out: dict[str, tuple[Any, torch.optim.Optimizer]] = {}
    for name, (kind, mode, unit, _) in WHOLE_STEP_CASES.items():
        model = make_gpt2(blocks, width, seq, device)
        opt: torch.optim.Optimizer = (
            torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True) if kind == "adamw"
            else torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True))
        if mode is not None:
            opt = SLOptimizer(opt, model=model, speeds={"transformer.h.0.mlp.c_fc": 10.0, "*": 0.1}, mode=mode,
                              speed_unit=unit)
        out[name] = (model, opt)
    return out


def whole_step_table(args: argparse.Namespace) -> None:
    """Forward + backward + step of a GPT-2-config model: bare AdamW / SGD vs SLO around them, interleaved."""
    cases = whole_step_cases(args.gpt2_blocks, args.gpt2_width, args.seq, args.device)
    vocab = next(iter(cases.values()))[0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(args.device)
    n_params = sum(p.numel() for p in next(iter(cases.values()))[0].parameters())
    print(f"\nWhole training step: GPT-2 config ({args.gpt2_blocks} blocks, width {args.gpt2_width}, vocabulary "
          f"{vocab}, {n_params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} tokens, "
          f"{args.whole_steps} steps after {args.whole_warmup} warm-up steps, interleaved")

    def forward_backward(model: Any, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        return run

    names = list(cases)
    fb = {n: forward_backward(*cases[n]) for n in names}
    step = {n: cases[n][1].step for n in names}
    t_base: dict[str, list[float]] = {n: [] for n in names}  # the wrapped base step inside SLO's step
    for n in names:
        opt = cases[n][1]
        if isinstance(opt, SLOptimizer):  # the base's own step hooks run right around its step
            base, out = opt.base_optimizer, t_base[n]
            base.register_step_pre_hook(lambda *_, out=out: out.append(-clock(args.device)))
            base.register_step_post_hook(lambda *_, out=out: out.append(out.pop() + clock(args.device)))
    for _ in range(args.whole_warmup):
        for n in names:
            fb[n]()
            step[n]()
    t_fb: dict[str, list[float]] = {n: [] for n in names}
    t_step: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        t_base[n].clear()
    for i in range(args.whole_steps):  # rotate the order so that no variant always runs first
        for n in names[i % len(names):] + names[: i % len(names)]:
            t_fb[n].append(timed(fb[n], args.device))
            t_step[n].append(timed(step[n], args.device))
    med = statistics.median
    whole = {n: [a + b for a, b in zip(t_fb[n], t_step[n])] for n in names}
    print("| optimizer | forward + backward (ms) | step (ms) | of which SLO (ms) | whole step (ms) "
          "| SLO share of the whole step | whole step / bare |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        own = [t - b for t, b in zip(t_step[n], t_base[n])]
        slo, share = (f"{med(own) * 1e3:.1f}", f"{med(own) / med(whole[n]) * 100:.2f}%") if own else ("-", "-")
        print(f"| {n} | {med(t_fb[n]) * 1e3:.1f} | {med(t_step[n]) * 1e3:.1f} | {slo} | {med(whole[n]) * 1e3:.1f} "
              f"| {share} | {med(whole[n]) / med(whole[WHOLE_STEP_CASES[n][3]]):.3f}x |")


def clock(device: str) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], None], device: str) -> float:
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=int, default=100, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=64, help="in and out features of every layer")
    parser.add_argument("--steps", type=int, default=300, help="timed steps (medians over them)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--whole-steps", type=int, default=10,
                        help="timed whole training steps of the GPT-2-config model per variant (0: skip)")
    parser.add_argument("--whole-warmup", type=int, default=2, help="untimed whole steps first")
    parser.add_argument("--gpt2-blocks", type=int, default=6, help="transformer blocks of the GPT-2-config model")
    parser.add_argument("--gpt2-width", type=int, default=384, help="width of the GPT-2-config model")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
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
    if args.whole_steps > 0:
        whole_step_table(args)


if __name__ == "__main__":
    main()
