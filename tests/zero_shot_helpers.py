"""A small CLIP model with OpenAI's real tokenizer and a PIL image processor, saved the way training saves it."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neuclip_hf import NeuCLIPModel
from neuclip_hf.presets import model_config
from neuclip_hf.tokenization import build_clip_processor

IMAGE_SIZE = 32
SMALL_TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)


def small_model(seed: int = 0, objective: str = "clip") -> NeuCLIPModel:
    """The `tiny` preset's geometry (real 49,408-token vocabulary, 32 px) with 32-wide towers: ~1.7M parameters."""
    torch.manual_seed(seed)
    config = model_config("tiny", objective=objective, text_config=SMALL_TOWER, vision_config=SMALL_TOWER,
                          projection_dim=16)
    return NeuCLIPModel(config).eval()


def small_processor():
    return build_clip_processor(image_size=IMAGE_SIZE, model_max_length=32)


def save_model(directory: Path, model=None, processor=None) -> Path:
    """`model.save_pretrained(d)` + `processor.save_pretrained(d)`, as a training output directory holds them."""
    (model or small_model()).save_pretrained(directory)
    (processor or small_processor()).save_pretrained(directory)
    return directory


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (28, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]
