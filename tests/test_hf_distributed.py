"""Trainer + SLO + NFA callback on two CPU processes (gloo) equal one process on the same global batch."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from conftest import SEQ, char_ids, free_port, load_example, tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"
PER_DEVICE = 4
WORLD = 2
TIMEOUT_S = 150


@contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: after ``seconds`` kill the worker processes and raise ``TimeoutError``."""

    def expire(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            child.kill()
        raise TimeoutError(f"distributed run did not finish within {seconds} s (deadlock?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def train_tiny(output_dir: str, batch_size: int) -> dict[str, Any]:
    """A tiny float64 GPT-2 trained 4 steps with SLO (SGD + momentum), NFACallback (exact) and
    SLOCallback; returns the world size, the logged NFA/SLO values and the final parameters."""
    from transformers import Trainer, TrainingArguments

    from diagnostics.hf import NFACallback
    from slo_torch import SLOptimizer
    from slo_torch.hf import SLOCallback

    ex = load_example("hf_trainer", "hf_trainer_example_dist")
    ids, probe_ids = char_ids(ex)
    train = ex.CharWindows(ids[:2000], SEQ)
    probe = ex.CharWindows(probe_ids, SEQ).windows[:6]
    model = tiny_gpt2(ex)
    speeds = {"transformer.h.0.mlp.c_fc": 2.0, "*": 0.5}
    kwargs = {"base_optimizer": torch.optim.SGD, "model": model, "speeds": speeds, "lr": 0.05, "momentum": 0.9}
    args = TrainingArguments(
        output_dir=output_dir, use_cpu=True, max_steps=4, per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=2, save_strategy="no",
        train_sampling_strategy="sequential", report_to="none", disable_tqdm=True, seed=0,
    )
    nfa = NFACallback(probe, every_n_steps=2, estimator="exact", save_snapshots=True)
    trainer = Trainer(model, args, train_dataset=train, callbacks=[nfa, SLOCallback()],
                      optimizer_cls_and_kwargs=(SLOptimizer, kwargs))
    trainer.train()
    trainer.save_state()
    logged = [{k: v for k, v in h.items() if k.startswith(("nfa/", "slo/", "step"))}
              for h in trainer.state.log_history if "loss" in h]
    return {
        "world_size": args.world_size,
        "rank": args.process_index,
        "logged": logged,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _worker(tmp: str) -> None:
    """Runs in each process started by ``accelerate.debug_launcher`` (torch.distributed already set up)."""
    from accelerate.state import AcceleratorState

    # Without OMP_NUM_THREADS accelerate sets torch's threads to physical cores / processes of the
    # host, which oversubscribes a small container many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # forget state inherited from the parent
    rank = torch.distributed.get_rank()
    result = train_tiny(os.path.join(tmp, f"out_rank{rank}"), PER_DEVICE)
    torch.save(result, os.path.join(tmp, f"result_rank{rank}.pt"))


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    with hard_timeout(TIMEOUT_S):
        accelerate.debug_launcher(_worker, args=(str(tmp_path),), num_processes=WORLD)
    results = [torch.load(tmp_path / f"result_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["world_size"] for r in results] == [WORLD, WORLD]
    assert [r["rank"] for r in results] == [0, 1]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_tiny(str(tmp_path / "single"), PER_DEVICE * WORLD)
    finally:
        torch.set_num_threads(n)
    assert single["world_size"] == 1

    dist0 = results[0]
    assert [e["step"] for e in dist0["logged"]] == [e["step"] for e in single["logged"]] == [2, 4]
    for got, want in zip(dist0["logged"], single["logged"]):
        nfa_keys = [k for k in want if k.startswith("nfa/")]
        assert len(nfa_keys) == 10 and any(k.startswith("slo/grad_norm/") for k in want)
        for key in nfa_keys + [k for k in want if k.startswith("slo/")]:
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # rank 1 measured its shard too and got the all-reduced values
    for got, want in zip(results[1]["logged"], single["logged"]):
        for key in (k for k in want if k.startswith("nfa/")):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    for name, p in single["params"].items():
        for r in results:
            torch.testing.assert_close(r["params"][name], p, rtol=0, atol=1e-6, msg=name)
    ex = load_example("hf_trainer", "hf_trainer_example_dist")
    init = tiny_gpt2(ex)
    assert not torch.allclose(single["params"]["transformer.h.0.mlp.c_fc.weight"], init.transformer.h[0].mlp.c_fc.weight)

    # only world-process-zero writes: rank 1's output directory holds no file
    assert files_under(tmp_path / "out_rank1") == []
    written = files_under(tmp_path / "out_rank0")
    assert "trainer_state.json" in written
    assert {"nfa/step_0000002.safetensors", "nfa/step_0000004.safetensors"} <= set(written)


# Runs the example as ``__main__`` and reports, after it returned, whether it left the process group alive: a
# gloo worker thread may then release a collective's tensors during interpreter shutdown and abort the process.
EXIT_CHECK = """
import atexit, runpy, sys
import torch.distributed as dist
atexit.register(lambda: print("process group alive at exit" if dist.is_initialized() else "process group destroyed",
                              file=sys.stderr, flush=True))
sys.argv[0] = {example!r}
runpy.run_path({example!r}, run_name="__main__")
"""


def test_example_under_accelerate_launch_multi_gpu_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    wrapper = tmp_path / "run_example.py"
    wrapper.write_text(EXIT_CHECK.format(example=str(EXAMPLE)))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(wrapper), "--max-steps", "4", "--nfa-every", "2", "--logging-steps", "2", "--batch-size", "4",
        "--seq-len", "16", "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--probe-size", "4",
        "--output-dir", str(out), "--no-plot",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("process group destroyed") == WORLD, proc.stderr[-4000:]
    assert "still referenced" not in proc.stderr  # the group's last reference was dropped with the GIL released
    for rank in range(WORLD):
        assert f"world_size={WORLD} process_index={rank}" in proc.stdout, proc.stdout
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    assert "nfa/c/transformer.h.0.mlp.c_fc" in logged[-1]
    assert "slo/grad_norm/transformer.h.0.mlp.c_fc" in logged[-1]
    assert history[0]["step"] == 0 and "nfa/uc/transformer.h.0.mlp.c_fc" in history[0]  # measured on both ranks
    assert sorted(p.name for p in (out / "nfa").iterdir()) == [
        "step_0000000.safetensors", "step_0000002.safetensors", "step_0000004.safetensors"]
