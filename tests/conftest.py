"""Shared test setup: the example scripts loaded by file path (no ``examples/`` on ``sys.path``), one torch thread
for the tests that train, and the tiny GPT-2 character model of ``examples/hf_trainer.py``."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: Sequence length of the tiny GPT-2 character model.
SEQ = 16
#: FSDP2 (``fully_shard``) on CPU records events on torch's CPU stream; torch 2.6's cannot.
CPU_FSDP2 = hasattr(torch.cpu.Stream, "record_event")
needs_cpu_fsdp2 = pytest.mark.skipif(
    not CPU_FSDP2,
    reason=f"FSDP2 (fully_shard) on CPU needs torch.cpu.Stream.record_event, which torch {torch.__version__} lacks",
)


def load_example(name: str, module_name: str | None = None) -> ModuleType:
    """``examples/<name>.py`` executed as a fresh module named ``module_name`` (default ``example_<name>``),
    registered in ``sys.modules`` (dataclasses and pickling look the module up there)."""
    module_name = module_name or f"example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: Callable[[int], list[str]], world: int = 2, env: Callable[[int], Mapping[str, str]] | None = None,
              timeout: float = 300) -> list[str]:
    """Run ``python *argv(rank)`` for every rank at once (extra environment ``env(rank)``) and return each
    one's stdout + stderr; fail the test with every log unless all exit 0 in ``timeout`` seconds."""
    procs = [subprocess.Popen([sys.executable, *argv(rank)], env={**os.environ, **(env(rank) if env else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"processes still running after {timeout} s (a hang in a collective?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return logs


def tiny_gpt2(ex: ModuleType) -> torch.nn.Module:
    """The hf example's GPT-2, one block of width 16 with 2 heads, float64, seed 0."""
    return ex.build_model(len(ex.ALPHABET), SEQ, n_embd=16, n_layer=1, n_head=2, seed=0).double()


def char_ids(ex: ModuleType) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out token ids of a small corpus (the docstrings of ``textwrap`` and ``heapq``)."""
    return ex.split_corpus(ex.encode(ex.corpus_text(("textwrap", "heapq"))))


def cuda_host_syncs(fn: Callable[[], object]) -> int:
    """Synchronisations of the host with the CUDA device during ``fn()``, counted by torch's sync debug mode."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: much faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_example() -> Any:
    """``examples/hf_trainer.py`` as a module (needs transformers)."""
    pytest.importorskip("transformers")
    return load_example("hf_trainer")
