"""Contrastive objectives as pure functions of embeddings, temperature and (detached) normaliser estimates.

Notation (ALGORITHMS.md): e1 image and e2 text embeddings (L2-normalised), s_ij = e1_i . e2_j, temperature
T = exp(-logit_scale). For anchor i the differences d_ij = (s_ij - s_ii) / T define

    ghat_i = mean_{j != i} exp(d_ij)            (in-batch estimate of the dataset-wide normaliser g_i)

and the global contrastive objective (FastCLIP-v3 RGCL-g) is T * mean_i [log(eps + g1_i) + log(eps + g2_i)] + 2 rho T.
An estimator supplies alpha_i ~ log(eps + g_i); the encoders then minimise the *unified* objective of NeuCLIP,

    T * mean_i [exp(-alpha_i) (eps + ghat_i) + alpha_i - 1] (both directions) + 2 rho T,

which is linear in ghat (so mini-batch gradients are unbiased) and an upper bound of RGCL-g, tight at
alpha = log(eps + ghat). Every exponential is evaluated in log space and in fp32, also under autocast.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import gather_no_grad, gather_with_grad


@contextmanager
def full_precision(device: torch.device):
    """Disable autocast so the loss and estimator math runs in fp32 even inside a bf16/fp16 forward."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def log_mean_exp_negatives(logits: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Row-wise log(mean_{j != p_i} exp(logits_ij)), excluding each row's positive column p_i.

    Args:
        logits: (rows, cols) with cols >= 2.
        positive_index: (rows,) column of each row's positive.
    """
    cols = logits.shape[1]
    if cols < 2:
        raise ValueError(f"contrastive objectives need a global batch of at least 2 pairs, got {cols}")
    negatives = logits.scatter(1, positive_index[:, None], float("-inf"))
    return torch.logsumexp(negatives, dim=1) - math.log(cols - 1)


def log_eps_plus(log_x: torch.Tensor, eps: float) -> torch.Tensor:
    """log(eps + x) from log(x), without leaving log space."""
    return torch.logaddexp(log_x, torch.full_like(log_x, math.log(eps)))


@dataclass
class ContrastiveBatch:
    """The embeddings one rank sees: its local anchors and the gathered global batch (all fp32, with grad).

    Attributes:
        image: (L, d) local image embeddings.
        text: (L, d) local text embeddings.
        all_image: (B, d) image embeddings of the global batch (gathered with autograd).
        all_text: (B, d) text embeddings of the global batch.
        offset: global index of the first local anchor.
        logit_scale: scalar log(1/T), with grad.
        sample_ids: (B,) global sample ids, or None.
    """

    image: torch.Tensor
    text: torch.Tensor
    all_image: torch.Tensor
    all_text: torch.Tensor
    offset: int
    logit_scale: torch.Tensor
    sample_ids: torch.Tensor | None = None

    @classmethod
    def gather(
        cls, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> "ContrastiveBatch":
        """Cast local embeddings to fp32 and gather the global batch with autograd (no-op in one process)."""
        if image.shape != text.shape:
            raise ValueError(f"image and text embeddings differ in shape: {tuple(image.shape)} vs {tuple(text.shape)}")
        image, text = image.float(), text.float()
        all_image, offset = gather_with_grad(image)
        all_text, _ = gather_with_grad(text)
        if sample_ids is not None:
            if sample_ids.shape[0] != image.shape[0]:
                raise ValueError(f"got {sample_ids.shape[0]} sample ids for a batch of {image.shape[0]} pairs")
            sample_ids = gather_no_grad(sample_ids.to(image.device).long())
        return cls(image, text, all_image, all_text, offset, logit_scale.float(), sample_ids)

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.logit_scale)

    @property
    def local(self) -> slice:
        return slice(self.offset, self.offset + self.image.shape[0])

    @property
    def positive_index(self) -> torch.Tensor:
        """Global column of each local anchor's positive."""
        return torch.arange(self.image.shape[0], device=self.image.device) + self.offset

    def similarities(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local-vs-global cosines: image->text (L, B), text->image (L, B), and the positives s_ii (L,)."""
        image_to_text = self.image @ self.all_text.T
        text_to_image = self.text @ self.all_image.T
        positive = (self.image * self.text).sum(-1)
        return image_to_text, text_to_image, positive


@dataclass
class NormalizerInputs:
    """What an estimator sees of a global batch: detached fp32 statistics, identical on every rank.

    Attributes:
        image: (B, d) global image embeddings.
        text: (B, d) global text embeddings.
        temperature: scalar T.
        positive: (B,) positive similarities s_ii.
        log_g_image: (B,) log(eps + ghat1_i), image anchors against the batch's other texts.
        log_g_text: (B,) log(eps + ghat2_i), text anchors against the batch's other images.
        eps: the objective's eps.
        local: rows of this rank's anchors.
        sample_ids: (B,) global sample ids, or None.
    """

    image: torch.Tensor
    text: torch.Tensor
    temperature: torch.Tensor
    positive: torch.Tensor
    log_g_image: torch.Tensor
    log_g_text: torch.Tensor
    eps: float
    local: slice
    sample_ids: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_embeddings(
        cls,
        image: torch.Tensor,
        text: torch.Tensor,
        temperature: torch.Tensor,
        eps: float,
        local: slice | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> "NormalizerInputs":
        """Compute the batch statistics once; estimators reuse them for all their inner steps."""
        image, text, temperature = image.detach().float(), text.detach().float(), temperature.detach().float()
        sim = image @ text.T
        positive = sim.diagonal()
        index = torch.arange(sim.shape[0], device=sim.device)
        log_g_image = log_eps_plus(log_mean_exp_negatives((sim - positive[:, None]) / temperature, index), eps)
        log_g_text = log_eps_plus(log_mean_exp_negatives((sim.T - positive[:, None]) / temperature, index), eps)
        local = local if local is not None else slice(0, sim.shape[0])
        return cls(image, text, temperature, positive, log_g_image, log_g_text, eps, local, sample_ids)

    @classmethod
    def from_batch(cls, batch: ContrastiveBatch, eps: float) -> "NormalizerInputs":
        return cls.from_embeddings(
            batch.all_image, batch.all_text, batch.temperature, eps, batch.local, batch.sample_ids
        )

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    def is_finite(self) -> bool:
        return bool(
            torch.isfinite(self.image).all() and torch.isfinite(self.text).all() and torch.isfinite(self.temperature)
        )


def clip_loss(batch: ContrastiveBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE (OpenCLIP, HF `clip_loss`): local anchors against the global batch."""
    image_to_text, text_to_image, _ = batch.similarities()
    scale = batch.logit_scale.exp()
    target = batch.positive_index
    loss_image = F.cross_entropy(scale * image_to_text, target)
    loss_text = F.cross_entropy(scale * text_to_image, target)
    loss = (loss_image + loss_text) / 2
    return loss, {"contrastive": loss.detach(), "image_to_text": loss_image.detach(), "text_to_image": loss_text.detach()}


def siglip_loss(batch: ContrastiveBatch, logit_bias: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise sigmoid loss -(1/B) sum_ij log sigmoid(z_ij (t s_ij + b)), z_ii = 1 and -1 elsewhere.

    Each rank sums the rows of its local images against all texts, so every pair is counted exactly once.
    """
    image_to_text, _, _ = batch.similarities()
    logits = batch.logit_scale.exp() * image_to_text + logit_bias.float()
    labels = torch.full_like(logits, -1.0).scatter(1, batch.positive_index[:, None], 1.0)
    loss = -F.logsigmoid(labels * logits).sum(dim=1).mean()
    return loss, {"sigmoid": loss.detach()}


def _log_eps_plus_ghat(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor,
    target: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(eps + ghat_i) of the local anchors in both directions, d_ij = (s_ij - s_ii) / T (differentiable)."""
    log_g_image = log_eps_plus(log_mean_exp_negatives((image_to_text - positive[:, None]) / temperature, target), eps)
    log_g_text = log_eps_plus(log_mean_exp_negatives((text_to_image - positive[:, None]) / temperature, target), eps)
    return log_g_image, log_g_text


def unified_loss(
    batch: ContrastiveBatch, alpha_image: torch.Tensor, alpha_text: torch.Tensor, eps: float, rho: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NeuCLIP's unified objective with the estimates alpha detached (used by fastclip and neuclip).

    Args:
        batch: The rank's view of the global batch.
        alpha_image: (L,) estimates of log(eps + g1_i) for the local image anchors.
        alpha_text: (L,) estimates of log(eps + g2_i) for the local text anchors.
        eps: The objective's eps.
        rho: Temperature penalty weight (the loss adds 2 rho T).

    Returns:
        The loss and its components: the unified value, the in-batch global loss RGCL-g (detached) and their
        gap, which is >= 0 and vanishes when alpha equals the in-batch log-normaliser.
    """
    image_to_text, text_to_image, positive = batch.similarities()
    temperature = batch.temperature
    log_g_image, log_g_text = _log_eps_plus_ghat(
        image_to_text, text_to_image, positive, temperature, batch.positive_index, eps
    )
    alpha_image, alpha_text = alpha_image.detach().float(), alpha_text.detach().float()
    # exp(-alpha) (eps + ghat) + alpha - 1, evaluated as exp(log(eps + ghat) - alpha) to stay in log space.
    term_image = torch.exp(log_g_image - alpha_image) + alpha_image - 1
    term_text = torch.exp(log_g_text - alpha_text) + alpha_text - 1
    penalty = 2 * rho * temperature
    loss = temperature * (term_image + term_text).mean() + penalty
    with torch.no_grad():
        global_loss = temperature * (log_g_image + log_g_text).mean() + penalty
    return loss, {
        "unified": loss.detach(),
        "global_in_batch": global_loss,
        "unified_gap": loss.detach() - global_loss,
        "temperature_penalty": penalty.detach(),
    }


def release_temperature_surrogate(
    batch: ContrastiveBatch, alpha_image: torch.Tensor, alpha_text: torch.Tensor, eps: float, rho: float
) -> torch.Tensor:
    """A function whose gradients are those of FastCLIP-v3's released code (sum-of-directions scale).

    Encoders: T * mean_i sum_dir exp(-alpha_i) grad ghat_i, as the unified objective. Temperature:

        dL/dT = mean_i sum_dir [alpha_i + 2 T exp(-alpha_i) dghat_i/dT] + 2 rho,

    where the written RGCL-g has T * exp(-alpha_i) dghat_i/dT once (the release adds its loss over the two
    "local" and "remote" halves of each pair, halves the encoder part but not the temperature part). Built from
    three terms: sg(T) exp(-alpha)(eps + ghat(w, T)), sg(T) exp(-alpha) ghat(sg(w), T) and T (alpha + 2 rho).
    Its value is not a loss; `fastclip_loss` uses only its gradients.
    """
    image_to_text, text_to_image, positive = batch.similarities()
    temperature, target = batch.temperature, batch.positive_index
    alpha_image, alpha_text = alpha_image.detach().float(), alpha_text.detach().float()
    live = _log_eps_plus_ghat(image_to_text, text_to_image, positive, temperature, target, eps)
    frozen = _log_eps_plus_ghat(image_to_text.detach(), text_to_image.detach(), positive.detach(), temperature,
                                target, eps)
    encoder_part = sum(torch.exp(log_g - alpha) for log_g, alpha in zip(live, (alpha_image, alpha_text)))
    temperature_part = sum(torch.exp(log_g - alpha) for log_g, alpha in zip(frozen, (alpha_image, alpha_text)))
    # Through sg(T) neither term passes the value exp(-alpha) ghat to dL/dT (the release uses alpha there); each
    # passes T exp(-alpha) dghat/dT once, the 'live' one also the encoder gradient, the 'frozen' one not.
    return (temperature.detach() * (encoder_part + temperature_part).mean()
            + temperature * ((alpha_image + alpha_text).mean() + 2 * rho))


def fastclip_loss(
    batch: ContrastiveBatch,
    alpha_image: torch.Tensor,
    alpha_text: torch.Tensor,
    eps: float,
    rho: float,
    direction_reduction: str = "sum",
    temperature_gradient: str = "objective",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FastCLIP-v3's encoder objective: the unified objective with the moving-average estimate alpha, plus the two
    places where the released code differs from the written RGCL-g, as named choices (docs/baselines.md).

    Args:
        batch, alpha_image, alpha_text, eps, rho: As `unified_loss`.
        direction_reduction: `sum` (the written objective) or `mean` (the release: the whole loss halved, so the
            encoder gradient is the mean of the two directions and the penalty rho T).
        temperature_gradient: `objective` (the unified objective's own dL/dT) or `release` (the gradients of
            `release_temperature_surrogate`; the reported value stays the unified objective's).
    """
    loss, parts = unified_loss(batch, alpha_image, alpha_text, eps, rho)
    if temperature_gradient == "release":
        surrogate = release_temperature_surrogate(batch, alpha_image, alpha_text, eps, rho)
        loss = loss.detach() + (surrogate - surrogate.detach())  # the unified value, the release's gradients
    if direction_reduction == "mean":
        loss = loss / 2
        parts = {name: value / 2 for name, value in parts.items()}
        parts["unified"] = loss.detach()
    return loss, parts


def batch_aware_rho(rho: float, batch_size: int, reference_batch: int | None) -> float:
    """rho - log((B_ref - 1) / (B - 1)): the rho that keeps `rho - log(B - 1)` at its value for batch B_ref.

    RGCL-g's temperature gradient is at least 2 rho - 2 log(B - 1) for any embeddings (the entropy of each
    anchor's softmax over its B - 1 negatives is at most log(B - 1)), so this is what decides whether T has a
    balance point at batch B. None: rho unchanged.
    """
    if reference_batch is None:
        return rho
    return rho - math.log((reference_batch - 1) / (batch_size - 1))


def global_contrastive_loss(batch: ContrastiveBatch, eps: float, rho: float) -> torch.Tensor:
    """RGCL-g with the in-batch normaliser: T * mean_i [log(eps + ghat1_i) + log(eps + ghat2_i)] + 2 rho T."""
    image_to_text, text_to_image, positive = batch.similarities()
    temperature = batch.temperature
    log_g_image, log_g_text = _log_eps_plus_ghat(
        image_to_text, text_to_image, positive, temperature, batch.positive_index, eps
    )
    return temperature * (log_g_image + log_g_text).mean() + 2 * rho * temperature


def log_partition_sum(
    logits: torch.Tensor, positive_index: torch.Tensor, positive_weight: float
) -> torch.Tensor:
    """AmorLIP's log Z_i = log(sum_{j != i} exp(logits_ij) + c_pos * exp(logits_ii)), row-wise."""
    log_weight = math.log(positive_weight) if positive_weight > 0 else float("-inf")
    positive_logits = logits.gather(1, positive_index[:, None]) + log_weight
    return torch.logsumexp(logits.scatter(1, positive_index[:, None], positive_logits), dim=1)


def amorlip_loss(
    batch: ContrastiveBatch,
    log_partition_image: torch.Tensor,
    log_partition_text: torch.Tensor,
    positive_weight: float,
    rho: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AmorLIP's Stage II encoder loss with the partition estimates log Lambda detached.

    Per direction and anchor: -tau s_ii + sum_j w_j exp(tau s_ij - log Lambda_i) (w_i = c_pos, else 1), with
    tau = 1/T the logit scale. Its gradient equals InfoNCE's when Lambda equals the batch's partition sum. The
    sum over both directions is rescaled by sg(T) and the temperature penalty 2 rho T is added (AmorLIP writes
    it as rho_A / tau with rho_A = 2 rho).
    """
    image_to_text, text_to_image, positive = batch.similarities()
    scale = batch.logit_scale.exp()
    target = batch.positive_index
    log_z_image = log_partition_sum(scale * image_to_text, target, positive_weight)
    log_z_text = log_partition_sum(scale * text_to_image, target, positive_weight)
    term_image = -scale * positive + torch.exp(log_z_image - log_partition_image.detach().float())
    term_text = -scale * positive + torch.exp(log_z_text - log_partition_text.detach().float())
    temperature = batch.temperature
    penalty = 2 * rho * temperature
    loss = temperature.detach() * (term_image + term_text).mean() + penalty
    with torch.no_grad():  # in-batch InfoNCE with the same positive weight, for logging
        info_nce = (log_z_image + log_z_text - 2 * scale * positive).mean() / 2
    return loss, {
        "amortized": loss.detach(),
        "in_batch_info_nce": info_nce,
        "temperature_penalty": penalty.detach(),
    }
