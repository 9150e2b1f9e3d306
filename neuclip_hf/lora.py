"""LoRA through peft: adapters on the encoders' attention projections, the normalizer trained in full.

Why the normalizer is not a peft `modules_to_save` module: peft wraps such a module in a `ModulesToSaveWrapper`
whose own methods shadow the wrapped module's (`update` among them, which the estimator contract uses), keeps a
frozen duplicate of it, and would hand the normalizer's optimizer a different module than the one the forward uses.
Instead the normalizer stays a plain sub-module of the base model: after `get_peft_model` has frozen the base
weights, `apply_lora` makes the normalizer's parameters trainable again (exactly those that were trainable before,
so AmorLIP's EMA and previous-epoch networks stay frozen). Its own optimizer, update rule, counters and
`ddp_ignored_state_names` (re-prefixed for the wrapper) keep working unchanged, and it is saved next to the adapter
as `normalizer.safetensors` + `normalizer_config.json` (the format of `neuclip_hf.hub.save_normalizer`), both by
`save_lora` and in every trainer checkpoint.

The temperature (`logit_scale`) stays frozen under LoRA: an adapter plus the normalizer then describe the trained
state completely, and the base checkpoint's temperature is kept.

Example:
    ```python
    >>> model = apply_lora(NeuCLIPModel.from_clip_pretrained("openai/clip-vit-base-patch32"), r=16)
    >>> ...  # train with NeuCLIPTrainer; trainer.save_model(dir) writes the adapter and the normalizer
    >>> merged = merge_lora(load_lora(dir))  # a full NeuCLIPModel with the adapter merged in
    ```
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .hub import NORMALIZER_CONFIG_NAME, fetch_repo_file, load_normalizer, save_normalizer
from .modeling_neuclip import NeuCLIPModel, unwrap_model
from .normalizers import find_normalizer

DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
TOWERS = ("text_model", "vision_model")  # LoRA goes into both encoders, never into the normalizer
_TRAINABLE_ATTRIBUTE = "_neuclip_trainable_names"  # remembered on the normalizer: which parameters it trains


def lora_config(r: int = 16, alpha: float = 32.0,
                target_modules: str | tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0):
    """A `peft.LoraConfig` whose targets are `target_modules` inside the text and vision towers only.

    Args:
        r: Rank of the update.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        target_modules: Module names (e.g. `q_proj,v_proj` or a list).
        dropout: LoRA dropout.
    """
    from peft import LoraConfig

    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be >= 1")
    names = [n.strip() for n in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules)
    names = [n for n in names if n]
    if not names:
        raise ValueError("lora target_modules is empty")
    # A full-match regex over module paths: only modules of the two towers, whatever the normalizer contains.
    pattern = rf"^({'|'.join(TOWERS)})\..*\.({'|'.join(re.escape(n) for n in names)})$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")


def _remember_trainable(model: torch.nn.Module) -> None:
    """Record which normalizer parameters train (before peft freezes everything)."""
    normalizer = find_normalizer(model)
    if not hasattr(normalizer, _TRAINABLE_ATTRIBUTE):
        names = frozenset(name for name, p in normalizer.named_parameters() if p.requires_grad)
        setattr(normalizer, _TRAINABLE_ATTRIBUTE, names)


def keep_normalizer_trainable(model: torch.nn.Module) -> None:
    """Give the normalizer of a PEFT-wrapped model back its trainable parameters and name its state for DDP.

    Idempotent; call after anything that re-freezes the base model (wrapping, loading an adapter).
    """
    normalizer = find_normalizer(model)
    trainable = getattr(normalizer, _TRAINABLE_ATTRIBUTE, None)
    if trainable is None:
        raise ValueError("the normalizer's trainable parameters were not recorded; wrap the model with apply_lora")
    for name, parameter in normalizer.named_parameters():
        parameter.requires_grad_(name in trainable)
    # DDP reads this list from the module it wraps (the PeftModel), by that module's parameter names.
    prefix = next(name for name, module in model.named_modules() if module is normalizer) + "."
    model._ddp_params_and_buffers_to_ignore = unwrap_model(model).ddp_ignored_state_names(prefix=prefix)


def check_lora_model(model: torch.nn.Module) -> None:
    """Refuse PEFT models whose normalizer cannot train as neuclip_hf needs (explains how to wrap instead).

    Raises:
        TypeError: the normalizer is wrapped by peft's `modules_to_save`, or it was frozen by `get_peft_model`.
    """
    core = unwrap_model(model)
    if type(core.normalizer).__name__ == "ModulesToSaveWrapper":
        raise TypeError("the normalizer is a peft modules_to_save module, whose wrapper shadows the estimator's "
                        "methods; wrap the model with neuclip_hf.lora.apply_lora instead")
    if not hasattr(find_normalizer(model), _TRAINABLE_ATTRIBUTE):
        raise TypeError("get_peft_model froze the normalizer; wrap the model with neuclip_hf.lora.apply_lora (or "
                        "load it with load_lora(..., is_trainable=True)) so that the normalizer keeps training")


def apply_lora(model: torch.nn.Module, r: int = 16, alpha: float = 32.0,
               target_modules: str | tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES, dropout: float = 0.0):
    """Wrap a NeuCLIPModel for LoRA training: adapters on `target_modules` of both towers, normalizer in full.

    Args:
        model: A NeuCLIPModel (e.g. `NeuCLIPModel.from_clip_pretrained(...)`).
        r, alpha, target_modules, dropout: See `lora_config`.

    Returns:
        The `peft.PeftModel`; train it with `NeuCLIPTrainer` as is.
    """
    from peft import get_peft_model

    if hasattr(model, "peft_config"):
        raise ValueError("the model is already PEFT-wrapped")
    _remember_trainable(model)
    peft_model = get_peft_model(model, lora_config(r, alpha, target_modules, dropout))
    keep_normalizer_trainable(peft_model)
    return peft_model


def lora_summary(model: torch.nn.Module) -> dict | None:
    """`{"r", "alpha", "dropout", "target_modules"}` of a LoRA-wrapped model (None for other models)."""
    config = getattr(getattr(model, "module", model), "peft_config", {}).get("default")
    if config is None:
        return None
    match = re.search(r"\.\((.*)\)\$$", str(config.target_modules))  # our pattern's last group: the module names
    targets = match.group(1).replace("|", ", ").replace("\\", "") if match else str(config.target_modules)
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "target_modules": targets}


def save_lora(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter (`adapter_config.json`, `adapter_model.safetensors`) and the normalizer."""
    model = getattr(model, "module", model)
    model.save_pretrained(directory)
    save_normalizer(model, directory)


