"""Cost of the PTK covariance K: this package's exact/sketched K against the authors' route.

Model: the authors' MLP (input 3072, 5 hidden bias-free ReLU layers of width 256, 10 outputs,
float32); K for all 6 linear layers.

- ours: ``ptk_covariance(model, x)`` (hooked layer outputs, one VJP per output, chunks of samples).
- authors: ``vmap`` over samples of ``jacrev`` w.r.t. zero perturbations added to every
  pre-activation, then ``K = sum_{n,c} J J^T / N`` (run under ``no_grad`` so no graph is kept).

Each (method, n) runs in a fresh subprocess. Memory = peak resident set size (``VmHWM``, reset via
``/proc/self/clear_refs``) during one full call minus the resident size just before it (after the
data and a tiny warm-up call exist); torch's CPU allocator keeps no statistics, and tracemalloc
does not see torch. Time = median of ``--repeats`` warm calls (after one untimed call).
Relative error = ``max_layer |K - K_ref|_F / |K_ref|_F`` against ``ptk_covariance`` in float64
(this includes the float32 forward pass's own rounding, e.g. ReLU masks that flip), and between
the two float32 routes.

Also: sketched K for m in {1, 4, 10} (error averaged over seeds, plus one cotangent broadcast
across the batch for contrast), and on a GPT-2-config language model (thousands of outputs per
token) the time of sketched K at m = 8 in units of one forward+backward pass.

GPT-2 small (``GPT2LMHeadModel(GPT2Config())``, 124M parameters, vocabulary 50257): one
``NFAMonitor(model).measure`` with the default layers (48 block layers and the LM head, whose
``K = I`` is analytic), sketch m = 8, on a 4 x 128-token probe, in a fresh subprocess: its time in
units of one forward+backward pass (language-model loss) on the same probe, and the peak extra
resident memory of each (both measured in that one run), and how much of the measurement is the per-layer NFA
terms (``nfa_summary`` and the LM head's ``output_layer_summary``) rather than the ``K`` sums.

GEMM rate: the floating-point operations exact ``K`` performs on the authors' MLP, counted from the shapes
(:func:`exact_flops`: the forward pass, the VJPs with the ``C = 10`` output basis vectors, and the Grams
``G^T G`` as the code forms them), divided by its time, against ``torch.mm`` timed in the same run at the
same thread count on the same GEMM shapes (:func:`mm_rate`), printed as
``exact K: X GFLOP/s = Y % of torch.mm (Z GFLOP/s)``. Where the rest goes: one more call with every aten op
timed (:func:`time_by_op`, a ``TorchDispatchMode``), split into the GEMMs (and their own rate), the ReLU masks
of the backward passes, the float64 additions of the Gram bands, other ops, and the time outside any op
(Python, autograd, hooks).

    python benchmarks/ptk_cost.py                   # n = 2000 and 20000, then GPT-2 small
    python benchmarks/ptk_cost.py --quick           # n = 500, fewer seeds, no GPT-2 small
    python benchmarks/ptk_cost.py --gpt2-small-only
    python benchmarks/ptk_cost.py --quick --device cuda   # on a GPU (memory: peak allocated on the device)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn
from torch.func import jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from diagnostics import ptk_covariance
from diagnostics import LayerHooks
from diagnostics.engine import for_each_chunk
from diagnostics.vjps import vjp
from diagnostics.engine import DEFAULT_CHUNK_SIZE, FIRST_CHUNK_SAMPLES
from diagnostics.experiments import bias_free_mlp
from diagnostics.kernel import row_bands
from diagnostics.layers import find_linear_layers

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling modules, also when this file is loaded by path rather than run
    sys.path.insert(0, HERE)
from call_time import summing_time  # noqa: E402
from memory_use import peak_cuda_mb, peak_rss_mb  # noqa: E402

D_IN, WIDTH, DEPTH, D_OUT = 3072, 256, 5, 10


def authors_mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return bias_free_mlp(D_IN, WIDTH, DEPTH, D_OUT).to(dtype)


def probe(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)


def authors_K(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """jacrev w.r.t. zero pre-activation perturbations, vmap over samples (the authors' method)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    weights = [model.get_submodule(n).weight.detach() for n in names]

    def forward(xi: torch.Tensor, eps: list[torch.Tensor]) -> torch.Tensor:
        h = xi
        for i, W in enumerate(weights):
            h = W @ h + eps[i]
            if i < len(weights) - 1:
                h = torch.relu(h)
        return h

    eps = [torch.zeros(W.shape[0], dtype=x.dtype) for W in weights]
    with torch.no_grad():
        jac = vmap(jacrev(forward, argnums=1), in_dims=(0, None))(x, eps)  # per layer (N, C, k)
        return {n: torch.einsum("nck,ncl->kl", J, J) / x.shape[0] for n, J in zip(names, jac)}


def _chunks(n: int) -> list[int]:
    """Samples per chunk of ``ptk_covariance`` on the MLP with ``chunk_size=None`` (its outputs are small:
    ``FIRST_CHUNK_SAMPLES``, then ``DEFAULT_CHUNK_SIZE`` at a time)."""
    sizes, done = [], 0
    while done < n:
        sizes.append(min(n - done, FIRST_CHUNK_SAMPLES if not sizes else DEFAULT_CHUNK_SIZE))
        done += sizes[-1]
    return sizes


def _gemms(n: int) -> list[tuple[int, int, int, int]]:
    """``(count, rows, inner, cols)`` of the GEMMs exact ``K`` performs on the MLP for ``n`` samples: per chunk
    of ``b`` samples the forward pass ``(b, d) @ (d, k)`` per layer, the batched VJPs of the ``C`` basis
    vectors ``(C b, k) @ (k, d)`` back through every layer above the first, and per layer the Gram bands
    ``G[:, i:i+s]^T G[:, i:]`` over ``C b`` rows (:func:`diagnostics.kernel.row_bands`)."""
    dims = [D_IN] + [WIDTH] * DEPTH + [D_OUT]
    out = []
    for b in _chunks(n):
        for d, k in zip(dims, dims[1:]):
            out.append((1, b, d, k))
        for d, k in list(zip(dims, dims[1:]))[1:]:
            out.append((1, D_OUT * b, k, d))
        for k in dims[1:]:
            out += [(1, s, D_OUT * b, k - i) for i, s, _ in row_bands(k)]
    return out


def exact_flops(n: int) -> dict[str, float]:
    """FLOPs (``2 x rows x inner x cols`` per GEMM) of exact ``K`` on the MLP: forward, VJPs, Grams."""
    dims = [D_IN] + [WIDTH] * DEPTH + [D_OUT]
    layers = list(zip(dims, dims[1:]))
    forward = sum(2.0 * n * d * k for d, k in layers)
    vjps = sum(2.0 * D_OUT * n * k * d for d, k in layers[1:])
    grams = sum(2.0 * D_OUT * n * s * (k - i) for _, k in layers for i, s, _ in row_bands(k))
    return {"forward": forward, "vjps": vjps, "grams": grams}


def mm_rate(n: int, device: str = "cpu", repeats: int = 3) -> float:
    """FLOP/s of ``torch.mm`` doing the GEMMs of :func:`_gemms` (same shapes, float32, on ``device``, into a
    preallocated output): their FLOPs over the sum of their median times."""
    times: dict[tuple[int, int, int], float] = {}
    flops = seconds = 0.0
    for count, rows, inner, cols in _gemms(n):
        key = (rows, inner, cols)
        if key not in times:
            a = torch.randn(rows, inner, device=device)
            b = torch.randn(inner, cols, device=device)
            out = torch.empty(rows, cols, device=device)
            reps = max(1, int(2e8 // (2 * rows * inner * cols)))  # about 0.2 GFLOP per timing
            torch.mm(a, b, out=out)  # warm-up
            runs = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=out)
                _sync(device)
                runs.append((time.perf_counter() - t0) / reps)
            times[key] = statistics.median(runs)
        flops += 2.0 * count * rows * inner * cols
        seconds += count * times[key]
    return flops / seconds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours_K(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return ptk_covariance(model, x)


METHODS: dict[str, Callable] = {"ours": ours_K, "authors": authors_K}


def child(method: str, n: int, repeats: int, threads: int, out: str, device: str = "cpu") -> None:
    """One method at one size, in this (fresh) process: memory of a full call, then warm time."""
    torch.set_num_threads(threads)
    fn = METHODS[method]
    model, x = authors_mlp().to(device), probe(n).to(device)
    fn(model, x[:8])  # load kernels / vmap machinery without large buffers
    out_K: list[dict[str, torch.Tensor]] = []
    _, extra_mb = (peak_rss_mb if device == "cpu" else peak_cuda_mb)(lambda: out_K.append(fn(model, x)))
    K = out_K[0]
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn(model, x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    torch.save({k: v.contiguous().cpu() for k, v in K.items()}, out + ".pt")
    with open(out + ".json", "w") as fh:
        json.dump({"time_s": statistics.median(times), "extra_mb": extra_mb}, fh)


def rel_err(K: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((K[n].double() - ref[n]).norm() / ref[n].norm()) for n in ref)


def run_child(method: str, n: int, repeats: int, threads: int, tmp: str, device: str = "cpu") -> dict:
    out = os.path.join(tmp, f"{method}-{n}")
    cmd = [sys.executable, __file__, "--child", method, "--n", str(n), "--repeats", str(repeats),
           "--threads", str(threads), "--out", out, "--device", device]
    subprocess.run(cmd, check=True, timeout=1800)
    with open(out + ".json") as fh:
        res = json.load(fh)
    res["K"] = torch.load(out + ".pt")
    return res


def broadcast_sketch_K(model: nn.Module, x: torch.Tensor, m: int, gen: torch.Generator) -> dict:
    """For contrast only: one random output vector per projection shared by every sample."""
    adapters = find_linear_layers(model)
    sums = {n: torch.zeros(a.k, a.k) for n, a in adapters.items()}

    def visit(chunk) -> None:
        names = list(chunk.outputs)
        targets = [chunk.outputs[n][0] for n in names]
        v = torch.randn(m, 1, *chunk.f.shape[1:], generator=gen).expand(m, *chunk.f.shape)
        for grads in vjp(chunk.f, targets, v):
            for n, g in zip(names, grads):
                rows = g.reshape(-1, g.shape[-1])
                sums[n] += rows.t() @ rows / m

    for_each_chunk(model, LayerHooks(adapters), x, visit, chunk_size=x.shape[0])
    return {n: s / x.shape[0] for n, s in sums.items()}


def sketch_table(n: int, seeds: int) -> list[str]:
    model, x = authors_mlp(), probe(n)
    ref = ptk_covariance(authors_mlp(torch.float64), probe(n, torch.float64))
    lines = ["| m | time (s) | rel. error (mean over seeds) | one vector broadcast over the batch |", "|---|---|---|---|"]
    for m in (1, 4, 10):
        errs, errs_b, times = [], [], []
        for seed in range(seeds):
            t0 = time.perf_counter()
            K = ptk_covariance(model, x, estimator="sketch", m=m, generator=torch.Generator().manual_seed(seed))
            times.append(time.perf_counter() - t0)
            errs.append(rel_err(K, ref))
            errs_b.append(rel_err(broadcast_sketch_K(model, x, m, torch.Generator().manual_seed(seed)), ref))
        lines.append(f"| {m} | {statistics.median(times):.3f} | {sum(errs) / seeds:.3f} | {sum(errs_b) / seeds:.3f} |")
    return lines


class _OpTimer(TorchDispatchMode):
    """Wall time and GEMM FLOPs of every aten op run under it (CPU: each op finishes before it returns)."""

    GEMMS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {"gemm": 0.0, "relu masks": 0.0, "float64 additions": 0.0, "other ops": 0.0}
        self.gemm_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - t0
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            a, b = args[-2], args[-1]
            self.gemm_flops += 2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
            kind = "gemm"
        elif name == "threshold_backward":
            kind = "relu masks"
        elif name == "add_" and args[0].dtype == torch.float64:
            kind = "float64 additions"
        else:
            kind = "other ops"
        self.seconds[kind] += seconds
        return out


def time_by_op(n: int, seconds: float, threads: int) -> str:
    """Where exact K's ``seconds`` on ``n`` samples go: one more call with every aten op timed, as shares of
    ``seconds``; what no op accounts for is Python, autograd and the hooks (CPU only)."""
    torch.set_num_threads(threads)
    model, x = authors_mlp(), probe(n)
    ours_K(model, x)
    with _OpTimer() as timer:
        ours_K(model, x)
    parts = dict(timer.seconds)
    parts["outside ops"] = max(0.0, seconds - sum(parts.values()))
    shares = ", ".join(f"{k} {100 * v / seconds:.1f} %" for k, v in parts.items())
    gemm_rate = timer.gemm_flops / timer.seconds["gemm"]
    return (f"n = {n}: where the time goes: {shares} of {seconds:.3f} s; the GEMMs inside K run at "
            f"{gemm_rate / 1e9:.1f} GFLOP/s ({timer.gemm_flops / 1e9:.1f} GFLOP)")


def gemm_line(n: int, seconds: float, threads: int, device: str) -> str:
    """``exact K: X GFLOP/s = Y % of torch.mm (Z GFLOP/s)`` for exact K on ``n`` samples in ``seconds``."""
    flops = exact_flops(n)
    rate, mm = sum(flops.values()) / seconds, mm_rate(n, device)
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items())
    return (f"n = {n}: exact K: {rate / 1e9:.1f} GFLOP/s = {100 * rate / mm:.0f} % of torch.mm ({mm / 1e9:.1f} GFLOP/s) "
            f"[{parts} GFLOP in {seconds:.3f} s; {threads} thread(s), {device}]")


def lm_head_sketch(repeats: int, device: str = "cpu") -> list[str]:
    """Sketched K (m=8) on every transformer block layer of a GPT-2-config LM vs one fwd+bwd pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=5000, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0)).to(device)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    def sketch() -> None:
        ptk_covariance(model, ids, layers=["transformer.h.*"], estimator="sketch", m=8,
                       generator=torch.Generator().manual_seed(0))

    def median_time(fn: Callable[[], None]) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_step, t_sketch = median_time(fwd_bwd), median_time(sketch)
    outputs = ids.shape[1] * cfg.vocab_size
    return [
        f"GPT-2 config (2 layers, width 128, vocab 5000), probe 8 x 32 tokens, {outputs} outputs per sequence, "
        f"K for the {len(find_linear_layers(model, ['transformer.h.*']))} block layers:",
        f"forward+backward {t_step:.3f} s; sketched K m=8 {t_sketch:.3f} s = {t_sketch / t_step:.1f} passes "
        "(bound: m + 1 = 9, one forward and m backward passes, each at most one forward+backward)",
    ]


def gpt2_small_child(threads: int, out: str) -> None:
    """GPT-2 small, default layers, sketch m = 8 on 4 x 128 tokens vs one forward+backward pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from diagnostics import NFAMonitor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    mon = NFAMonitor(model)

    def fwd_bwd(x: torch.Tensor = ids) -> None:
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()

    fwd_bwd(ids[:1, :8])  # warm-up without large buffers
    model.zero_grad(set_to_none=True)
    t_step, mb_step = peak_rss_mb(fwd_bwd)
    model.zero_grad(set_to_none=True)
    t_terms = _time_layer_summaries()
    t_nfa, mb_nfa = peak_rss_mb(lambda: mon.measure(ids, estimator="sketch", m=8, generator=0))
    with open(out, "w") as fh:
        json.dump({"layers": len(mon.adapters), "t_step": t_step, "mb_step": mb_step, "t_nfa": t_nfa,
                   "mb_nfa": mb_nfa, "t_terms": t_terms[0]}, fh)


def _time_layer_summaries() -> list[float]:
    """Make ``NFAMonitor.measure`` add the time of its per-layer NFA terms (``nfa_summary``, and
    ``output_layer_summary`` for an analytic output layer) to the returned one-element list."""
    import diagnostics.monitor as monitor

    total = [0.0]
    monitor.nfa_summary = summing_time(monitor.nfa_summary, total)
    monitor.output_layer_summary = summing_time(monitor.output_layer_summary, total)
    return total


def gpt2_small(threads: int, tmp: str) -> list[str]:
    out = os.path.join(tmp, "gpt2-small.json")
    cmd = [sys.executable, __file__, "--gpt2-small-child", "--threads", str(threads), "--out", out]
    subprocess.run(cmd, check=True, timeout=7200)
    with open(out) as fh:
        r = json.load(fh)
    return [
        f"GPT-2 small (vocab 50257), probe 4 x 128 tokens, {r['layers']} layers (default selection, "
        "LM head analytic), sketch m=8:",
        f"forward+backward {r['t_step']:.1f} s, peak extra {r['mb_step']:.0f} MB; "
        f"NFAMonitor.measure {r['t_nfa']:.1f} s = {r['t_nfa'] / r['t_step']:.1f} passes, "
        f"peak extra {r['mb_nfa']:.0f} MB",
        f"of which the K sums (forward, VJPs, Grams) {r['t_nfa'] - r['t_terms']:.1f} s = "
        f"{(r['t_nfa'] - r['t_terms']) / r['t_step']:.1f} passes and the per-layer NFA terms {r['t_terms']:.1f} s = "
        f"{r['t_terms'] / r['t_step']:.1f} passes",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n = 500, fewer seeds, no GPT-2 small")
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="probe sizes n (default: %(default)s, i.e. 2000 20000, or 500 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared machines)")
    ap.add_argument("--gpt2-small-only", action="store_true", help="only the GPT-2 small case")
    ap.add_argument("--gpt2-small-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where K is measured")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, args.repeats, args.threads, args.out, args.device)
        return
    if args.gpt2_small_child:
        gpt2_small_child(args.threads, args.out)
        return
    if args.gpt2_small_only:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs")
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(gpt2_small(args.threads, tmp)))
        return
    sizes = args.sizes or ([500] if args.quick else [2000, 20000])
    repeats = args.repeats
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs")
    gemm: list[str] = []
    print("| n | method | time (s) | peak extra memory (MB) | rel. error vs float64 | rel. difference ours vs authors |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            ref = ptk_covariance(authors_mlp(torch.float64), probe(n, torch.float64))
            res = {method: run_child(method, n, repeats, args.threads, tmp, args.device) for method in ("ours", "authors")}
            gemm.append(gemm_line(n, res["ours"]["time_s"], args.threads, args.device))
            if args.device == "cpu":
                gemm.append(time_by_op(n, res["ours"]["time_s"], args.threads))
            diff = rel_err(res["ours"]["K"], {k: v.double() for k, v in res["authors"]["K"].items()})
            for method, r in res.items():
                print(f"| {n} | {method} | {r['time_s']:.3f} | {r['extra_mb']:.0f} | {rel_err(r['K'], ref):.1e} "
                      f"| {diff:.1e} |", flush=True)
    print()
    print("\n".join(gemm))
    print()
    print(f"Sketched K, n = {sizes[0]}:")
    print("\n".join(sketch_table(sizes[0], 2 if args.quick else 5)))
    print()
    print("\n".join(lm_head_sketch(repeats, args.device)))
    if not args.quick and args.device == "cpu":
        print()
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(gpt2_small(args.threads, tmp)))


if __name__ == "__main__":
    main()
