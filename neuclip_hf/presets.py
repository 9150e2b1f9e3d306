"""Named model geometries, so recipes, tests and benchmarks build the same models.

`tiny` is the CPU default (a few million parameters, 32 px images, the real 49,408-token CLIP vocabulary);
`vit-b-32` is OpenAI's CLIP ViT-B/32 geometry (224 px, 512-d embeddings) with open_clip's `ViT-B-32` activation:
GELU, which open_clip trains from scratch with (OpenAI's QuickGELU, `transformers`' default, stays in checkpoints
that carry it, e.g. `openai/clip-vit-base-patch32`). QuickGELU runs as three unfused element-wise ops forward and
more backward; `benchmarks/openclip_step.py` measures what it costs per step.
"""

from __future__ import annotations

import copy

from .configuration_neuclip import NeuCLIPConfig

# Token ids of OpenAI's CLIP tokenizer: CLIP pools the text at the first end-of-text token, so the text config
# must carry the tokenizer's ids (the padding token is end-of-text too).
CLIP_TOKEN_IDS = {"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}

PRESETS: dict[str, dict] = {
    "tiny": {
        "projection_dim": 64,
        "text_config": {
            **CLIP_TOKEN_IDS, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32, "projection_dim": 64,
        },
        "vision_config": {
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 8, "projection_dim": 64,
        },
    },
    "vit-b-32": {
        "projection_dim": 512,
        "text_config": {
            **CLIP_TOKEN_IDS, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "projection_dim": 512, "hidden_act": "gelu",
        },
        "vision_config": {
            "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 224, "patch_size": 32, "projection_dim": 512, "hidden_act": "gelu",
        },
    },
}


def model_config(preset: str = "tiny", **overrides) -> NeuCLIPConfig:
    """A NeuCLIPConfig of a named geometry.

    Args:
        preset: One of `PRESETS` (`tiny`, `vit-b-32`).
        **overrides: NeuCLIPConfig fields; `text_config` / `vision_config` dicts are merged into the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = copy.deepcopy(PRESETS[preset])
    for tower in ("text_config", "vision_config"):
        values[tower].update(overrides.pop(tower, None) or {})
    values.update(overrides)
    return NeuCLIPConfig(**values)
