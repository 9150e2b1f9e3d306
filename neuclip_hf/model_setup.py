"""Build the model and processor of a training run from `ModelArguments` (used by the recipes)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor, CLIPProcessor
from transformers.utils import logging

from .arguments import LoraArguments, ModelArguments, parse_overrides
from .hub import load_normalizer
from .lora import apply_lora
from .modeling_neuclip import NeuCLIPModel
from .presets import model_config
from .tokenization import build_clip_processor

logger = logging.get_logger(__name__)


def _has_processor(path: str) -> bool:
    local = Path(path)
    if local.is_dir():
        return any((local / name).exists() for name in ("processor_config.json", "preprocessor_config.json"))
    return True  # a Hub id: let AutoProcessor try, fall back below


def build_model(model_args: ModelArguments, **extra_overrides) -> NeuCLIPModel:
    """A NeuCLIP model from scratch (`model_preset`) or from a CLIP / NeuCLIP checkpoint (`init_from`).

    Args:
        model_args: The run's model arguments.
        **extra_overrides: NeuCLIPConfig fields the caller derives (e.g. `fastclip_dataset_size` from the data).
    """
    overrides = {**parse_overrides(model_args.config_overrides), **extra_overrides, "objective": model_args.objective}
    if model_args.init_from:
        logger.info(f"Continued pretraining from {model_args.init_from}: encoders loaded, normalizer new")
        model = NeuCLIPModel.from_clip_pretrained(model_args.init_from, **overrides)
    else:
        model = NeuCLIPModel(model_config(model_args.model_preset, **overrides))
    if model_args.init_normalizer_from:
        load_normalizer(model, model_args.init_normalizer_from)  # raises on another objective or other shapes
    return model


def maybe_apply_lora(model: NeuCLIPModel, lora_args: LoraArguments):
    """The model wrapped for LoRA training when `--lora_r` > 0 (see `neuclip_hf.lora`), else the model itself."""
    if lora_args.lora_r <= 0:
        return model
    logger.info(f"LoRA r={lora_args.lora_r} on {lora_args.lora_target_modules} of both towers; normalizer in full")
    return apply_lora(model, r=lora_args.lora_r, alpha=lora_args.lora_alpha,
                      target_modules=lora_args.lora_target_modules, dropout=lora_args.lora_dropout)


def build_processor(model_args: ModelArguments, model: NeuCLIPModel) -> CLIPProcessor:
    """The checkpoint's own processor when continuing from one; else CLIP's processor sized for the model."""
    if model_args.init_from and _has_processor(model_args.init_from) and model_args.tokenizer is None:
        try:
            return AutoProcessor.from_pretrained(model_args.init_from)
        except (OSError, ValueError) as error:
            logger.warning(f"no processor loaded from {model_args.init_from} ({error}); building CLIP's")
    config = model.config
    return build_clip_processor(
        image_size=config.vision_config.image_size,
        model_max_length=config.text_config.max_position_embeddings,
        tokenizer=model_args.tokenizer,
    )
