"""CLIP (OpenCLIP / Hugging Face `clip_loss`): the normalizer is the mini-batch itself.

The encoder objective is plain symmetric InfoNCE over local anchors against the gathered global batch; its
gradient flows through the in-batch normalizer. There is no state to update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .normalizer_base import NormalizerEstimator, register_normalizer
from .objectives import ContrastiveBatch


def clip_loss(batch: ContrastiveBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE (OpenCLIP, HF `clip_loss`): local anchors against the global batch."""
    image_to_text, text_to_image, _ = batch.similarities()
    scale = batch.logit_scale.exp()
    target = batch.positive_index
    loss_image = F.cross_entropy(scale * image_to_text, target)
    loss_text = F.cross_entropy(scale * text_to_image, target)
    loss = (loss_image + loss_text) / 2
    parts = {"contrastive": loss, "image_to_text": loss_image, "text_to_image": loss_text}
    return loss, {name: value.detach() for name, value in parts.items()}


@register_normalizer
class InBatchNormalizer(NormalizerEstimator):
    """OpenCLIP / HF CLIP: the normalizer is the mini-batch itself (plain symmetric InfoNCE).

    Its estimate of log(eps + g_i) is log(eps + ghat_i) over the global batch, reported for diagnostics; the
    loss differentiates through the batch, as InfoNCE does.
    """

    objective = "clip"
    title = "CLIP"
    summary = "The symmetric InfoNCE loss normalised over the mini-batch (Radford et al., ICML 2021)."
    citation = """@inproceedings{radford2021clip,
  title         = {Learning Transferable Visual Models From Natural Language Supervision},
  author        = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
                   Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
                   Krueger, Gretchen and Sutskever, Ilya},
  booktitle     = {International Conference on Machine Learning (ICML)},
  year          = {2021},
  eprint        = {2103.00020},
  archivePrefix = {arXiv}
}"""
    needs_statistics = False
    rgcl_temperature = False  # InfoNCE: no RGCL-g temperature penalty

    def estimate(self, inputs):
        return inputs.log_g_image[inputs.local], inputs.log_g_text[inputs.local]

    def loss(self, batch, inputs, rho):
        return clip_loss(batch)


__all__ = ["InBatchNormalizer", "clip_loss"]
