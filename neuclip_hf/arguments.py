"""Command-line arguments of the recipes: model arguments and a parser that also reads one YAML/JSON file.

`python recipes/train.py config.yaml --max_steps 100`: the file's values first, then the command line overrides
them. Every dataclass field is a flag (`--objective`, `--init_from`, `--train_data`, and all `TrainingArguments`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ModelArguments:
    """What model to train."""

    objective: str = field(
        default="neuclip", metadata={"help": "clip, siglip, fastclip, amorlip or neuclip (NeuCLIPConfig.objective)."}
    )
    model_preset: str = field(
        default="tiny", metadata={"help": "Geometry of a model trained from scratch: tiny or vit-b-32."}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continued pretraining: a CLIP or NeuCLIP checkpoint (directory or Hub id, e.g. "
                          "openai/clip-vit-base-patch32). Its encoders, tokenizer and processor are loaded; only the "
                          "normaliser is new."},
    )
    init_normalizer_from: str | None = field(
        default=None,
        metadata={"help": "Warm-start the normaliser from a normaliser repository / directory (normalizer.safetensors "
                          "+ normalizer_config.json, see neuclip_hf.hub.push_normalizer) or a NeuCLIP checkpoint; the "
                          "objective and the tensor shapes must match."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory or Hub id (default: OpenAI's CLIP BPE, built offline)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "NeuCLIPConfig fields to set, as JSON ('{\"neuclip_num_prototypes\": 1024}') or "
                          "'key=value,key=value' (e.g. 'neuclip_inner_steps=10,rho=8.5')."},
    )


@dataclass
class EvalArguments:
    """Held-out zero-shot evaluation during and after training (the data is `--eval_data`)."""

    zero_shot_eval_steps: int = field(
        default=0, metadata={"help": "Evaluate every N steps (0: only at the end of training)."}
    )
    zero_shot_templates: str = field(
        default="openai", metadata={"help": "Prompt templates: openai (80), simple (7) or a file with one per line."}
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many held-out samples (default: all)."}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Images encoded at a time during evaluation."})
    normaliser_diagnostics_steps: int = field(
        default=0,
        metadata={"help": "Every N steps, log the estimator's error against the exact log-normaliser of a probe set "
                          "over a pool of training samples (normaliser_mse, normaliser_in_batch_mse); 0: off."},
    )
    normaliser_diagnostics_pool: int = field(
        default=2048, metadata={"help": "Training samples in the diagnostics' reference pool (the first ones)."}
    )


@dataclass
class LoraArguments:
    """LoRA flags of the training recipe (`--lora_r 16` enables it)."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full encoders (no LoRA)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated module names inside both encoders that get adapters (CLIP attention: "
                          "q_proj, k_proj, v_proj, out_proj; MLP: fc1, fc2)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`config_overrides` as a dict: JSON, or comma-separated key=value pairs with YAML-typed values."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    overrides = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return overrides


def _to_cli(values: dict[str, Any]) -> list[str]:
    """A config file's mapping as command-line tokens, so the real command line can override it."""
    tokens: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        tokens.append(f"--{key}")
        if isinstance(value, bool):
            tokens.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            tokens.extend(str(v) for v in value)
        elif isinstance(value, dict):
            tokens.append(json.dumps(value))
        else:
            tokens.append(str(value))
    return tokens


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    return values


def parse_arguments(dataclass_types: tuple, argv: list[str], default_config: str | Path | None = None) -> tuple:
    """Parse `argv` into the dataclasses; a leading .yaml/.json file supplies values the flags can override.

    Args:
        dataclass_types: The argument dataclasses, e.g. (ModelArguments, DataArguments, NeuCLIPTrainingArguments).
        argv: Command-line tokens (without the program name).
        default_config: File used when `argv` is empty (the recipe's no-argument default run).
    """
    parser = HfArgumentParser(dataclass_types)
    if not argv and default_config is not None:
        argv = [str(default_config)]
    tokens = list(argv)
    if tokens and Path(tokens[0]).suffix in CONFIG_SUFFIXES:
        tokens = _to_cli(read_config_file(tokens[0])) + tokens[1:]
    known = {option for action in parser._actions for option in action.option_strings}
    unknown = [t for t in tokens if t.startswith("--") and t.split("=")[0] not in known]
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(unknown)} (see --help)")
    return parser.parse_args_into_dataclasses(args=tokens)
