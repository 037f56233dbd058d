"""Two processes (gloo, CPU): DDP and FSDP2 (``fully_shard``) give single-process results.

The workers run once per module (one process pair for all configurations) and save what they saw;
the tests compare it with an unsharded single-process run on the full batch.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from slo_torch import SLOptimizer

pytestmark = pytest.mark.distributed

STEPS = 3
SPEEDS = {"0": 4.0, "2": 0.5, "*": 0.25}
CONFIGS = {  # name -> (optimizer, mode)
    "sgd_grad": ("sgd", "grad"),
    "adamw_update": ("adamw", "update"),
}

COMMON = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)).double()

    def make_data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)

    def make_optimizer(kind, params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
""")

WORKER = COMMON + textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from slo_torch import SLOptimizer

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    configs = eval(sys.argv[5]); speeds = eval(sys.argv[6]); steps = int(sys.argv[7])
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = make_data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    results = {}
    for wrapper in ("ddp", "fsdp2"):
        for name, (kind, mode) in configs.items():
            model = make_model()
            if wrapper == "ddp":
                net = DDP(model)
            else:
                for layer in (model[0], model[2], model[4]):
                    fully_shard(layer)
                net = fully_shard(model)
            opt = SLOptimizer(make_optimizer(kind, net.parameters()), model=net, speeds=speeds, mode=mode)
            norms, params = [], []
            for _ in range(steps):
                opt.zero_grad()
                ((net(xs) - ys) ** 2).mean().backward()
                opt.step()
                norms.append({k: float(v) for k, v in opt.last_grad_norms.items()})
                params.append({n: full(p.detach()).clone() for n, p in model.named_parameters()})
            results[(wrapper, name)] = (norms, params)
            results[(wrapper, name, "sharded")] = opt._limiter._distributed
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("slo_dist")
    script, out = tmp / "worker.py", tmp / "results.pt"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", port, str(out), repr(CONFIGS),
                          repr(SPEEDS), str(STEPS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("distributed workers timed out (hang)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return torch.load(out)


def _single_process(kind: str, mode: str) -> tuple[list, list]:
    namespace: dict = {}
    exec(COMMON, namespace)
    model = namespace["make_model"]()
    x, y = namespace["make_data"]()
    opt = SLOptimizer(namespace["make_optimizer"](kind, model.parameters()), model=model, speeds=SPEEDS, mode=mode)
    norms, params = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        norms.append({k: float(v) for k, v in opt.last_grad_norms.items()})
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return norms, params


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_processes_equal_one(worker_results: dict, wrapper: str, config: str) -> None:
    norms, params = worker_results[(wrapper, config)]
    ref_norms, ref_params = _single_process(*CONFIGS[config])
    assert list(norms[0]) == ["0", "2", "4"]
    for step in range(STEPS):
        for layer, value in ref_norms[step].items():  # whole-tensor norms, not the local shard's
            assert norms[step][layer] == pytest.approx(value, rel=1e-10)
        for name, value in ref_params[step].items():
            torch.testing.assert_close(params[step][name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fsdp2_gradients_take_the_sharded_path(worker_results: dict, config: str) -> None:
    assert worker_results[("fsdp2", config, "sharded")] is True
    assert worker_results[("ddp", config, "sharded")] is False
