"""Cost of monitoring a training run: transformers.Trainer with and without NFACallback.

Model: a GPT-2 configuration (``--n-layer`` blocks of width ``--n-embd``, context ``--seq-len``,
vocabulary ``--vocab``), trained from scratch on random token sequences with AdamW. The callback runs
at its default cadence (``every_n_steps=100``, plus the last step) with its defaults (every linear
layer and the LM head, sketch m = 8) on a probe of ``--probe`` sequences.

Runs alternate in one process (without, with, without, with, ... ``--repeats`` pairs), each from
the same initial weights and data. Time: wall time of ``trainer.train()``. Memory: peak resident set
size during ``trainer.train()`` (``VmHWM``, reset via ``/proc/self/clear_refs``) minus the resident
size just before it. Prints every run, the ratios (with / without) of the median time and of the
median peak extra memory, and the time spent inside the callback's measurements relative to the
rest of the same run (on a busy shared machine, separate runs see different loads; this share does
not depend on that).

    python benchmarks/monitor_overhead.py                      # 6 x 384, context 128, 300 steps
    python benchmarks/monitor_overhead.py --quick              # the same ratios in about 2 minutes on 2 CPU cores
    python benchmarks/monitor_overhead.py --device cuda        # on a GPU (memory: peak allocated on the device)

``--quick`` is ``--steps 100 --batch 2 --probe 1 --vocab 8192 --repeats 1`` (one measurement, at the last
step). On ``--device cuda`` the memory is the peak of ``torch.cuda.max_memory_allocated`` during
``trainer.train()`` minus the memory allocated before it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # sibling modules, also when this file is loaded by path rather than run
    sys.path.insert(0, HERE)
from call_time import summing_time  # noqa: E402
from memory_use import peak_cuda_mb, peak_rss_mb  # noqa: E402

#: What ``--quick`` sets.
QUICK = {"steps": 100, "batch": 2, "probe": 1, "vocab": 8192, "repeats": 1}


def run(args: argparse.Namespace, with_nfa: bool, out: str) -> tuple[float, float, int, float]:
    """One training run; returns (seconds, peak extra MB, number of NFA measurements, seconds spent
    in them)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

    from diagnostics.hf import NFACallback

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=args.seq_len,
                        vocab_size=args.vocab, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    n_train = args.steps * args.batch
    tokens = torch.randint(0, args.vocab, (n_train, args.seq_len), generator=g)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    probe = torch.randint(0, args.vocab, (args.probe, args.seq_len), generator=g)
    callbacks = [NFACallback(probe)] if with_nfa else []
    in_measure = [0.0]
    if with_nfa:  # time spent inside the callback's measurements, within the same run
        callbacks[0].measure = summing_time(callbacks[0].measure, in_measure)
    targs = TrainingArguments(
        output_dir=out, use_cpu=args.device == "cpu", max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=3e-4, logging_steps=args.steps, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model, targs, train_dataset=data, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no console dict per log
    seconds, extra_mb = (peak_rss_mb if args.device == "cpu" else peak_cuda_mb)(trainer.train)
    n_measure = len(callbacks[0].monitor.history) if with_nfa else 0
    return seconds, extra_mb, n_measure, in_measure[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=6, help="transformer blocks")
    ap.add_argument("--n-embd", type=int, default=384, help="model width")
    ap.add_argument("--n-head", type=int, default=6, help="attention heads")
    ap.add_argument("--seq-len", type=int, default=128, help="context length (tokens per sequence)")
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--probe", type=int, default=4, help="probe sequences")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (without, with)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on shared machines)")
    ap.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model trains")
    args = ap.parse_args()
    if args.quick:  # options left at their defaults take the quick values
        vars(args).update({k: v for k, v in QUICK.items() if getattr(args, k) == ap.get_default(k)})
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), {os.cpu_count()} CPUs; GPT-2 config "
          f"{args.n_layer} x {args.n_embd}, context {args.seq_len}, vocab {args.vocab}; {args.steps} steps of "
          f"{args.batch} sequences; probe {args.probe} sequences; NFACallback defaults (every 100 steps, sketch m=8)")
    times: dict[bool, list[float]] = {False: [], True: []}
    fractions: list[float] = []
    mems: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for with_nfa in (False, True):
                seconds, extra_mb, n, nfa_s = run(args, with_nfa, os.path.join(tmp, f"run{i}{int(with_nfa)}"))
                times[with_nfa].append(seconds)
                mems[with_nfa].append(extra_mb)
                label = "without"
                if with_nfa:
                    fractions.append(nfa_s / (seconds - nfa_s))
                    label = f"with NFACallback ({n} measurements, {nfa_s:.1f} s in them)"
                print(f"run {i}: {label}: {seconds:.1f} s, peak extra {extra_mb:.0f} MB", flush=True)
    t_off, t_on = statistics.median(times[False]), statistics.median(times[True])
    m_off, m_on = statistics.median(mems[False]), statistics.median(mems[True])
    print(f"time ratio (with / without, medians): {t_on / t_off:.3f} ({t_on:.1f} s / {t_off:.1f} s)")
    print(f"measurement time / the rest of the same run (median): {statistics.median(fractions):.3f} "
          "(less sensitive to other load on the machine than the ratio of separate runs)")
    print(f"peak extra memory ratio (with / without, medians): {m_on / m_off:.3f} ({m_on:.0f} MB / {m_off:.0f} MB)")


if __name__ == "__main__":
    main()
