"""Contrastive objectives as pure functions of embeddings, temperature and (detached) normalizer estimates.

Notation (docs/algorithms.md): e1 image and e2 text embeddings (L2-normalised), s_ij = e1_i . e2_j, temperature
T = exp(-logit_scale). For anchor i the differences d_ij = (s_ij - s_ii) / T define

    ghat_i = mean_{j != i} exp(d_ij)            (in-batch estimate of the dataset-wide normalizer g_i)

and the global contrastive objective (FastCLIP-v3 RGCL-g) is T * mean_i [log(eps + g1_i) + log(eps + g2_i)] + 2 rho T.
An estimator supplies alpha_i ~ log(eps + g_i); the encoders then minimise the *unified* objective of NeuCLIP,

    T * mean_i [exp(-alpha_i) (eps + ghat_i) + alpha_i - 1] (both directions) + 2 rho T,

which is linear in ghat (so mini-batch gradients are unbiased) and an upper bound of RGCL-g, tight at
alpha = log(eps + ghat). Every exponential is evaluated in log space and in fp32, also under autocast.

This module holds only what several methods share: the batch views (`ContrastiveBatch`, `NormalizerInputs`), the
in-batch log-normalizer pair, and the unified / global objectives used by every estimator. Each method's own
loss lives in its `normalizer_<name>.py`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum_, gather_no_grad, gather_with_grad, is_distributed


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


def in_batch_log_normalizers(
    image_to_text: torch.Tensor,
    text_to_image: torch.Tensor,
    positive: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log(eps + ghat1_i) and log(eps + ghat2_i) of each anchor row against the batch's columns.

    Args:
        image_to_text: (rows, B) cosines of image anchors with every text; `text_to_image` likewise.
        positive: (rows,) positive cosines s_ii.
        positive_index: (rows,) column of each row's positive (excluded from its negatives).
        temperature: scalar T.
        eps: The objective's eps.
    """
    # d_ij = (s_ij - s_ii) / T: each negative's logit relative to the anchor's positive.
    log_g_image = log_mean_exp_negatives((image_to_text - positive[:, None]) / temperature, positive_index)
    log_g_text = log_mean_exp_negatives((text_to_image - positive[:, None]) / temperature, positive_index)
    return log_eps_plus(log_g_image, eps), log_eps_plus(log_g_text, eps)


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

    The similarity blocks and the in-batch log-normalizers are computed once per batch (with autograd) and kept:
    the estimator's detached statistics (`NormalizerInputs.from_batch`) and the loss read the same tensors.
    """

    image: torch.Tensor
    text: torch.Tensor
    all_image: torch.Tensor
    all_text: torch.Tensor
    offset: int
    logit_scale: torch.Tensor
    sample_ids: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        if "similarities" not in self._cache:
            image_to_text = self.image @ self.all_text.T
            text_to_image = self.text @ self.all_image.T
            positive = (self.image * self.text).sum(-1)
            self._cache["similarities"] = (image_to_text, text_to_image, positive)
        return self._cache["similarities"]

    def log_normalizers(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """log(eps + ghat1_i), log(eps + ghat2_i) of the local anchors against the global batch (with grad)."""
        key = ("log_normalizers", eps)
        if key not in self._cache:
            image_to_text, text_to_image, positive = self.similarities()
            self._cache[key] = in_batch_log_normalizers(image_to_text, text_to_image, positive, self.positive_index,
                                                        self.temperature, eps)
        return self._cache[key]


@dataclass
class NormalizerInputs:
    """What an estimator sees of a global batch: detached fp32 statistics, identical on every rank.

    Each rank computes the statistics of its own anchors only (its L x B block of similarities, as open_clip's
    `local_loss`) and the per-anchor vectors are all-gathered (B floats each), so no rank holds a B x B matrix.
    Estimators whose update is a sum over anchors run it on the rows in `update_rows` and add the ranks' parts
    with `sum_across_ranks_` (`docs/scale.md`).

    Attributes:
        image: (B, d) global image embeddings.
        text: (B, d) global text embeddings.
        temperature: scalar T.
        positive: (B,) positive similarities s_ii.
        log_g_image: (B,) log(eps + ghat1_i), image anchors against the batch's other texts.
        log_g_text: (B,) log(eps + ghat2_i), text anchors against the batch's other images.
        local: rows of this rank's anchors.
        sample_ids: (B,) global sample ids, or None.
        sharded: True when the ranks split the update's sum over anchors (each takes `local`, the parts are
            all-reduced); False when every rank runs it on the whole batch (`from_embeddings`).
    """

    image: torch.Tensor
    text: torch.Tensor
    temperature: torch.Tensor
    positive: torch.Tensor
    log_g_image: torch.Tensor
    log_g_text: torch.Tensor
    local: slice
    sample_ids: torch.Tensor | None = None
    sharded: bool = False

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
        """The statistics of a whole batch computed in this process (B x B similarities; tests, diagnostics).

        `local` only selects the anchors `estimate` returns; an update runs on every row (`sharded=False`).
        """
        image, text, temperature = image.detach().float(), text.detach().float(), temperature.detach().float()
        rows = slice(0, image.shape[0])
        positive = (image * text).sum(-1)
        log_g_image, log_g_text = in_batch_log_normalizers(image @ text.T, text @ image.T, positive,
                                                           torch.arange(image.shape[0], device=image.device),
                                                           temperature, eps)
        local = local if local is not None else rows
        return cls(image, text, temperature, positive, log_g_image, log_g_text, local, sample_ids)

    @classmethod
    def from_batch(cls, batch: ContrastiveBatch, eps: float) -> "NormalizerInputs":
        """The statistics of a rank's view of the global batch: its L x B rows, then the B-vectors all-gathered.

        The rows are the loss's own (`ContrastiveBatch.log_normalizers`, computed here with autograd if the loss has
        not yet, and kept in `batch` for it), so the L x B blocks are formed once per step, not twice.
        """
        with torch.enable_grad():
            log_g_image, log_g_text = batch.log_normalizers(eps)
            positive = batch.similarities()[2]
        statistics = [tensor.detach() for tensor in (positive, log_g_image, log_g_text)]
        all_image, all_text = batch.all_image.detach(), batch.all_text.detach()
        temperature = batch.temperature.detach()
        # One collective for the three per-anchor vectors: (L, 3) rows gathered in rank order to (B, 3).
        positive, log_g_image, log_g_text = gather_no_grad(torch.stack(statistics, dim=1)).unbind(1)
        return cls(all_image, all_text, temperature, positive, log_g_image, log_g_text, batch.local, batch.sample_ids,
                   sharded=is_distributed())

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    @property
    def update_rows(self) -> slice:
        """The anchors this rank's share of an update's sum covers (all of them unless `sharded`)."""
        return self.local if self.sharded else slice(0, self.batch_size)

    def sum_across_ranks_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Add up (in place) the ranks' parts of a sum over anchors when the update is sharded; else unchanged."""
        return all_reduce_sum_(tensor) if self.sharded else tensor

    def is_finite(self) -> bool:
        return bool(
            torch.isfinite(self.image).all() and torch.isfinite(self.text).all() and torch.isfinite(self.temperature)
        )


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
        gap, which is >= 0 and vanishes when alpha equals the in-batch log-normalizer.
    """
    temperature = batch.temperature
    log_g_image, log_g_text = batch.log_normalizers(eps)  # log(eps + ghat) with gradient, per direction
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


def global_contrastive_loss(batch: ContrastiveBatch, eps: float, rho: float) -> torch.Tensor:
    """RGCL-g with the in-batch normalizer: T * mean_i [log(eps + ghat1_i) + log(eps + ghat2_i)] + 2 rho T."""
    temperature = batch.temperature
    log_g_image, log_g_text = batch.log_normalizers(eps)
    return temperature * (log_g_image + log_g_text).mean() + 2 * rho * temperature


def batch_aware_rho(rho: float, batch_size: int, reference_batch: int | None) -> float:
    """rho - log((B_ref - 1) / (B - 1)): the rho that keeps `rho - log(B - 1)` at its value for batch B_ref.

    RGCL-g's temperature gradient is at least 2 rho - 2 log(B - 1) for any embeddings (the entropy of each
    anchor's softmax over its B - 1 negatives is at most log(B - 1)), so this is what decides whether T has a
    balance point at batch B. None: rho unchanged.
    """
    if reference_batch is None:
        return rho
    return rho - math.log((reference_batch - 1) / (batch_size - 1))
