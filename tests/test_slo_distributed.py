"""Two processes (gloo, CPU): DDP, FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel`` with
``use_orig_params=True``) and replicated DTensor parameters on a sharded batch (``Partial`` gradients)
give single-process results.

The workers run once per module (one process pair for all configurations) and save what they saw;
the tests compare it with an unsharded single-process run on the full batch.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import CPU_FSDP2, free_port, needs_cpu_fsdp2, run_ranks
from slo_torch import SLOptimizer

pytestmark = pytest.mark.distributed

STEPS = 3
SPEEDS = {"0": 4.0, "2": 0.5, "*": 0.25}
CONFIGS = {  # name -> (optimizer, mode, speed unit)
    "sgd_grad": ("sgd", "grad", "frobenius"),
    "adamw_update": ("adamw", "update", "frobenius"),
    "sgd_grad_relative": ("sgd", "grad", "relative"),
    "adamw_update_relative": ("adamw", "update", "relative"),
    "adamw_update_rms": ("adamw", "update", "rms"),
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

ALL_WRAPPERS = ("ddp", "fsdp2", "fsdp1_auto", "fsdp1_root", "fsdp1_no_shard", "dtensor_partial")
#: the wrappers the workers run: FSDP2 only where this torch runs it on CPU
WRAPPERS = tuple(w for w in ALL_WRAPPERS if w != "fsdp2" or CPU_FSDP2)
TINY_LOSS_SCALE = 1e-30

WORKER = COMMON + textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.distributed.tensor import DTensor, Shard, distribute_module
    from torch.nn.parallel import DistributedDataParallel as DDP
    from slo_torch import SLOptimizer
    from slo_torch.layers import clean_name

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    configs = eval(sys.argv[5]); speeds = eval(sys.argv[6]); steps = int(sys.argv[7])
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = make_data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    mesh = init_device_mesh("cpu", (world,))
    all_reduces = []  # calls of dist.all_reduce (SLO's norm reduction uses it; DDP and DTensor do not)
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        all_reduces.append(1)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce

    def wrap(wrapper, model):
        if wrapper == "ddp":
            return DDP(model)
        if wrapper == "fsdp2":
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer)
            return fully_shard(model)
        if wrapper == "dtensor_partial":  # Replicate weights, Shard(0) batch: Partial(sum) gradients
            return distribute_module(model, mesh)
        # FSDP1: one flat parameter per Linear (split inside tensors) or one for the whole model
        # (whole tensors on one rank only, empty views on the other); NO_SHARD keeps full tensors
        policy = ModuleWrapPolicy({nn.Linear}) if wrapper == "fsdp1_auto" else None
        strategy = ShardingStrategy.NO_SHARD if wrapper == "fsdp1_no_shard" else ShardingStrategy.FULL_SHARD
        return FSDP(model, use_orig_params=True, auto_wrap_policy=policy, sharding_strategy=strategy,
                    device_id=torch.device("cpu"))

    def batch(wrapper):
        if wrapper == "dtensor_partial":
            return DTensor.from_local(xs, mesh, [Shard(0)]), DTensor.from_local(ys, mesh, [Shard(0)])
        return xs, ys

    def full_params(wrapper, net, model):
        if wrapper.startswith("fsdp1"):
            with FSDP.summon_full_params(net):
                return {clean_name(n): p.detach().clone() for n, p in net.named_parameters()}
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in model.named_parameters()}

    def train(wrapper, kind, mode, unit, head=False):
        model = make_model()
        net = wrap(wrapper, model)
        if head:  # only the last layer, which FSDP1 without auto-wrap places on rank 1 alone
            params, spec = [p for n, p in net.named_parameters() if clean_name(n).startswith("4.")], {"4": 2.0}
        else:
            params, spec = net.parameters(), speeds
        opt = SLOptimizer(make_optimizer(kind, params), model=net, speeds=spec, mode=mode, speed_unit=unit)
        xb, yb = batch(wrapper)
        norms, snapshots, local, reduced = [], [], [], []
        for _ in range(steps):
            opt.zero_grad()
            ((net(xb) - yb) ** 2).mean().backward()
            local.append(sum(p.grad is not None for p in opt.param_groups[0]["params"]))
            calls = len(all_reduces)
            opt.step()
            reduced.append(len(all_reduces) > calls)
            norms.append({k: float(v) for k, v in opt.last_grad_norms.items()})
            snapshots.append(full_params(wrapper, net, model))
        # sharded: every step all-reduced the norms; None if only some did
        sharded = True if all(reduced) else False if not any(reduced) else None
        return norms, snapshots, sharded, local

    def error_of(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    results = {}
    for wrapper in WRAPPERS:
        for name, (kind, mode, unit) in configs.items():
            norms, params, sharded, _ = train(wrapper, kind, mode, unit)
            results[(wrapper, name)] = (norms, params)
            results[(wrapper, name, "sharded")] = sharded
    for name, (kind, mode, unit) in configs.items():
        norms, params, sharded, local = train("fsdp1_root", kind, mode, unit, head=True)
        results[("fsdp1_root_head", name)] = (norms, params)
        results[("fsdp1_root_head", name, "local_grads")] = local
    # float32 gradients near 1e-31, whose squares underflow float32: the shards' sums of squares must not
    if "fsdp2" in WRAPPERS:
        tiny = make_model().float()
        for layer in (tiny[0], tiny[2], tiny[4]):
            fully_shard(layer)
        fully_shard(tiny)
        opt = SLOptimizer(torch.optim.SGD(tiny.parameters(), lr=0.1), model=tiny, speeds={"*": 1.0})
        (TINY_LOSS_SCALE * ((tiny(xs.float()) - ys.float()) ** 2).mean()).backward()
        opt.step()
        results["fsdp2_tiny_norms"] = {k: float(v) for k, v in opt.last_grad_norms.items()}
    flat = FSDP(make_model(), use_orig_params=False, device_id=torch.device("cpu"))
    results["flat_error"] = error_of(lambda: SLOptimizer(make_optimizer("sgd", flat.parameters()), model=flat,
                                                         speeds={"*": 1.0}))
    orig = FSDP(make_model(), use_orig_params=True, device_id=torch.device("cpu"))
    results["no_model_error"] = error_of(lambda: SLOptimizer(
        [{"params": orig.parameters(), "speed": 1.0}], base_optimizer=torch.optim.SGD, lr=0.1))
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("slo_dist")
    script, out = tmp / "worker.py", tmp / "results.pt"
    port = str(free_port())
    script.write_text(f"WRAPPERS = {WRAPPERS!r}\nTINY_LOSS_SCALE = {TINY_LOSS_SCALE!r}\n" + WORKER)
    run_ranks(lambda rank: [str(script), str(rank), "2", port, str(out), repr(CONFIGS), repr(SPEEDS), str(STEPS)],
              timeout=150)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


def _single_process(kind: str, mode: str, unit: str, head: bool = False) -> tuple[list, list]:
    namespace: dict = {}
    exec(COMMON, namespace)
    model = namespace["make_model"]()
    x, y = namespace["make_data"]()
    params, speeds = (model[4].parameters(), {"4": 2.0}) if head else (model.parameters(), SPEEDS)
    opt = SLOptimizer(namespace["make_optimizer"](kind, params), model=model, speeds=speeds, mode=mode, speed_unit=unit)
    norms, params = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        norms.append({k: float(v) for k, v in opt.last_grad_norms.items()})
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return norms, params


@pytest.mark.parametrize("wrapper", [pytest.param(w, marks=needs_cpu_fsdp2) if w == "fsdp2" else w
                                     for w in (*ALL_WRAPPERS, "fsdp1_root_head")])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_processes_equal_one(worker_results: list, wrapper: str, config: str) -> None:
    ref_norms, ref_params = _single_process(*CONFIGS[config], head=wrapper == "fsdp1_root_head")
    for rank, results in enumerate(worker_results):  # both ranks: the same, whole-tensor norms
        norms, params = results[(wrapper, config)]
        assert list(norms[0]) == list(ref_norms[0]), rank
        for step in range(STEPS):
            for layer, value in ref_norms[step].items():
                assert norms[step][layer] == pytest.approx(value, rel=1e-10), (rank, step, layer)
            for name, value in ref_params[step].items():
                torch.testing.assert_close(params[step][name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_gradients_take_the_sharded_path(worker_results: list, config: str) -> None:
    results = worker_results[0]
    for wrapper in {"fsdp2", "fsdp1_auto", "fsdp1_root"} & set(WRAPPERS):
        assert results[(wrapper, config, "sharded")] is True, wrapper
    for wrapper in ("ddp", "fsdp1_no_shard", "dtensor_partial"):  # full tensors on every rank
        assert results[(wrapper, config, "sharded")] is False, wrapper


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_rank_without_gradients_joins_the_step(worker_results: list, config: str) -> None:
    # rank 0 holds empty views of the last layer (no gradients) and still joins every all-reduce
    assert [r[("fsdp1_root_head", config, "local_grads")] for r in worker_results] == [[0] * STEPS, [2] * STEPS]


def test_fsdp1_setups_that_cannot_give_whole_tensor_norms_are_refused(worker_results: list) -> None:
    results = worker_results[0]
    assert "use_orig_params=True" in results["flat_error"]
    assert "pass the FSDP-wrapped model as model=" in results["no_model_error"]


@needs_cpu_fsdp2
def test_tiny_sharded_gradients_have_exact_whole_layer_norms(worker_results: list) -> None:
    namespace: dict = {}
    exec(COMMON, namespace)
    model = namespace["make_model"]().float()
    x, y = namespace["make_data"]()
    (TINY_LOSS_SCALE * ((model(x.float()) - y.float()) ** 2).mean()).backward()
    ref = {}
    for n, p in model.named_parameters():
        ref[n.rsplit(".", 1)[0]] = ref.get(n.rsplit(".", 1)[0], 0.0) + float(p.grad.double().pow(2).sum())
    assert max(ref.values()) < 1e-50  # squares far below float32's range
    for results in worker_results:
        assert results["fsdp2_tiny_norms"] == pytest.approx({k: v ** 0.5 for k, v in ref.items()}, rel=1e-5, abs=0.0)
