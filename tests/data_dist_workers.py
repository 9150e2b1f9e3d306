"""Rank processes for the 2-process input test (a module of its own so `torch.multiprocessing.spawn` can import it)."""

import json
import multiprocessing
import os

import torch.distributed as dist
from data_fixtures import collect_ids, processor

from neuclip_hf import DataArguments, build_train_dataloader


def read_rank_ids(rank: int, world_size: int, port: int, spec: str, out_dir: str) -> None:
    """Join a gloo group, read this rank's share of `spec` with 2 DataLoader workers, gather every rank's ids."""
    # Ranks started by torchrun / accelerate fork their DataLoader workers on Linux; a process made by
    # `mp.spawn` would spawn them (each re-importing torch, transformers and datasets: ~5 s per worker here).
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        world = dist.get_world_size()
        loader = build_train_dataloader(DataArguments(train_data=spec), processor(), batch_size=4, num_workers=2,
                                        rank=dist.get_rank(), world_size=world, seed=0)
        ids = collect_ids(loader)
        gathered = [None] * world
        dist.all_gather_object(gathered, ids)
        if rank == 0:
            with open(os.path.join(out_dir, "ids.json"), "w") as f:
                json.dump({"world_size": world, "ids_per_rank": gathered}, f)
    finally:
        dist.destroy_process_group()
