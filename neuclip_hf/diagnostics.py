"""How accurate is a normalizer estimate? Exact dataset-wide log-normalizers and each estimator's error.

For anchor i of a probe set and a reference pool of n pairs (the training set, or a large sample of it):

    alpha*_1(i) = log(eps + mean_{j != i} exp((e1_i . e2_j - e1_i . e2_i) / T))     (image anchor vs pool texts)
    alpha*_2(i) = log(eps + mean_{j != i} exp((e2_i . e1_j - e1_i . e2_i) / T))     (text anchor vs pool images)

Each method is asked for its estimate of the same anchors *as in training*: the anchors are placed in batches of
the training batch size filled with random pool samples, so in-batch estimates (CLIP) and batch-dependent ones
(AmorLIP's blend) see a realistic batch, while FastCLIP reads its table (by sample id) and NeuCLIP its prototypes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from transformers import TrainerCallback

from .data import build_eval_dataloader
from .distributed import fsdp_root_gathered, is_fsdp_sharded, main_process_result
from .evaluation import log_callback_metrics
from .modeling_neuclip import unwrap_model
from .normalizers import InBatchNormalizer, NormalizerEstimator, find_normalizer
from .objectives import NormalizerInputs, log_eps_plus
from .zero_shot import encode_images, encode_texts


@torch.no_grad()
def exact_log_normalizers(
    image: torch.Tensor,
    text: torch.Tensor,
    pool_image: torch.Tensor,
    pool_text: torch.Tensor,
    temperature: float,
    eps: float,
    pool_index: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact alpha* of each anchor pair against a pool, computed in chunks of anchors (never an n x n matrix).

    Args:
        image: (P, d) normalised anchor image embeddings; `text` (P, d) their captions.
        pool_image: (n, d) pool image embeddings; `pool_text` (n, d) the pool's captions.
        temperature: T.
        eps: The objective's eps.
        pool_index: (P,) position of each anchor's own pair in the pool (excluded from its negatives), or None
            when the anchors are not in the pool (then all n pool pairs are negatives).
        chunk_size: Anchors per chunk.

    Returns:
        (P,) alpha*_1 and (P,) alpha*_2.
    """
    image, text = image.float(), text.float()
    pool_image, pool_text = pool_image.float(), pool_text.float()
    count = pool_image.shape[0] - (1 if pool_index is not None else 0)
    if count < 1:
        raise ValueError("the reference pool needs at least one negative per anchor")
    out_image, out_text = [], []
    for start in range(0, image.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        positive = (image[rows] * text[rows]).sum(-1, keepdim=True)
        logits_image = (image[rows] @ pool_text.T - positive) / temperature
        logits_text = (text[rows] @ pool_image.T - positive) / temperature
        if pool_index is not None:  # the anchor's own pair is not one of its negatives
            own = pool_index[rows].to(image.device)[:, None]
            logits_image = logits_image.scatter(1, own, float("-inf"))
            logits_text = logits_text.scatter(1, own, float("-inf"))
        out_image.append(log_eps_plus(torch.logsumexp(logits_image, 1) - math.log(count), eps))
        out_text.append(log_eps_plus(torch.logsumexp(logits_text, 1) - math.log(count), eps))
    return torch.cat(out_image), torch.cat(out_text)


@torch.no_grad()
def estimates_in_training_batches(
    normalizer: NormalizerEstimator,
    image: torch.Tensor,
    text: torch.Tensor,
    ids: torch.Tensor,
    pool_image: torch.Tensor,
    pool_text: torch.Tensor,
    pool_ids: torch.Tensor,
    temperature: float,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator's alpha for each anchor, with the anchors placed in training-size batches.

    Each batch holds up to `batch_size // 2` anchors, completed with random pairs of the fill pool (which must not
    contain the anchors themselves); the estimator state is not changed (only `estimate` is called).
    """
    per_batch = max(1, batch_size // 2)
    fill = batch_size - per_batch
    alpha_image, alpha_text = [], []
    for start in range(0, image.shape[0], per_batch):
        rows = slice(start, start + per_batch)
        picks = torch.randint(0, pool_image.shape[0], (fill,), generator=generator)
        batch_image = torch.cat([image[rows], pool_image[picks]])
        batch_text = torch.cat([text[rows], pool_text[picks]])
        batch_ids = torch.cat([ids[rows], pool_ids[picks]])
        count = batch_image.shape[0] - fill
        inputs = NormalizerInputs.from_embeddings(
            batch_image, batch_text, torch.tensor(float(temperature)), normalizer.eps, slice(0, count), batch_ids
        )
        a_image, a_text = normalizer.estimate(inputs)
        alpha_image.append(a_image)
        alpha_text.append(a_text)
    return torch.cat(alpha_image), torch.cat(alpha_text)


def estimate_errors(
    alpha_image: torch.Tensor, alpha_text: torch.Tensor, exact_image: torch.Tensor, exact_text: torch.Tensor
) -> dict[str, float]:
    """Mean squared error (both directions together and each), and the mean signed error (bias)."""
    diff = torch.cat([alpha_image - exact_image, alpha_text - exact_text]).float()
    return {
        "mse": float((diff**2).mean()),
        "mse_image": float(((alpha_image - exact_image) ** 2).mean()),
        "mse_text": float(((alpha_text - exact_text) ** 2).mean()),
        "bias": float(diff.mean()),
    }


@torch.no_grad()
def embed_pairs(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of preprocessed pairs (any CLIPModel with encode_* or get_*)."""
    device = next(model.parameters()).device
    images, texts = [], []
    for start in range(0, pixel_values.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        images.append(encode_images(model, pixel_values[rows].to(device)).float().cpu())
        mask = attention_mask[rows].to(device) if attention_mask is not None else None
        texts.append(encode_texts(model, input_ids[rows].to(device), mask).float().cpu())
    return torch.cat(images), torch.cat(texts)


def pool_from_data(data_args, processor, size: int) -> dict:
    """The first `size` decodable training samples as preprocessed tensors (a diagnostics reference pool)."""
    args = dataclasses.replace(data_args, eval_data=data_args.train_data, eval_split=data_args.train_split)
    parts: dict[str, list] = {}
    collected = 0
    for batch in build_eval_dataloader(args, processor, batch_size=min(size, 512)):
        for key in ("pixel_values", "input_ids", "attention_mask", "sample_ids"):
            parts.setdefault(key, []).append(batch[key])
        collected += len(batch["sample_ids"])
        if collected >= size:
            break
    return {key: torch.cat(values)[:size] for key, values in parts.items()}


class NormalizerDiagnosticsCallback(TrainerCallback):
    """Every `every_steps` steps, log how far the estimator is from the exact dataset-wide log-normalizer.

    It embeds a reference pool (preprocessed training pairs with their sample ids) with the current encoders,
    computes the exact alpha* of the first `num_probes` pairs against the whole pool, asks the normalizer for its
    estimate of the same anchors in training-size batches, and logs `normalizer_mse` (and per direction, bias),
    together with the error of the plain in-batch estimate for comparison (`normalizer_in_batch_mse`). In a
    distributed run the main process measures and every rank logs the same line.

    Args:
        pool: dict with `pixel_values`, `input_ids`, `attention_mask` (optional) and `sample_ids` tensors.
        every_steps: How often to measure.
        num_probes: Anchors measured (the first ones of the pool).
        batch_size: Global training batch size used to place the anchors (default: the run's).
    """

    def __init__(self, pool: dict, every_steps: int = 100, num_probes: int = 256, batch_size: int | None = None):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.pool, self.every_steps, self.num_probes, self.batch_size = pool, every_steps, num_probes, batch_size
        self.trainer = None
        self.history: list[dict] = []

    def attach(self, trainer) -> "NormalizerDiagnosticsCallback":
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps != 0 or model is None:
            return
        # The main process measures while the other ranks wait for its numbers; every rank then logs the same line
        # (docs/architecture.md, "Rules for callbacks in distributed runs").
        batch_size = self.batch_size or args.per_device_train_batch_size * max(args.world_size, 1)
        def run() -> dict[str, float]:
            with fsdp_root_gathered(model):
                return self.measure(model, batch_size=batch_size)

        # An FSDP2-sharded model's forwards are collectives: then every rank measures, and rank 0's numbers are logged.
        metrics = main_process_result(run, state.is_world_process_zero, every_rank=is_fsdp_sharded(model))
        if metrics is None:  # a state that is not the main process's, outside a process group
            return
        self.history.append({"step": state.global_step, **metrics})
        log_callback_metrics(self.trainer, state, {f"normalizer_{k}": v for k, v in metrics.items()})

    @torch.no_grad()
    def measure(self, model, batch_size: int) -> dict[str, float]:
        normalizer = find_normalizer(model)
        if not isinstance(normalizer, NormalizerEstimator):
            raise TypeError(f"objective {normalizer.objective!r} has no normalizer estimate to diagnose")
        core = unwrap_model(model)
        was_training = core.training
        core.eval()
        try:
            pool_image, pool_text = embed_pairs(core, self.pool["pixel_values"], self.pool["input_ids"],
                                                self.pool.get("attention_mask"))
        finally:
            core.train(was_training)
        temperature = float(torch.exp(-core.logit_scale.detach()))
        count = min(self.num_probes, pool_image.shape[0] // 2)
        probes = torch.arange(count)
        fill = slice(count, None)  # anchors are completed into batches with the rest of the pool
        ids = self.pool["sample_ids"]
        exact_image, exact_text = exact_log_normalizers(
            pool_image[probes], pool_text[probes], pool_image, pool_text, temperature, normalizer.eps, probes
        )
        generator = torch.Generator().manual_seed(0)
        device = next(normalizer.parameters(), torch.empty(0)).device
        to = lambda t: t.to(device)  # noqa: E731
        alpha = estimates_in_training_batches(
            normalizer, to(pool_image[probes]), to(pool_text[probes]), to(ids[probes]), to(pool_image[fill]),
            to(pool_text[fill]), to(ids[fill]), temperature, batch_size, generator,
        )
        metrics = estimate_errors(alpha[0].cpu(), alpha[1].cpu(), exact_image, exact_text)
        in_batch = InBatchNormalizer(core.config)
        generator = torch.Generator().manual_seed(0)
        baseline = estimates_in_training_batches(
            in_batch, pool_image[probes], pool_text[probes], ids[probes], pool_image[fill], pool_text[fill],
            ids[fill], temperature, batch_size, generator,
        )
        metrics["in_batch_mse"] = estimate_errors(*baseline, exact_image, exact_text)["mse"]
        return metrics


def __getattr__(name: str):
    if name == "NormaliserDiagnosticsCallback":  # the old spelling, kept for one release
        warnings.warn("NormaliserDiagnosticsCallback is deprecated; use NormalizerDiagnosticsCallback",
                      FutureWarning, stacklevel=2)
        return NormalizerDiagnosticsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NormalizerDiagnosticsCallback",
    "embed_pairs",
    "estimate_errors",
    "estimates_in_training_batches",
    "exact_log_normalizers",
    "pool_from_data",
]
