"""Workers of the sharded-statistics tests (a module of its own so `torch.multiprocessing.spawn` can import it).

Every objective runs STEPS steps of `NeuCLIPModel.contrastive_loss(update_normalizer=True)` on fixed embeddings of a
global batch of BATCH pairs, each rank holding its rows; a process group of one rank, or none, is the reference.
"""

import os

import torch
import torch.distributed as dist
from helpers import tiny_config, unit_vectors

from neuclip_hf import NeuCLIPModel
from neuclip_hf.distributed import gather_no_grad, rank_and_world_size
from neuclip_hf.objectives import ContrastiveBatch, NormalizerInputs

STEPS = 3
BATCH = 12  # divisible by 1, 2 and 4 ranks
DIM = 16
EPS = 1e-6


# The other NeuCLIP update splits (the default splits the prototypes), and the prototype split with a number of
# prototypes that 2 and 4 ranks do not divide (blocks of 4 + 3 and 2 + 2 + 2 + 1 rows).
VARIANTS = {
    "neuclip_anchors": ("neuclip", {"neuclip_update_sharding": "anchors"}),
    "neuclip_replicated": ("neuclip", {"neuclip_update_sharding": "replicated"}),
    "neuclip_uneven": ("neuclip", {"neuclip_num_prototypes": 7}),
}


def build_model(objective: str) -> NeuCLIPModel:
    torch.manual_seed(0)
    objective, extra = VARIANTS.get(objective, (objective, {}))
    settings = dict(fastclip_id_mode="map", amorlip_epoch_steps=1, amorlip_beta_ramp_epochs=2,
                    neuclip_num_prototypes=8, neuclip_inner_steps=3, neuclip_restart_period=2)
    config = tiny_config(objective, **{**settings, **extra})
    return NeuCLIPModel(config)


def step_embeddings(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of step `step`: correlated unit image/text embeddings and arbitrary sample ids."""
    image = unit_vectors(BATCH, DIM, seed=100 + step)
    text = torch.nn.functional.normalize(image + 0.7 * unit_vectors(BATCH, DIM, seed=200 + step), dim=-1)
    return image, text, torch.arange(BATCH) * 5 + step


def run_objective(objective: str, steps: range = range(STEPS), checkpoint: dict | None = None) -> dict:
    """Losses (mean over ranks), gradients of the global batch's embeddings and of log(1/T), the gathered batch
    statistics and the final estimator state, as the single-process run defines them.

    Args:
        objective: An objective or a `VARIANTS` name.
        steps: The steps to run (each has its own global batch).
        checkpoint: A `checkpoint` entry of an earlier run's result (any world size) to resume from.
    """
    rank, world_size = rank_and_world_size()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    model = build_model(objective)
    if checkpoint is not None:  # as the trainer resumes: the normalizer's weights and buffers, then its optimizer
        model.normalizer.load_state_dict(checkpoint["normalizer"])
        model.normalizer.optimizer.load_state_dict(checkpoint["optimizer"])
    losses, image_grads, text_grads, scale_grads, statistics = [], [], [], [], []
    for step in steps:
        image, text, ids = step_embeddings(step)
        image, text = image[rows].clone().requires_grad_(True), text[rows].clone().requires_grad_(True)
        model.logit_scale.grad = None
        loss, _, _ = model.contrastive_loss(image, text, ids[rows], update_normalizer=True)
        loss.backward()
        with torch.no_grad():
            inputs = NormalizerInputs.from_batch(ContrastiveBatch.gather(image, text, model.logit_scale), EPS)
        statistics.append(torch.stack([inputs.positive, inputs.log_g_image, inputs.log_g_text]))
        # The single-process loss is the mean of the per-rank losses (equal local batches); the gather's backward
        # has summed every rank's loss gradient into the owner of each embedding, so divide by the world size.
        totals = torch.stack([loss.detach(), model.logit_scale.grad.detach()])
        if world_size > 1:
            dist.all_reduce(totals)
        losses.append(totals[0] / world_size)
        scale_grads.append(totals[1] / world_size)
        image_grads.append(gather_no_grad(image.grad) / world_size)
        text_grads.append(gather_no_grad(text.grad) / world_size)
    return {
        "world_size": world_size,
        "losses": torch.stack(losses),
        "image_grads": torch.stack(image_grads),
        "text_grads": torch.stack(text_grads),
        "scale_grads": torch.stack(scale_grads),
        "statistics": torch.stack(statistics),
        "normalizer": {**{k: v.detach().clone() for k, v in model.normalizer.state_dict().items()},
                       **optimizer_state(model.normalizer)},
        "checkpoint": {"normalizer": model.normalizer.state_dict(),
                       "optimizer": model.normalizer._optimizer.state_dict() if model.normalizer._optimizer else {}},
    }


def optimizer_state(normalizer) -> dict[str, torch.Tensor]:
    """The tensors of the normalizer's own optimizer state (AdaGrad's sums, Adam's moments), by a flat name."""
    if normalizer._optimizer is None:
        return {}
    return {f"optimizer.{index}.{key}": value.detach().clone()
            for index, state in normalizer._optimizer.state_dict()["state"].items()
            for key, value in state.items() if torch.is_tensor(value)}


def worker(rank: int, world_size: int, port: int, objectives: list[str], out_dir: str,
           steps: tuple[int, int] = (0, STEPS), resume_from: str | None = None, tag: str = "") -> None:
    """Run `objectives` over `steps` (start, stop) in a gloo group, optionally resuming from the results file
    `resume_from` (written by a run of any world size); writes `world{W}_rank{r}{tag}.pt` into `out_dir`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        saved = torch.load(resume_from, weights_only=True) if resume_from else {}
        results = {objective: run_objective(objective, range(*steps), saved.get(objective, {}).get("checkpoint"))
                   for objective in objectives}
        torch.save(results, os.path.join(out_dir, f"world{world_size}_rank{rank}{tag}.pt"))
    finally:
        dist.destroy_process_group()
