"""Memory of one ``NFAMonitor.measure()`` on GPT-2-config models, with and without a ``max_memory`` budget,
and the layer groups a Llama-7B-shaped model needs, from the estimate alone.

    python benchmarks/memory_budget.py                 # 4 blocks of width 768 (2 x 64 tokens): no budget, 400 and 250 MB
    python benchmarks/memory_budget.py --gpt2-small    # GPT-2 small on 2 x 256 tokens, no budget
    python benchmarks/memory_budget.py --llama         # groups of a Llama-7B-shaped model at 16 and 64 GB (meta device)

Each measurement runs in a fresh process: ``NFAMonitor(model, max_memory=...)`` with the default layers
(the block layers and the LM head, whose ``K = I`` is analytic), sketch m = 4, after a warm-up
``measure()`` on one 8-token sequence. Memory: peak resident set size during ``measure()`` minus the
resident size just before it (``memory_use.peak_rss_mb``); time: the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling modules, also when this file is loaded by path rather than run
    sys.path.insert(0, HERE)
from memory_use import peak_rss_mb  # noqa: E402

MB = 10**6


def child(n_layer: int, seq: int, budget: int | None, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from diagnostics import NFAMonitor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer))
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    NFAMonitor(model).measure(ids[:1, :8], estimator="sketch", m=4)  # warm-up without large buffers
    mon = NFAMonitor(model, max_memory=budget)
    seconds, extra_mb = peak_rss_mb(lambda: mon.measure(ids, estimator="sketch", m=4, generator=0))
    return {"groups": len(mon.groups), "layers": len(mon.adapters), "seconds": seconds, "extra_mb": extra_mb,
            "estimate_mb": mon.memory_estimate["total"] / MB}


def run_child(n_layer: int, seq: int, budget: int | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n_layer), str(seq), str(budget or 0), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(n_layer: int, seq: int, budget: int | None, threads: int) -> str:
    r = run_child(n_layer, seq, budget, threads)
    limit = "no budget" if budget is None else f"max_memory={budget // MB} MB"
    return (f"GPT-2 config, {n_layer} blocks of width 768, 2 x {seq} tokens, {r['layers']} layers, sketch m=4, "
            f"{limit}: {r['groups']} group(s), {r['seconds']:.1f} s, peak extra {r['extra_mb']:.0f} MB "
            f"(one-group estimate of the matrices {r['estimate_mb']:.0f} MB)")


def llama_groups() -> list[str]:
    """Groups of the block layers of a Llama-7B-shaped model (bfloat16, on the meta device) at 16 and 64 GB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from diagnostics import NFAMonitor
    from diagnostics.memory import layer_groups, estimate_memory

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    lines = []
    for gb in (16, 64):
        mon = NFAMonitor(model, layers=["model.layers.*"], max_k=None, max_memory=gb * 10**9)
        sizes = [len(g) for g in mon.groups]
        _, largest = layer_groups(mon.adapters, gb * 10**9)
        one = estimate_memory(mon.adapters)["total"]
        lines.append(f"Llama-7B shape, {len(mon.adapters)} block layers, max_memory={gb} GB: {len(mon.groups)} group(s) "
                     f"(layers per group {min(sizes)}-{max(sizes)}), largest group {largest / 10**9:.1f} GB "
                     f"(one group: {one / 10**9:.1f} GB)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gpt2-small", action="store_true", help="GPT-2 small (12 blocks) on 2 x 256 tokens, no budget")
    ap.add_argument("--llama", action="store_true", help="only the groups of a Llama-7B-shaped model (estimate)")
    ap.add_argument("--budgets-mb", type=int, nargs="+", default=[400, 250],
                    help="max_memory of the budgeted runs, in MB (10^6 bytes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared machines)")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n_layer, seq, budget = args.child
        print(json.dumps(child(n_layer, seq, budget or None, args.threads)))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs", flush=True)
    if args.llama:
        print("\n".join(llama_groups()))
        return
    if args.gpt2_small:
        print(report(12, 256, None, args.threads))
        return
    for budget in (None, *(b * MB for b in args.budgets_mb)):
        print(report(4, 64, budget, args.threads), flush=True)
    print("\n".join(llama_groups()))


if __name__ == "__main__":
    main()
