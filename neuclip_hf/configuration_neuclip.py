"""Configuration of NeuCLIP models: a `CLIPConfig` plus the objective and its normalizer estimator.

Every training method in this package is one contrastive objective with a different estimate of each anchor's
log-normalizer log(eps + g_i) (see docs/algorithms.md). The fields shared by every method are declared here; each
method declares its own fields (`<prefix><name>`, e.g. `neuclip_num_prototypes`) with their defaults, checks and
help in its `normalizer_<name>.py` (`config_fields`). Fields of methods other than `objective` are kept (so one
config can be switched between methods) but unused.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig
from transformers.utils import logging

from .normalizers import NORMALIZERS, normalizer_class, registered_objectives

logger = logging.get_logger(__name__)

# Keys of a saved CLIPConfig that must not be forwarded when converting it into a NeuCLIPConfig.
_CLIP_ONLY_KEYS = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")


def _check(condition: bool, field: str, value, allowed: str) -> None:
    """Raise a ValueError naming the field, its value and what is allowed."""
    if not condition:
        raise ValueError(f"NeuCLIPConfig.{field}={value!r} is invalid: expected {allowed}.")


# Method fields renamed since a config.json could have been saved: old key -> (new key, old value -> new value). A
# saved config keeps loading, with the behaviour it had (the update split of a `neuclip_shard_update` run, say).
RENAMED_FIELDS = {
    "neuclip_shard_update": ("neuclip_update_sharding", {True: "anchors", False: "replicated"}),
}


@strict
class NeuCLIPConfig(CLIPConfig):
    r"""Configuration of a [`NeuCLIPModel`]: CLIP encoders plus a normalizer estimator.

    Args:
        objective: Training objective, a registered method: `clip` (in-batch InfoNCE, OpenCLIP / HF `clip_loss`),
            `siglip` (pairwise sigmoid), `fastclip` (moving-average normalizer per sample, FastCLIP-v3 / SogCLR),
            `amorlip` (amortised partition function, AmorLIP) or `neuclip` (prototype normalizer network, NeuCLIP).
        eps: The epsilon inside log(eps + g) of the global contrastive objective (FastCLIP-v3 RGCL-g).
        rho: Weight of the temperature penalty: the global objectives add `2 * rho * T` (rho per direction).
            FastCLIP's rho is this rho; AmorLIP's paper writes the term as `rho_A * T`, so its rho_A equals
            `2 * rho` here (table in docs/baselines.md).
        rho_reference_batch: B_ref of the batch-aware rho, `rho - log((B_ref - 1) / (B - 1))` at global batch B, for
            the RGCL-g objectives (`fastclip`, `neuclip`): their temperature gradient is at least
            `2 rho - 2 log(B - 1)` whatever the embeddings, so a rho tuned at B_ref has no balance point at a much
            smaller B and T only falls. The shift keeps `rho - log(B - 1)` as at B_ref. None: rho as given.
        learn_temperature: Train T (`logit_scale`); False keeps it at `temperature_init` (another way to give a
            small-batch run a fixed, sensible temperature, for every objective).
        train_num_samples: n, the training-set size: one epoch is n samples seen. FastCLIP's gamma, AmorLIP's
            epochs and beta ramp and epoch-based rho schedules count epochs with it; the recipe and the trainer fill
            it from the data (`--train_num_samples`, parquet footers, tar headers, a map-style dataset's length).
        temperature_init: Initial temperature T (`logit_scale = log(1/T)`). `None` picks the method's default: 0.1
            for `siglip` (logit scale 10, as in SigLIP) and 0.07 otherwise (CLIP).
        temperature_min: Lower bound of T, applied by `clamp_logit_scale_` after every step (0.01: 1/T <= 100).
        temperature_max: Upper bound of T (1.0 keeps the logit scale >= 1, as AmorLIP clamps it).
        <method>_<field>: Each method's own fields, e.g. `neuclip_num_prototypes`, `amorlip_ema_decay`,
            `fastclip_dataset_size`, `siglip_bias_init`: see `config_fields` in the method's
            `normalizer_<name>.py` (defaults, allowed values, published settings).
    """

    model_type = "neuclip"

    objective: str = "neuclip"
    eps: float | int = 1e-6
    rho: float | int = 6.5
    rho_reference_batch: int | None = None
    temperature_init: float | int | None = None
    temperature_min: float | int = 0.01
    temperature_max: float | int = 1.0
    learn_temperature: bool = True
    train_num_samples: int | None = None

    def __post_init__(self, **kwargs):
        for old, (new, values) in RENAMED_FIELDS.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if value not in values:
                    raise ValueError(f"NeuCLIPConfig.{old}={value!r} (renamed to `{new}`) is invalid: expected one of "
                                     f"{sorted(values, key=str)}")
                kwargs.setdefault(new, values[value])
                logger.warning(f"NeuCLIPConfig: `{old}={value!r}` is read as `{new}={kwargs[new]!r}` (renamed)")
        # Each registered method's own fields, from the keyword arguments or the method's defaults.
        for method in NORMALIZERS.values():
            for name, spec in method.config_fields.items():
                key = method.config_prefix + name
                setattr(self, key, kwargs.pop(key, spec.default))
        prefixes = tuple(m.config_prefix for m in NORMALIZERS.values() if m.config_prefix)
        unknown = sorted(key for key in kwargs if key.startswith(prefixes))
        if unknown:
            raise ValueError(f"NeuCLIPConfig has no field(s) {unknown}: a method's fields are listed in its "
                             "`config_fields` (normalizer_<name>.py)")
        if self.temperature_init is None:
            method = NORMALIZERS.get(self.objective)
            self.temperature_init = method.default_temperature if method is not None else 0.07
        self.check_neuclip_fields()
        # CLIP's own field stays consistent with the temperature, so plain CLIPModel code reads the same init.
        self.logit_scale_init_value = math.log(1.0 / self.temperature_init)
        super().__post_init__(**kwargs)

    def check_neuclip_fields(self) -> None:
        """Check every NeuCLIP field (run once, when the config is built); raises `ValueError` naming the field and
        the allowed values. (Not named `validate_*`: `@strict` would run it a second time and wrap its error.)"""
        objectives = registered_objectives()
        _check(self.objective in objectives, "objective", self.objective, f"one of {objectives}")
        _check(self.eps > 0, "eps", self.eps, "a positive number (e.g. 1e-6)")
        _check(self.rho >= 0 or normalizer_class(self.objective).allows_negative_rho, "rho", self.rho, "rho >= 0")
        _check(self.temperature_min > 0, "temperature_min", self.temperature_min, "a positive number")
        _check(
            self.temperature_max >= self.temperature_min, "temperature_max", self.temperature_max,
            f">= temperature_min ({self.temperature_min})",
        )
        _check(
            self.temperature_min <= self.temperature_init <= self.temperature_max, "temperature_init",
            self.temperature_init, f"a value in [{self.temperature_min}, {self.temperature_max}]",
        )
        _check(self.train_num_samples is None or self.train_num_samples >= 1, "train_num_samples",
               self.train_num_samples, "None or an integer >= 1")
        _check(self.rho_reference_batch is None or self.rho_reference_batch >= 2, "rho_reference_batch",
               self.rho_reference_batch, "None or a global batch size >= 2")
        for method in NORMALIZERS.values():
            method.validate_config(self)

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig, **overrides) -> "NeuCLIPConfig":
        """Build a NeuCLIP config around the encoders of a CLIP config.

        Args:
            clip_config: Any `CLIPConfig` (e.g. `CLIPConfig.from_pretrained("openai/clip-vit-base-patch32")`).
            **overrides: NeuCLIP (or CLIP) fields to set, e.g. `objective="fastclip"`.
        """
        values = {k: v for k, v in clip_config.to_dict().items() if k not in _CLIP_ONLY_KEYS}
        if "temperature_init" not in overrides and not isinstance(clip_config, cls):
            # Keep the temperature the CLIP checkpoint was configured with.
            values["temperature_init"] = math.exp(-values.get("logit_scale_init_value", math.log(1 / 0.07)))
        values.update(overrides)
        return cls(**values)


__all__ = ["NeuCLIPConfig"]
