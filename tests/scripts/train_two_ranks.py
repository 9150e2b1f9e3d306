"""Trains tiny NeuCLIP models with NeuCLIPTrainer in however many processes it is launched with.

Run by tests/test_trainer_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) and
in-process for the 1-process reference. Rank r of W reads rows [k*B + r*B/W, k*B + (r+1)*B/W) of every global
batch k, so the global batches are the same for every W. Writes the final state of each rank.
"""

import argparse
import os
import sys

import torch
from torch.utils.data import Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import tiny_config  # noqa: E402
from trainer_helpers import PairDataset  # noqa: E402

from neuclip_hf import NeuCLIPModel  # noqa: E402
from neuclip_hf.distributed import end_process_group  # noqa: E402
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4


class RankView(Dataset):
    def __init__(self, base, rank, world_size):
        self.base, self.rank, self.per_rank = base, rank, GLOBAL_BATCH // world_size

    def __len__(self):
        return len(self.base) // GLOBAL_BATCH * self.per_rank

    def __getitem__(self, j):
        batch, within = divmod(j, self.per_rank)
        return self.base[batch * GLOBAL_BATCH + self.rank * self.per_rank + within]


def run(objective: str, output_dir: str) -> dict:
    # The launcher's environment (the process group only starts with the Trainer's Accelerator).
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(0)
    model = NeuCLIPModel(tiny_config(objective, fastclip_dataset_size=64, neuclip_inner_steps=3))
    args = NeuCLIPTrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        temperature_learning_rate=1e-3, warmup_steps=1,
    )
    view = RankView(PairDataset(), rank, world_size)
    trainer = NeuCLIPTrainer(
        model=model, args=args,
        train_loader_factory=lambda: StatefulDataLoader(view, batch_size=args.per_device_train_batch_size,
                                                        collate_fn=default_collate, drop_last=True),
    )
    trainer.train()
    normalizer = trainer.normalizer
    return {
        "world_size": trainer.accelerator.num_processes,
        "model": {k: v.detach().clone() for k, v in trainer.core_model.state_dict().items()},
        "normalizer_optimizer": normalizer.optimizer.state_dict()["state"] if normalizer.optimizer else {},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--objectives", nargs="+", required=True)
    cli = parser.parse_args()
    results = {obj: run(obj, os.path.join(cli.out, obj)) for obj in cli.objectives}
    rank = int(os.environ.get("RANK", 0))
    torch.save(results, os.path.join(cli.out, f"result_rank{rank}.pt"))
    end_process_group()
