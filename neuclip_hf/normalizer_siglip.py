"""SigLIP: no normalizer to estimate; a pairwise sigmoid loss with a learned logit bias replaces the softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .normalizer_base import Normalizer, number_field, register_normalizer
from .objectives import ContrastiveBatch


def siglip_loss(batch: ContrastiveBatch, logit_bias: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise sigmoid loss -(1/B) sum_ij log sigmoid(z_ij (t s_ij + b)), z_ii = 1 and -1 elsewhere.

    Each rank sums the rows of its local images against all texts, so every pair is counted exactly once.
    """
    image_to_text, _, _ = batch.similarities()
    logits = batch.logit_scale.exp() * image_to_text + logit_bias.float()
    labels = torch.full_like(logits, -1.0).scatter(1, batch.positive_index[:, None], 1.0)
    loss = -F.logsigmoid(labels * logits).sum(dim=1).mean()
    return loss, {"sigmoid": loss.detach()}


@register_normalizer
class SigmoidBias(Normalizer):
    """SigLIP: no normalizer to estimate; the pairwise sigmoid loss has a learned logit bias b instead.

    b plays the role of one global log-normalizer, so it lives under `normalizer.`; it is trained with the
    encoders (it is in the encoder optimizer and in DDP's gradient averaging).
    """

    objective = "siglip"
    title = "SigLIP"
    summary = ("A pairwise sigmoid loss with a learned logit bias replaces the softmax normalizer (Zhai et al., "
               "ICCV 2023).")
    citation = """@inproceedings{zhai2023siglip,
  title         = {Sigmoid Loss for Language Image Pre-Training},
  author        = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle     = {IEEE/CVF International Conference on Computer Vision (ICCV)},
  year          = {2023},
  eprint        = {2303.15343},
  archivePrefix = {arXiv}
}"""
    config_prefix = "siglip_"
    config_fields = {"bias_init": number_field(-10.0, "Initial SigLIP logit bias b (-10 in SigLIP).")}
    needs_statistics = False
    default_temperature = 0.1  # logit scale 10, as SigLIP initialises it

    def __init__(self, config):
        super().__init__(config)
        self.bias_init = float(self.settings(config).bias_init)
        self.logit_bias = nn.Parameter(torch.tensor(self.bias_init))

    def reset_parameters(self):
        nn.init.constant_(self.logit_bias, self.bias_init)

    def encoder_parameter_names(self):
        return {"logit_bias"}

    def loss(self, batch, inputs, rho):
        return siglip_loss(batch, self.logit_bias)


__all__ = ["SigmoidBias", "siglip_loss"]