def load_lora(source: str | os.PathLike, base_model: torch.nn.Module | str | None = None, *,
              is_trainable: bool = False, **hub_kwargs):
    """Load a LoRA adapter saved by `save_lora` / `NeuCLIPTrainer` (a directory or Hub repository).

    Args:
        source: Holds `adapter_config.json`, `adapter_model.safetensors` and, normally, the normalizer files.
        base_model: The model the adapter was trained on: a NeuCLIPModel, or a CLIP / NeuCLIP checkpoint
            (default: `base_model_name_or_path` of the adapter config), built with the saved objective and
            estimator fields.
        is_trainable: Keep training it (adapter and normalizer trainable) rather than inference.
        **hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only` for Hub sources.

    Returns:
        The `peft.PeftModel` with the adapter and the saved normalizer.
    """
    from peft import PeftConfig, PeftModel

    source = str(source)
    if base_model is None or isinstance(base_model, (str, Path)):
        path = str(base_model) if base_model is not None else PeftConfig.from_pretrained(source, **hub_kwargs)\
            .base_model_name_or_path
        description = fetch_repo_file(source, NORMALIZER_CONFIG_NAME, hub_kwargs)
        overrides = {}
        if description is not None:  # rebuild the base with the normalizer the adapter was trained with
            saved = json.loads(description.read_text())
            overrides = {"objective": saved["objective"], **saved.get("estimator_config", {})}
        base_model = NeuCLIPModel.from_clip_pretrained(path, **overrides)
    _remember_trainable(base_model)
    model = PeftModel.from_pretrained(base_model, source, is_trainable=is_trainable, **hub_kwargs)
    if fetch_repo_file(source, NORMALIZER_CONFIG_NAME, hub_kwargs) is not None:
        load_normalizer(model, source, **hub_kwargs)
    if is_trainable:
        keep_normalizer_trainable(model)
    return model


def merge_lora(model: torch.nn.Module):
    """Merge the adapter into the encoder weights: a plain NeuCLIPModel with the trained normalizer.

    Args:
        model: A LoRA-wrapped NeuCLIPModel (`apply_lora` / `load_lora`).

    Returns:
        The NeuCLIPModel; every encoder weight and the temperature are trainable again, the normalizer keeps its own
        trainable set (AmorLIP's EMA and previous-epoch networks stay frozen).
    """
    model = getattr(model, "module", model)
    normalizer = find_normalizer(model)
    trainable = getattr(normalizer, _TRAINABLE_ATTRIBUTE, None)
    merged = model.merge_and_unload()  # W + (alpha / r) B A in place of each adapted Linear
    merged.requires_grad_(True)
    if trainable is not None:
        for name, parameter in normalizer.named_parameters():
            parameter.requires_grad_(name in trainable)
        delattr(normalizer, _TRAINABLE_ATTRIBUTE)
    return merged


__all__ = [
    "apply_lora",
    "check_lora_model",
    "keep_normalizer_trainable",
    "load_lora",
    "lora_config",
    "lora_summary",
    "merge_lora",
    "save_lora",
]
