"""Worker processes for the 2-process gloo tests.

A module of its own so `torch.multiprocessing.spawn` can import it."""

import os

import torch
import torch.distributed as dist
from helpers import tiny_batch, tiny_config

from neuclip_hf import NeuCLIPModel

STEPS = 2
BATCH = 8


def build_model(objective: str) -> NeuCLIPModel:
    torch.manual_seed(0)
    return NeuCLIPModel(tiny_config(objective, fastclip_id_mode="map", amorlip_epoch_steps=1, neuclip_inner_steps=3))


def batch_for_step(step: int) -> dict:
    batch = tiny_batch(BATCH, seed=step)
    batch["sample_ids"] = torch.arange(BATCH) * 7 + step  # arbitrary ids, new ones each step
    return batch


def train_steps(model, rows: slice, wrapper=None):
    """Run STEPS training steps on `rows` of each batch; return per-step losses and gradients of the last step."""
    runner = wrapper if wrapper is not None else model
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if n not in model.ddp_ignored_state_names()],
                                lr=0.1)
    losses = []
    for step in range(STEPS):
        batch = {k: v[rows] for k, v in batch_for_step(step).items()}
        optimizer.zero_grad()
        out = runner(**batch, return_loss=True, update_normalizer=True)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        model.clamp_logit_scale_()
    return torch.stack(losses), grads


def reference(objective: str) -> dict:
    model = build_model(objective)
    losses, grads = train_steps(model, slice(None))
    return {"losses": losses, "grads": grads, "normalizer": model.normalizer.state_dict(),
            "params": model.state_dict()}


def worker(rank: int, world_size: int, port: int, objectives: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        assert dist.get_world_size() == 2
        per_rank = BATCH // world_size
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        results = {}
        for objective in objectives:
            model = build_model(objective)
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
            losses, grads = train_steps(model, rows, wrapper=ddp)
            mean_losses = losses.clone()
            dist.all_reduce(mean_losses)
            results[objective] = {
                "world_size": dist.get_world_size(),
                "losses": mean_losses / world_size,
                "grads": grads,
                "normalizer": {k: v.clone() for k, v in model.normalizer.state_dict().items()},
                "params": {k: v.clone() for k, v in model.state_dict().items()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def compiled_collectives_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Run the collective helpers inside a `torch.compile`d function and eagerly, on uneven rows (3 and 5); save
    both results, the FX graphs' call targets and the work registry's size (works never waited on)."""
    from torch._C._distributed_c10d import _get_work_registry_size

    from neuclip_hf.distributed import all_reduce_max_, all_reduce_sum_, broadcast_, gather_no_grad, gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        targets = []

        def recording_backend(graph_module, example_inputs):
            targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
            return graph_module.forward

        def step(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            gathered, offset = gather_with_grad(x @ weight)
            ids = gather_no_grad(torch.arange(x.shape[0]) + offset)
            total = all_reduce_sum_(gathered.detach().sum(0))
            peak = all_reduce_max_(gathered.detach().amax(0))
            first = broadcast_(x.detach().sum().reshape(1).clone(), src=0)
            return (gathered.tanh() * (ids[:, None] + 1)).sum() + total.sum() + peak.sum() + first.sum()

        rows = 3 + 2 * rank
        x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(rank))
        results = {}
        for mode, fn in (("eager", step), ("compiled", torch.compile(step, backend=recording_backend))):
            weight = torch.linspace(-1, 1, 12).reshape(4, 3).requires_grad_()
            loss = fn(x, weight)
            loss.backward()
            results[mode] = {"loss": loss.detach(), "grad": weight.grad}
        results["graph_targets"] = targets
        results["work_registry_size"] = _get_work_registry_size()
        torch.save(results, os.path.join(out_dir, f"compiled_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
