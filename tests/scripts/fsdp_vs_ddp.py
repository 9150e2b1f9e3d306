"""Run under `accelerate launch` with 2 CPU processes: the same steps with DDP and with FSDP2-sharded encoders, and
an FSDP2 checkpoint (torch.distributed.checkpoint, sharded) saved mid-run and resumed in a later launch.

    fsdp_vs_ddp.py OUT_DIR STEPS SAVE_AT            # DDP run, FSDP2 run (saves a checkpoint after SAVE_AT steps)
    fsdp_vs_ddp.py OUT_DIR STEPS SAVE_AT --resume   # FSDP2 from that checkpoint to STEPS
Rank 0 writes the full weights of each run to OUT_DIR/{ddp,fsdp,resumed}.pt. The resume may run on 4 processes
(`resumed_w4.pt`): the global batch is the same, each rank takes its slice of it, and torch.distributed.checkpoint
re-shards the 2-rank checkpoint.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import tiny_batch, tiny_config  # noqa: E402

from neuclip_hf import NeuCLIPModel  # noqa: E402
from neuclip_hf.distributed import (  # noqa: E402
    average_replicated_gradients_,
    end_process_group,
    shard_encoders_fsdp2,
)

BATCH = 8


def build(sharded: bool, world: int):
    torch.manual_seed(0)
    model = NeuCLIPModel(tiny_config("neuclip", neuclip_num_prototypes=16, neuclip_inner_steps=2,
                                     neuclip_restart_period=3))
    if sharded:
        shard_encoders_fsdp2(model)
        kinds = {n: type(p).__name__ for n, p in model.named_parameters()}
        # Encoder weights are DTensors holding half of each tensor; the normalizer and logit_scale stay whole.
        assert kinds["vision_model.encoder.layers.0.mlp.fc1.weight"] == "DTensor", kinds
        assert kinds["text_projection.weight"] == "DTensor", kinds
        assert kinds["logit_scale"] == kinds["normalizer.text_prototypes"] == "Parameter", kinds
        fc1 = dict(model.named_parameters())["vision_model.encoder.layers.0.mlp.fc1.weight"]
        assert fc1.to_local().shape[0] == -(-fc1.shape[0] // world), (fc1.to_local().shape, fc1.shape)
    # The encoders' optimizer, built after sharding (FSDP2 replaces the parameters by DTensors).
    estimator = {id(p) for p in model.normalizer.estimator_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in estimator],
                                  lr=1e-3)
    return model, optimizer


def train(model, runner, optimizer, steps: range, sharded: bool, rank: int, world: int, on_step=None) -> None:
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in steps:
        batch = {k: v[rows] for k, v in tiny_batch(BATCH, seed=step).items()}
        loss = runner(**batch, return_loss=True, update_normalizer=True).loss
        loss.backward()
        if sharded:
            average_replicated_gradients_(model)  # logit_scale: FSDP2 leaves it whole and does not reduce it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        if on_step is not None:
            on_step(step + 1)


def full_weights(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def checkpoint_state(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def main() -> None:
    out_dir, steps, save_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resume = "--resume" in sys.argv
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    assert (world == 2 or resume) and dist.get_backend() == "gloo", (world, dist.get_backend())
    checkpoint = os.path.join(out_dir, "checkpoint")
    if not resume:
        model, optimizer = build(sharded=False, world=world)
        ddp = accelerator.prepare_model(model)
        train(model, ddp, optimizer, range(steps), False, rank, world)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(weights, os.path.join(out_dir, "ddp.pt"))

        model, optimizer = build(sharded=True, world=world)

        def save(done: int) -> None:
            if done == save_at:  # sharded save: every rank writes its own shards
                dcp.save(checkpoint_state(model, optimizer), checkpoint_id=checkpoint)
                if rank == 0:  # the normalizer's optimizer is replicated: one copy
                    torch.save(model.normalizer.optimizer.state_dict(), os.path.join(out_dir, "normalizer_opt.pt"))

        train(model, model, optimizer, range(steps), True, rank, world, on_step=save)
        name = "fsdp.pt"
    else:
        model, optimizer = build(sharded=True, world=world)
        state = checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        model.normalizer.optimizer.load_state_dict(torch.load(os.path.join(out_dir, "normalizer_opt.pt"),
                                                              weights_only=True))
        train(model, model, optimizer, range(save_at, steps), True, rank, world)
        name = "resumed.pt" if world == 2 else f"resumed_w{world}.pt"
    weights = full_weights(model)
    if rank == 0:
        torch.save(weights, os.path.join(out_dir, name))
        print(f"{name}: {len(weights)} tensors, world size {world}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
    end_process_group()
