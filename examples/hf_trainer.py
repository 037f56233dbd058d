"""A small GPT-2 character model trained with ``transformers.Trainer``, SLO and the NFA callback.

The model is built from a ``GPT2Config`` (no downloads); the text is the docstrings of a fixed list
of Python standard-library modules, lower-cased and encoded character by character. The NFA
correlations of the transformer blocks' linear layers are logged as ``nfa/uc/<layer>`` and
``nfa/c/<layer>`` with the loss (and once at step 0, before training, into the log history); with ``--optimizer slo`` the per-layer gradient norms before the
speed limit are logged as ``slo/grad_norm/<layer>``.

    python examples/hf_trainer.py --optimizer slo --max-steps 300
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py      # 2 CPU processes (gloo)
    accelerate launch --config_file examples/accelerate_multi_gpu.yaml --num_processes 8 examples/hf_trainer.py

Without an accelerator the script sets ``use_cpu=True``: otherwise the Trainer of every process
launched by ``accelerate launch --multi_gpu`` would train alone. It prints ``world_size=<n>`` first and
saves ``trainer_state.json`` (the whole log history) and ``nfa_curves.png`` in the output directory.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import sys
import warnings
import weakref
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from diagnostics.experiments import check_ready, make_parser, nonnegative_float, nonnegative_int, positive_float
from diagnostics.experiments import Progress, interactive, positive_int
from diagnostics.optional import install_hint

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
except ImportError as exc:
    raise ModuleNotFoundError(install_hint(exc.name or "transformers"), name=exc.name) from exc

from diagnostics.files import atomic_write_text
from diagnostics.hf import NFACallback, nfa_rows_from_log_history
from slo_torch import SLOptimizer
from slo_torch.hf import SLOCallback

#: Characters kept from the corpus; everything else is dropped. Index = token id.
ALPHABET = "\n !\"'(),-.:;?_0123456789abcdefghijklmnopqrstuvwxyz"
#: Standard-library modules whose docstrings form the corpus (fixed, so every run sees the same text).
CORPUS_MODULES = (
    "argparse", "bisect", "collections", "contextlib", "csv", "dataclasses", "decimal", "fractions",
    "functools", "heapq", "itertools", "json", "logging", "pathlib", "random", "shutil", "statistics",
    "string", "textwrap",
)


# ------------------------------------------------------------------------------------------ data
def corpus_text(modules: tuple[str, ...] = CORPUS_MODULES) -> str:
    """Docstrings of ``modules`` and of their public functions and classes, lower-cased, restricted
    to :data:`ALPHABET`."""
    docs = []
    for name in modules:
        mod = importlib.import_module(name)
        docs.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    keep = set(ALPHABET)
    return "".join(c for c in "\n\n".join(docs).lower() if c in keep)


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text`` (index into :data:`ALPHABET`)."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return "".join(ALPHABET[int(i)] for i in ids)


class CharWindows(torch.utils.data.Dataset):
    """Windows of ``seq_len`` tokens every ``stride`` tokens; ``labels = input_ids`` (the model shifts)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int | None = None) -> None:
        if ids.numel() < seq_len:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
        stride = stride or seq_len
        self.windows = ids.unfold(0, seq_len, stride).clone()

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def split_corpus(ids: torch.Tensor, probe_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Training ids and held-out ids (the last ``probe_fraction`` of the text) for the NFA probe."""
    cut = int(ids.numel() * (1 - probe_fraction))
    return ids[:cut], ids[cut:]


# ------------------------------------------------------------------------------------------ model
def build_model(
    vocab_size: int = len(ALPHABET), seq_len: int = 64, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 (no dropout, so every process computes the same function)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers cannot infer it from the class name GPT2LMHeadModel and warns
    return model


def has_accelerator() -> bool:
    """True when a CUDA/ROCm, XPU or MPS device is usable."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def slo_speeds(promote: str, speed: float, others: float) -> dict[str, float]:
    """Speeds by module-name pattern: ``promote`` (e.g. ``transformer.h.0.mlp.c_fc``) moves at ``speed``,
    every other layer (embeddings, attention, LayerNorms, ...) at ``others``."""
    return {promote: speed, "*": others}


def optimizer_setup(name: str, model: nn.Module, lr: float, speeds: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """``(TrainingArguments.optim, extra Trainer kwargs)`` for ``--optimizer``. SLO goes the
    ``optimizer_cls_and_kwargs`` way: the Trainer builds ``SLOptimizer(model, **kwargs)`` itself."""
    if name == "sgd":
        return "sgd", {}
    if name == "adamw":
        return "adamw_torch", {}
    if name == "slo":
        kwargs = {"base_optimizer": torch.optim.SGD, "model": model, "speeds": speeds, "mode": "grad", "lr": lr}
        return "sgd", {"optimizer_cls_and_kwargs": (SLOptimizer, kwargs)}
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adamw or slo")


# ------------------------------------------------------------------------------------------ main
class ProgressLines(TrainerCallback):
    """Progress lines on stderr (``diagnostics.experiments.Progress``: step, last logged loss, elapsed, ETA)
    from the main process, for runs whose output is not a terminal (the Trainer's tqdm bar is used on one)."""

    bar: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = Progress(total=state.max_steps, initial=state.global_step, desc="train", bar=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs and "loss" in logs:
            self.bar.report(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, validated; checks the output folder (and matplotlib, unless ``--no-plot``) before
    any training."""
    p = make_parser(__doc__)
    p.add_argument("--max-steps", type=positive_int, default=300, help="optimizer steps")
    p.add_argument("--output-dir", default="runs/hf_trainer", help="Trainer output folder")
    p.add_argument("--optimizer", choices=("sgd", "adamw", "slo"), default="slo", help="optimizer")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate; default: sgd 0.5, adamw 3e-3, slo 0.05")
    p.add_argument("--promote", default="transformer.h.0.mlp.c_fc", help="SLO: layer (pattern) moving at --speed")
    p.add_argument("--speed", type=nonnegative_float, default=4.0, help="SLO: speed C of --promote")
    p.add_argument("--others", type=nonnegative_float, default=1.0, help="SLO: speed of every other layer")
    p.add_argument("--max-grad-norm", type=nonnegative_float, default=None,
                   help="Trainer gradient clipping; default 0 (off) with slo, 1.0 otherwise")
    p.add_argument("--batch-size", type=positive_int, default=16, help="per device")
    p.add_argument("--seq-len", type=positive_int, default=64, help="tokens per sequence (model context)")
    p.add_argument("--n-embd", type=positive_int, default=64, help="model width")
    p.add_argument("--n-layer", type=positive_int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=positive_int, default=4, help="attention heads (must divide --n-embd)")
    p.add_argument("--nfa-every", type=positive_int, default=25, help="NFA measurement cadence (steps)")
    p.add_argument("--nfa-layers", default="transformer.h.*", help="glob over module names (also filters --compare)")
    p.add_argument("--probe-size", type=positive_int, default=8, help="held-out sequences in the NFA probe")
    p.add_argument("--estimator", choices=("sketch", "exact"), default="sketch", help="how K is estimated")
    p.add_argument("--logging-steps", type=positive_int, default=25, help="log (loss, NFA, SLO norms) every N steps")
    p.add_argument("--save-steps", type=nonnegative_int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--report-to", default="none", help="Trainer reporters: none, tensorboard, wandb, all, ...")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the model and the data order")
    p.add_argument("--no-plot", action="store_true", help="do not write nfa_curves.png")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", default=None,
                   help="do not train: plot and tabulate the trainer_state.json of finished runs into --output-dir")
    a = p.parse_args(argv)
    if a.n_embd % a.n_head:
        p.error(f"argument --n-head: must divide --n-embd={a.n_embd}, got {a.n_head}")
    if a.resume is not None and not os.path.isdir(a.resume):
        p.error(f"argument --resume: {a.resume} is not a checkpoint folder")
    for run_dir in a.compare or ():
        if not os.path.isfile(os.path.join(run_dir, "trainer_state.json")):
            p.error(f"argument --compare: {run_dir} holds no trainer_state.json; "
                    "pass the --output-dir of finished runs")
    check_ready(p, a.output_dir, modules=[] if a.no_plot and not a.compare else ["matplotlib"], option="--output-dir")
    return a


DEFAULT_LR = {"sgd": 0.5, "adamw": 3e-3, "slo": 0.05}


def main(argv: list[str] | None = None) -> Trainer | None:
    a = parse_args(argv)
    if a.compare:
        compare_runs(a.compare, a.output_dir, a.nfa_layers)
        return None
    lr = a.lr if a.lr is not None else DEFAULT_LR[a.optimizer]
    train_ids, probe_ids = split_corpus(encode(corpus_text()))
    train = CharWindows(train_ids, a.seq_len, stride=a.seq_len // 2)
    probe = CharWindows(probe_ids, a.seq_len).windows[: a.probe_size]
    model = build_model(len(ALPHABET), a.seq_len, a.n_embd, a.n_layer, a.n_head, a.seed)
    optim, trainer_kwargs = optimizer_setup(a.optimizer, model, lr, slo_speeds(a.promote, a.speed, a.others))
    max_grad_norm = a.max_grad_norm if a.max_grad_norm is not None else (0.0 if a.optimizer == "slo" else 1.0)
    args = TrainingArguments(
        output_dir=a.output_dir,
        use_cpu=not has_accelerator(),
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        logging_steps=a.logging_steps,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        optim=optim,
        report_to=a.report_to,
        disable_tqdm=not interactive(),  # a tqdm bar on a terminal, ProgressLines otherwise
        seed=a.seed,
        ddp_find_unused_parameters=False,  # every parameter is used: spares DDP a graph traversal and a warning
    )
    print(f"world_size={args.world_size} process_index={args.process_index} device={args.device} "
          f"torch_threads={torch.get_num_threads()}", flush=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, **trainer_kwargs)
    # add_to: ahead of the report_to reporters, which then receive nfa/* and slo/*
    NFACallback(probe, every_n_steps=a.nfa_every, layers=a.nfa_layers, estimator=a.estimator, m=8,
                save_snapshots=True, measure_at_start=True).add_to(trainer)
    if not interactive():
        trainer.add_callback(ProgressLines())
    if a.optimizer == "slo":
        SLOCallback().add_to(trainer)  # warns if --max-grad-norm > 0 makes the clipping moot
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_state()
    if trainer.is_world_process_zero():
        report(trainer, a)
    release_process_group(trainer)
    return trainer


def release_process_group(trainer: Trainer) -> None:
    """Destroy the default process group after training (neither the Trainer nor accelerate does).

    A process that exits with the group alive can abort ("terminate called without an active exception"): a
    gloo worker thread still releasing the tensors of a finished collective needs the GIL while Python shuts
    down. Destroying the group joins those threads, with the GIL released, provided the group's last reference
    is the one dropped here: the DDP wrapper's reducer would otherwise destroy it later while holding the GIL,
    which a joined thread may be waiting for. So the wrapper is released first.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    wrapper = weakref.ref(trainer.model_wrapped)
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # accelerate's references to the wrapper
    gc.collect()
    if wrapper() is not None and wrapper() is not trainer.model:
        warnings.warn("the DDP wrapper of the model is still referenced; destroying the process group anyway",
                      RuntimeWarning, stacklevel=2)
    torch.distributed.destroy_process_group()


def report(trainer: Trainer, a: argparse.Namespace) -> None:
    """Print the last logged values and plot the NFA curves to ``<output-dir>/nfa_curves.png``."""
    history = trainer.state.log_history
    rows = nfa_rows_from_log_history(history)
    losses = [h["loss"] for h in history if "loss" in h]
    last = {r["layer"]: r for r in rows}
    print(json.dumps({"optimizer": a.optimizer, "final_loss": losses[-1] if losses else None,
                      "nfa": {k: {m: round(v[m], 4) for m in ("uc_nfa", "c_nfa")} for k, v in last.items()}}))
    if rows and not a.no_plot:
        from diagnostics.plots import plot_nfa_curves

        path = plot_nfa_curves(rows, os.path.join(a.output_dir, "nfa_curves.png"),
                               title=f"GPT-2 char model, {a.optimizer}")
        print(f"wrote {path}")


def compare_runs(run_dirs: list[str], output_dir: str, layers: str = "*") -> None:
    """One plot (``nfa_curves.png``, a colour per run, the layers matching the glob ``layers``) and one
    markdown table (``nfa_table.md``: final loss, last UC-/C-NFA averaged over those layers, and of the
    first block's MLP input layer) from the ``trainer_state.json`` of finished runs, each run named by
    its directory."""
    from diagnostics.plots import plot_nfa_curves

    rows, table = [], ["| run | final loss | mean UC-NFA | mean C-NFA | h.0.mlp.c_fc UC-NFA | h.0.mlp.c_fc C-NFA |",
                       "|---|---|---|---|---|---|"]
    for run_dir in run_dirs:
        name = os.path.basename(os.path.normpath(run_dir))
        with open(os.path.join(run_dir, "trainer_state.json"), encoding="utf-8") as fh:
            history = json.load(fh)["log_history"]
        run_rows = [dict(r, run=name) for r in nfa_rows_from_log_history(history) if fnmatchcase(r["layer"], layers)]
        if not run_rows:
            raise ValueError(f"{run_dir!r} logged no nfa/* values for layers {layers!r}")
        rows += run_rows
        last_step = max(r["step"] for r in run_rows)
        last = {r["layer"]: r for r in run_rows if r["step"] == last_step}
        fc = last.get("transformer.h.0.mlp.c_fc", {})
        loss = [h["loss"] for h in history if "loss" in h][-1]
        mean = {m: sum(r[m] for r in last.values()) / len(last) for m in ("uc_nfa", "c_nfa")}
        table.append(f"| {name} | {loss:.3f} | {mean['uc_nfa']:.3f} | {mean['c_nfa']:.3f} | "
                     f"{fc.get('uc_nfa', float('nan')):.3f} | {fc.get('c_nfa', float('nan')):.3f} |")
    os.makedirs(output_dir, exist_ok=True)
    path = plot_nfa_curves(rows, os.path.join(output_dir, "nfa_curves.png"), group_key="run",
                           title="GPT-2 char model: NFA correlations per layer")
    table_path = os.path.join(output_dir, "nfa_table.md")
    atomic_write_text(table_path, "\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
