"""``NFACallback`` in a ``Trainer`` whose model accelerate shards with FSDP2 (two gloo processes) logs the
values of one unsharded process.

accelerate enables FSDP only on accelerators; on CPU the worker lifts that device gate alone
(``distributed_type`` and ``fsdp_plugin`` on the accelerator state, as a GPU run would set them), so the
Trainer's own FSDP2 path runs: ``fsdp2_prepare_model`` wraps every ``GPT2Block`` and the model with
``fully_shard`` and trains with ``DTensor`` weights.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import free_port, needs_cpu_fsdp2, run_ranks  # noqa: E402

from diagnostics import load_snapshot  # noqa: E402

pytestmark = [pytest.mark.distributed, needs_cpu_fsdp2]

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from diagnostics.hf import NFACallback

    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)


    class FSDP2OnCPUTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["GPT2Block"])
            self.is_fsdp_enabled = True


    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=11, n_positions=8, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 11, (16, 6), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    probe = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=4 if mode == "single" else 2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, optim="sgd",
                             learning_rate=0.5, lr_scheduler_type="constant", disable_tqdm=True)
    callback = NFACallback(probe, every_n_steps=1, estimator="exact", save_snapshots=True)
    cls = FSDP2OnCPUTrainer if mode == "fsdp2" else Trainer
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logs = [{k: v for k, v in h.items() if k.startswith("nfa/") or k == "loss"} for h in trainer.state.log_history]
    weight = type(trainer.model.lm_head.weight).__name__
    print("RESULT", json.dumps({"weight": weight, "logs": [h for h in logs if h]}))
    # everything checked is printed: skip interpreter finalization, where gloo's worker threads rarely
    # abort the process ("terminate called without an active exception", a torch/gloo shutdown race)
    import os
    sys.stdout.flush()
    os._exit(0)
    """
)


def result(log: str) -> dict:
    return json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:])


def run(script, mode: str, out, world: int) -> list[dict]:
    port = str(free_port())
    env = (lambda r: dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) if world > 1 else None
    return [result(log) for log in run_ranks(lambda r: [str(script), mode, str(out)], world, env, timeout=600)]


def test_trainer_fsdp2_callback_logs_equal_one_unsharded_process(tmp_path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    sharded = run(script, "fsdp2", tmp_path / "fsdp2", world=2)
    (single,) = run(script, "single", tmp_path / "single", world=1)
    assert [r["weight"] for r in sharded] == ["DTensor", "DTensor"] and single["weight"] == "Parameter"
    want = single["logs"]
    nfa_keys = {k for h in want for k in h if k.startswith("nfa/")}
    assert len(want) == 2 and len(nfa_keys) == 2 * 9  # UC and C for 8 block layers + the LM head
    for got in sharded:
        assert len(got["logs"]) == len(want)
        for got_step, want_step in zip(got["logs"], want):
            assert set(got_step) == set(want_step)
            for key, value in want_step.items():
                assert abs(got_step[key] - value) <= 1e-5, (key, got_step[key], value)
    for step in (1, 2):
        name = f"nfa/step_{step:07d}.safetensors"
        a, b = load_snapshot(tmp_path / "fsdp2" / name), load_snapshot(tmp_path / "single" / name)
        assert set(a.matrices) == set(b.matrices)
        for layer, mats in b.matrices.items():
            for kind, value in mats.items():
                assert a.matrices[layer][kind].shape == value.shape, (layer, kind)
                assert (a.matrices[layer][kind] - value).abs().max().item() <= 1e-5, (layer, kind)
