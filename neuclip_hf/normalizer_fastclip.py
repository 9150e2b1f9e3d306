"""FastCLIP-v3 / SogCLR: one moving average of the normalizer per training sample and direction.

Where the released code differs from the written objective, both are offered as named choices
(`fastclip_direction_reduction`, `fastclip_temperature_gradient`, `fastclip_gamma_schedule`; docs/baselines.md).
"""

from __future__ import annotations

import math

import torch

from .normalizer_base import (
    ConfigField,
    NormalizerEstimator,
    choice_field,
    number_field,
    register_normalizer,
    zero_counter,
)
from .objectives import ContrastiveBatch, in_batch_log_normalizers, unified_loss


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
    live = in_batch_log_normalizers(image_to_text, text_to_image, positive, target, temperature, eps)
    frozen = in_batch_log_normalizers(image_to_text.detach(), text_to_image.detach(), positive.detach(), target,
                                      temperature, eps)
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


@register_normalizer
class MovingAverageNormalizer(NormalizerEstimator):
    """FastCLIP-v3 / SogCLR: one moving average per sample and direction, keyed by stable sample ids.

    The table stores alpha_i = log(eps + u_i) directly. Because the weights of a moving average sum to one,
    averaging (eps + ghat) equals eps plus the average of ghat, so

        alpha_i <- log((1 - gamma) exp(alpha_i) + gamma (eps + ghat_i))   (a log-add-exp, in log space)

    is FastCLIP's update. The first visit of a sample sets alpha_i = log(eps + ghat_i) (FastCLIP's schedule starts
    at gamma = 1, which does the same). gamma decays from 1 to `fastclip_gamma_min` by a cosine over
    `fastclip_gamma_decay_epochs` true epochs (samples seen / training-set size): `stepped`, one value per integer
    epoch as the release, or `continuous`. Anchors never seen (e.g. a held-out batch) fall back to the in-batch
    estimate. The encoder loss is `fastclip_loss` with the configured direction reduction and temperature gradient.
    """

    objective = "fastclip"
    title = "FastCLIP-v3"
    summary = ("A moving average per training sample estimates its normalizer in the global contrastive loss (Wei et "
               "al., 2024).")
    citation = """@article{wei2024fastclip,
  title   = {FastCLIP: A Suite of Optimization Techniques to Accelerate CLIP Training with Limited Resources},
  author  = {Wei, Xiyuan and Ye, Fanjiang and Yonay, Ori and Chen, Xingyu and Sun, Baixi and Tao, Dingwen and
             Yang, Tianbao},
  journal = {arXiv preprint arXiv:2407.01445},
  year    = {2024}
}"""
    config_prefix = "fastclip_"
    config_fields = {
        "dataset_size": ConfigField(
            None, "Entries of the moving-average table (one per training sample id). None: the training-set size "
                  "`train_num_samples`; one of them is required for `fastclip`.",
            lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 2,
            "None or an integer >= 2 (the number of training samples)"),
        "id_mode": choice_field(
            "index", "`index` when sample ids are already in [0, n); `map` to assign table slots to arbitrary "
                     "integer ids in order of first appearance.", ("index", "map")),
        "gamma_min": number_field(0.2, "Final moving-average weight gamma (0.2 in FastCLIP-v3).", 0, 1, low_open=True),
        "gamma_decay_epochs": number_field(
            18, "Epochs over which gamma decays from 1 to `fastclip_gamma_min` by a cosine.", 0),
        "gamma_schedule": choice_field(
            "stepped", "`stepped` (default, the release: one gamma per integer epoch, 1.0 in epoch 0, then the "
                       "cosine at the epoch number) or `continuous` (the cosine at the fractional epoch, step by "
                       "step; `fastclip_gamma_decay_epochs=0` then keeps gamma at `fastclip_gamma_min`).",
            ("stepped", "continuous")),
        "direction_reduction": choice_field(
            "sum", "`sum` (default: the written RGCL-g adds the two directions, like every global objective here) "
                   "or `mean` (the release's scale: half the loss, so its encoder gradient is the mean of the two "
                   "directions and the penalty is rho T). Under AdamW without clipping the two train alike.",
            ("sum", "mean")),
        "temperature_gradient": choice_field(
            "objective", "`objective` (default: dL/dT of the unified objective, the written RGCL-g at the estimate) "
                         "or `release` (the released code's surrogate, whose dL/dT counts the T * dg/dT term twice: "
                         "per anchor and direction alpha + 2 T exp(-alpha) dghat/dT, plus 2 rho; its resting T is "
                         "colder).", ("objective", "release")),
    }
    needs_sample_ids = True
    needs_num_samples = True
    buffer_initial_values = {"slot_ids": -1}  # -1: a free table slot (map mode)

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        if config.objective == cls.objective and getattr(config, "fastclip_dataset_size", None) is None \
                and config.train_num_samples is None:
            raise ValueError("NeuCLIPConfig.fastclip_dataset_size=None is invalid: expected the number of training "
                             "samples (or set train_num_samples): objective='fastclip' keeps one moving average per "
                             "sample.")

    @classmethod
    def config_from_data(cls, num_samples):
        # The data's sample ids are arbitrary integers (keys, hashes): map them to table slots.
        return {"fastclip_dataset_size": num_samples, "fastclip_id_mode": "map"}

    def __init__(self, config):
        super().__init__(config)
        settings = self.settings(config)
        n = int(settings.dataset_size or config.train_num_samples)
        self.dataset_size = n
        self.id_mode = settings.id_mode
        self.gamma_min = float(settings.gamma_min)
        self.gamma_decay_epochs = float(settings.gamma_decay_epochs)
        self.gamma_schedule = settings.gamma_schedule
        self.direction_reduction = settings.direction_reduction
        self.temperature_gradient = settings.temperature_gradient
        self.register_buffer("log_u", torch.zeros(2, n))  # row 0: image anchors, row 1: text anchors
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("num_updates", zero_counter())
        if self.id_mode == "map":
            self.register_buffer("slot_ids", torch.full((n,), -1, dtype=torch.long))  # slot -> sample id
            self.register_buffer("num_slots", zero_counter())
        self._id_to_slot: dict[int, int] | None = None

    @property
    def epoch_samples(self) -> int:
        """Samples per epoch: the training-set size, else the table size (equal unless ids are sparse)."""
        return self.train_num_samples or self.dataset_size

    def epoch(self, batch_size: int) -> float:
        """Epochs completed before the current update: samples seen / training-set size."""
        return int(self.num_updates) * batch_size / self.epoch_samples

    def gamma(self, batch_size: int) -> float:
        """Moving-average weight of the current step (`batch_size`: the global batch)."""
        if self.gamma_schedule == "stepped":
            epoch = int(self.num_updates) * batch_size // self.epoch_samples  # the integer epoch, exactly
            if epoch == 0:
                return 1.0
        else:
            if self.gamma_decay_epochs <= 0:
                return self.gamma_min
            epoch = self.epoch(batch_size)
        if epoch >= self.gamma_decay_epochs:
            return self.gamma_min
        return self.gamma_min + (1 - self.gamma_min) * 0.5 * (1 + math.cos(math.pi * epoch / self.gamma_decay_epochs))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._id_to_slot = None  # rebuilt from `slot_ids` on next use

    def _slots(self, ids: torch.Tensor | None, assign: bool) -> torch.Tensor:
        """Table slots of sample ids (-1 for ids never seen when `assign` is False)."""
        if ids is None:
            raise ValueError("objective='fastclip' needs `sample_ids` (stable per-sample ids) in every batch")
        if self.id_mode == "index":
            bad = (ids < 0) | (ids >= self.dataset_size)
            if bool(bad.any()):
                raise ValueError(
                    f"sample id {int(ids[bad][0])} is outside [0, fastclip_dataset_size={self.dataset_size}); "
                    "set fastclip_dataset_size to the number of samples or use fastclip_id_mode='map'"
                )
            return ids
        if self._id_to_slot is None:
            used = int(self.num_slots)
            self._id_to_slot = {int(i): s for s, i in enumerate(self.slot_ids[:used].tolist())}
        slots = []
        for sample_id in ids.tolist():
            slot = self._id_to_slot.get(sample_id, -1)
            if slot < 0 and assign:
                slot = int(self.num_slots)
                if slot >= self.dataset_size:
                    raise ValueError(
                        f"more distinct sample ids than fastclip_dataset_size={self.dataset_size}; "
                        "set it to the number of training samples"
                    )
                self._id_to_slot[sample_id] = slot
                self.slot_ids[slot] = sample_id
                self.num_slots += 1
            slots.append(slot)
        return torch.tensor(slots, dtype=torch.long, device=ids.device)

    @torch.no_grad()
    def update(self, inputs):
        slots = self._slots(inputs.sample_ids, assign=True)
        gamma = self.gamma(inputs.batch_size)
        log_g = torch.stack([inputs.log_g_image, inputs.log_g_text])  # (2, B) = log(eps + ghat)
        old = self.log_u[:, slots]
        moved = torch.logaddexp(old + math.log1p(-gamma), log_g + math.log(gamma)) if gamma < 1 else log_g
        self.log_u[:, slots] = torch.where(self.seen[slots], moved, log_g)
        self.seen[slots] = True
        self.num_updates += 1
        return {"gamma": torch.tensor(gamma)}

    @torch.no_grad()
    def estimate(self, inputs):
        local_ids = inputs.sample_ids[inputs.local] if inputs.sample_ids is not None else None
        slots = self._slots(local_ids, assign=False)
        known = slots >= 0
        known &= self.seen[slots.clamp_min(0)]
        table = self.log_u[:, slots.clamp_min(0)]
        alpha_image = torch.where(known, table[0], inputs.log_g_image[inputs.local])
        alpha_text = torch.where(known, table[1], inputs.log_g_text[inputs.local])
        return alpha_image, alpha_text

    def loss(self, batch, inputs, rho):
        alpha_image, alpha_text = self.estimate(inputs)
        return fastclip_loss(batch, alpha_image, alpha_text, self.eps, rho, self.direction_reduction,
                             self.temperature_gradient)


__all__ = ["MovingAverageNormalizer", "fastclip_loss", "release_temperature_surrogate"]
