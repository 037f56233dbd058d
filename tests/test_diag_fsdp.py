"""FSDP2 (fully_shard, DTensor weights) on two gloo processes gives the records of one unsharded process."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from diagnostics import NFAMonitor, load_snapshot

transformers = pytest.importorskip("transformers")

from conftest import free_port, needs_cpu_fsdp2, run_ranks  # noqa: E402

COMMON = textwrap.dedent(
    """
    import torch, transformers

    def build():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_positions=8,
                                         bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)

    def moved(name, shape):  # deterministic new weights after the monitor took W_0
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        return 0.05 * torch.randn(shape, generator=g)

    def probe():
        return torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(3))

    def callback_step(model, batch, out, rank=0):
        # NFACallback's events around one SGD step, as the Trainer calls them; returns the logs
        from types import SimpleNamespace
        from transformers import TrainerControl, TrainerState
        from diagnostics.hf import NFACallback

        cb = NFACallback(probe(), every_n_steps=1, estimator="exact", save_snapshots=True)
        args = SimpleNamespace(output_dir=out, report_to=[])
        state = TrainerState(global_step=0, max_steps=3, is_world_process_zero=rank == 0)
        cb.on_train_begin(args, state, TrainerControl(), model=model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        model(batch, labels=batch).loss.backward()
        opt.step()
        state.global_step = 1
        control = cb.on_step_end(args, state, TrainerControl(), model=model)
        logs = {}
        cb.on_log(args, state, control, logs=logs)
        return logs
    """
)

WORKER = COMMON + textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from diagnostics import NFAMonitor
    from diagnostics.distributed import shard_probe

    torch.set_num_threads(1)
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model = build()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model.lm_head.weight, DTensor)
    mon = NFAMonitor(model)
    assert all(isinstance(w, DTensor) for w in mon.W0.values())  # W_0 stays sharded
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(distribute_tensor(moved(name, p.shape), p.device_mesh, p.placements))
    res = mon.measure(shard_probe(probe()), step=2, chunk_size=3)
    print("REC", sorted((n, r.estimator, r.n_samples, round(r.uc_nfa, 6), round(r.c_nfa, 6)) for n, r in res.items()))
    mon.save(out + "/snap.safetensors")  # every rank gathers, rank 0 writes
    try:
        mon.measure(probe()[: 3 + rank])  # shards of different shapes cannot run in lockstep
    except ValueError as err:
        print("ERR", err)
    from torch.distributed.fsdp import FullyShardedDataParallel
    fsdp1 = FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)),
                                     use_orig_params=True, device_id=torch.device("cpu"))
    try:
        NFAMonitor(fsdp1)
    except TypeError as err:
        print("FSDP1", err)
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    tp = parallelize_module(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)), mesh,
                            {"0": ColwiseParallel()})
    try:
        NFAMonitor(tp)
    except TypeError as err:
        print("TP", err)
    mon.detach()
    import json
    logs = callback_step(model, shard_probe(probe()), out + "/cb", rank)
    print("CB", json.dumps(logs, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def run_workers(script: str, args: list[str], timeout: int = 300) -> list[str]:
    port = str(free_port())
    return run_ranks(lambda r: [script, str(r), port, *args], timeout=timeout)


def unsharded_reference():
    namespace: dict = {}
    exec(COMMON, namespace)
    model = namespace["build"]()
    mon = NFAMonitor(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(namespace["moved"](name, p.shape))
    return mon, mon.measure(namespace["probe"](), step=2)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One 2-process FSDP2 run shared by the tests below: (logs of both ranks, output directory)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return run_workers(str(script), [str(tmp_path)]), tmp_path


@pytest.mark.distributed
@needs_cpu_fsdp2
def test_fsdp2_records_match_one_unsharded_process(fsdp_run) -> None:
    logs, tmp_path = fsdp_run
    rec_lines = [next(line for line in log.splitlines() if line.startswith("REC ")) for log in logs]
    assert rec_lines[0] == rec_lines[1], rec_lines  # every rank returns the same records
    assert all("ERR with FSDP-sharded weights every rank must measure a probe shard of the same shape" in log
               for log in logs), logs
    assert all("FSDP1 FullyShardedDataParallel (FSDP1) models cannot be monitored" in log for log in logs), logs
    assert all("TP only DTensor weights sharded by torch.distributed.fsdp.fully_shard" in log for log in logs), logs
    mon, single = unsharded_reference()
    snap = load_snapshot(tmp_path / "snap.safetensors")
    assert set(snap.records) == set(single) and single["lm_head"].estimator == "analytic"
    for name, rec in single.items():
        got = snap.records[name]
        assert got.n_samples == rec.n_samples == 40 and got.estimator == rec.estimator
        for key in ("uc_nfa", "c_nfa", "rel_change", "kernel_alignment"):
            assert abs(getattr(got, key) - getattr(rec, key)) <= 1e-5, (name, key)
        for key, value in rec.norms.items():
            assert abs(got.norms[key] - value) <= 1e-5 * (1 + value), (name, key)
        W = mon.adapters[name].weight_matrix().detach()
        torch.testing.assert_close(snap.matrices[name]["W"], W, rtol=0, atol=0)
        torch.testing.assert_close(snap.matrices[name]["W0"], mon.W0[name], rtol=0, atol=0)
        if name in mon.last_K:
            torch.testing.assert_close(snap.matrices[name]["K"], mon.last_K[name], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@needs_cpu_fsdp2
def test_fsdp2_nfa_callback_matches_unsharded(fsdp_run, tmp_path) -> None:
    """The Trainer's fsdp option needs accelerators (on CPU it runs DDP or refuses), so NFACallback's
    events are driven around a manual FSDP2 training step; the logged values equal one process."""
    logs, out = fsdp_run
    got = [json.loads(next(line for line in log.splitlines() if line.startswith("CB "))[3:]) for log in logs]
    namespace: dict = {}
    exec(COMMON, namespace)
    model = namespace["build"]()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(namespace["moved"](name, p.shape))
    want = namespace["callback_step"](model, namespace["probe"](), str(tmp_path / "single"))
    assert len(want) == 2 * 9 and all(math.isfinite(v) for v in want.values())
    for rank_logs in got:
        assert set(rank_logs) == set(want)
        for key, value in want.items():
            assert abs(rank_logs[key] - value) <= 1e-5, key
    assert (out / "cb" / "nfa" / "step_0000001.safetensors").exists()
