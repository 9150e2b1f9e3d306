"""Configuration of NeuCLIP models: a `CLIPConfig` plus the objective and its normaliser estimator.

Every training method in this package is one contrastive objective with a different estimate of each anchor's
log-normaliser log(eps + g_i) (see ALGORITHMS.md). The fields below are grouped by method; fields of methods other
than `objective` are kept (so one config can be switched between methods) but unused.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig

# The objectives shipped with the package. `neuclip_hf.normalizers.register_normalizer` extends this tuple.
OBJECTIVES: tuple[str, ...] = ("clip", "siglip", "fastclip", "amorlip", "neuclip")
NEUCLIP_RESTART_SCHEDULES = ("constant", "doubling")
NEUCLIP_RESTART_SOURCES = ("bank", "batch")
AMORLIP_ESTIMATE_SOURCES = ("blend", "target")
FASTCLIP_ID_MODES = ("index", "map")
FASTCLIP_GAMMA_SCHEDULES = ("stepped", "continuous")
FASTCLIP_DIRECTION_REDUCTIONS = ("sum", "mean")
FASTCLIP_TEMPERATURE_GRADIENTS = ("objective", "release")

# Keys of a saved CLIPConfig that must not be forwarded when converting it into a NeuCLIPConfig.
_CLIP_ONLY_KEYS = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")


def _check(condition: bool, field: str, value, allowed: str) -> None:
    """Raise a ValueError naming the field, its value and what is allowed."""
    if not condition:
        raise ValueError(f"NeuCLIPConfig.{field}={value!r} is invalid: expected {allowed}.")


@strict
class NeuCLIPConfig(CLIPConfig):
    r"""Configuration of a [`NeuCLIPModel`]: CLIP encoders plus a normaliser estimator.

    Args:
        objective: Training objective, one of `clip` (in-batch InfoNCE, OpenCLIP / HF `clip_loss`), `siglip`
            (pairwise sigmoid), `fastclip` (moving-average normaliser per sample, FastCLIP-v3 / SogCLR), `amorlip`
            (amortised partition function, AmorLIP) or `neuclip` (prototype normaliser network, NeuCLIP).
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
        temperature_init: Initial temperature T (`logit_scale = log(1/T)`). `None` picks 0.1 for `siglip`
            (logit scale 10, as in SigLIP) and 0.07 otherwise (CLIP).
        temperature_min: Lower bound of T, applied by `clamp_logit_scale_` after every step (0.01: 1/T <= 100).
        temperature_max: Upper bound of T (1.0 keeps the logit scale >= 1, as AmorLIP clamps it).
        neuclip_num_prototypes: m, prototypes per direction (4096 in the paper).
        neuclip_inner_steps: T_u, AdaGrad steps on the prototypes per training step (10 in the paper).
        neuclip_restart_period: T_r, steps between restarts that re-seed the prototypes (500 in the paper).
        neuclip_restart_schedule: `constant` restarts every T_r steps; `doubling` restarts after
            `neuclip_restart_initial_period` steps and doubles the gap until it reaches T_r (early restarts keep
            the prototypes fresh while a randomly initialised encoder moves fast).
        neuclip_restart_initial_period: First gap of the `doubling` schedule.
        neuclip_restart_source: Where restarts take their embeddings: `bank` (a FIFO of the last m gathered
            embeddings of each modality, so m distinct prototypes even when the global batch is smaller than m) or
            `batch` (the current global batch only, as in the paper; repeated cyclically when it is smaller than m).
        neuclip_learning_rate: AdaGrad learning rate of the prototypes (not published; tuned in `benchmarks/`).
        neuclip_reset_optimizer_on_restart: Reset the AdaGrad accumulators when the prototypes are re-seeded.
        amorlip_hidden_factor: f_d, hidden width of the residual MLPs as a fraction of the embedding size.
        amorlip_inner_steps: T_lambda, Adam steps of the online networks per update (3 in the paper).
        amorlip_update_period: T_online, steps between online-network updates (1 large scale, 8 medium scale).
        amorlip_learning_rate: Adam learning rate of the online networks (1e-3 in the paper).
        amorlip_ema_decay: alpha of the EMA target networks (0.92 large scale, 0.999 medium scale).
        amorlip_ema_period: T_target, steps between EMA updates (2 in the paper).
        amorlip_beta_max: beta_T, final weight of the previous-epoch network in the blended target (0.8).
        amorlip_beta_ramp_epochs: Epochs over which beta ramps from 0 to beta_T by a cosine (16 in the release).
        amorlip_epoch_steps: Length of an AmorLIP epoch in steps, overriding the true epoch: the previous-epoch
            snapshot, the re-initialisation and the beta ramp follow its boundaries. None (default): one pass over
            the data, `train_num_samples / global batch` steps, as the release.
        amorlip_positive_weight: c_pos, weight of the positive pair inside the partition sum (1.0 in the paper,
            1e-3 in the released script).
        amorlip_estimate_source: What the encoder loss divides by: `blend` (beta * previous-epoch network +
            (1 - beta) * in-batch sum, the released recipe) or `target` (the EMA target network, the paper's text).
        amorlip_grad_clip: Gradient-norm clip of the online networks (1.0 in the release).
        amorlip_scale_lr_by_world_size: Multiply the online networks' learning rate by the number of processes, as
            the release does after each epoch's re-initialisation (`lambda_lr x world_size`); False: the paper's
            plain 1e-3.
        fastclip_dataset_size: Entries of the moving-average table (one per training sample id). None: the
            training-set size `train_num_samples`; one of them is required for `fastclip`.
        fastclip_id_mode: `index` when sample ids are already in [0, n); `map` to assign table slots to arbitrary
            integer ids in order of first appearance.
        fastclip_gamma_min: Final moving-average weight gamma (0.2 in FastCLIP-v3).
        fastclip_gamma_decay_epochs: Epochs over which gamma decays from 1 to `fastclip_gamma_min` by a cosine.
        fastclip_gamma_schedule: `stepped` (default, the release: one gamma per integer epoch, 1.0 in epoch 0, then
            the cosine at the epoch number) or `continuous` (the cosine at the fractional epoch, step by step;
            `fastclip_gamma_decay_epochs=0` then keeps gamma at `fastclip_gamma_min`).
        fastclip_direction_reduction: `sum` (default: the written RGCL-g adds the two directions, like every global
            objective here) or `mean` (the release's scale: half the loss, so its encoder gradient is the mean of
            the two directions and the penalty is rho T). Under AdamW without clipping the two train alike.
        fastclip_temperature_gradient: `objective` (default: dL/dT of the unified objective, the written RGCL-g at
            the estimate) or `release` (the released code's surrogate, whose dL/dT counts the T * dg/dT term twice:
            per anchor and direction alpha + 2 T exp(-alpha) dghat/dT, plus 2 rho; its resting T is colder).
        siglip_bias_init: Initial SigLIP logit bias b (-10 in SigLIP).
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

    neuclip_num_prototypes: int = 4096
    neuclip_inner_steps: int = 10
    neuclip_restart_period: int = 500
    neuclip_restart_schedule: str = "constant"
    neuclip_restart_initial_period: int = 25
    neuclip_restart_source: str = "bank"
    neuclip_learning_rate: float | int = 0.05
    neuclip_reset_optimizer_on_restart: bool = True

    amorlip_hidden_factor: float | int = 0.5
    amorlip_inner_steps: int = 3
    amorlip_update_period: int = 1
    amorlip_learning_rate: float | int = 1e-3
    amorlip_ema_decay: float | int = 0.92
    amorlip_ema_period: int = 2
    amorlip_beta_max: float | int = 0.8
    amorlip_beta_ramp_epochs: float | int = 16
    amorlip_epoch_steps: int | None = None
    amorlip_positive_weight: float | int = 1.0
    amorlip_estimate_source: str = "blend"
    amorlip_grad_clip: float | int | None = 1.0
    amorlip_scale_lr_by_world_size: bool = False

    fastclip_dataset_size: int | None = None
    fastclip_id_mode: str = "index"
    fastclip_gamma_min: float | int = 0.2
    fastclip_gamma_decay_epochs: float | int = 18
    fastclip_gamma_schedule: str = "stepped"
    fastclip_direction_reduction: str = "sum"
    fastclip_temperature_gradient: str = "objective"

    siglip_bias_init: float | int = -10.0

    def __post_init__(self, **kwargs):
        if self.temperature_init is None:
            self.temperature_init = 0.1 if self.objective == "siglip" else 0.07
        self.validate_neuclip()
        # CLIP's own field stays consistent with the temperature, so plain CLIPModel code reads the same init.
        self.logit_scale_init_value = math.log(1.0 / self.temperature_init)
        super().__post_init__(**kwargs)

    def validate_neuclip(self) -> None:
        """Check every NeuCLIP field; raises `ValueError` naming the field and the allowed values."""
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        _check(self.eps > 0, "eps", self.eps, "a positive number (e.g. 1e-6)")
        _check(self.rho >= 0 or self.objective == "amorlip", "rho", self.rho, "rho >= 0")
        _check(self.temperature_min > 0, "temperature_min", self.temperature_min, "a positive number")
        _check(
            self.temperature_max >= self.temperature_min, "temperature_max", self.temperature_max,
            f">= temperature_min ({self.temperature_min})",
        )
        _check(
            self.temperature_min <= self.temperature_init <= self.temperature_max, "temperature_init",
            self.temperature_init, f"a value in [{self.temperature_min}, {self.temperature_max}]",
        )
        for name in (
            "neuclip_num_prototypes", "neuclip_inner_steps", "neuclip_restart_period",
            "neuclip_restart_initial_period", "amorlip_inner_steps", "amorlip_update_period",
            "amorlip_ema_period",
        ):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("amorlip_epoch_steps", "train_num_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "None or an integer >= 1")
        _check(
            self.rho_reference_batch is None or self.rho_reference_batch >= 2, "rho_reference_batch",
            self.rho_reference_batch, "None or a global batch size >= 2",
        )
        _check(
            self.neuclip_restart_schedule in NEUCLIP_RESTART_SCHEDULES, "neuclip_restart_schedule",
            self.neuclip_restart_schedule, f"one of {NEUCLIP_RESTART_SCHEDULES}",
        )
        _check(
            self.neuclip_restart_source in NEUCLIP_RESTART_SOURCES, "neuclip_restart_source",
            self.neuclip_restart_source, f"one of {NEUCLIP_RESTART_SOURCES}",
        )
        _check(self.neuclip_learning_rate > 0, "neuclip_learning_rate", self.neuclip_learning_rate, "> 0")
        _check(self.amorlip_hidden_factor > 0, "amorlip_hidden_factor", self.amorlip_hidden_factor, "> 0")
        _check(self.amorlip_learning_rate > 0, "amorlip_learning_rate", self.amorlip_learning_rate, "> 0")
        _check(0 <= self.amorlip_ema_decay < 1, "amorlip_ema_decay", self.amorlip_ema_decay, "a value in [0, 1)")
        _check(0 <= self.amorlip_beta_max <= 1, "amorlip_beta_max", self.amorlip_beta_max, "a value in [0, 1]")
        _check(
            self.amorlip_beta_ramp_epochs >= 0, "amorlip_beta_ramp_epochs", self.amorlip_beta_ramp_epochs, ">= 0"
        )
        _check(
            self.amorlip_positive_weight >= 0, "amorlip_positive_weight", self.amorlip_positive_weight, ">= 0"
        )
        _check(
            self.amorlip_estimate_source in AMORLIP_ESTIMATE_SOURCES, "amorlip_estimate_source",
            self.amorlip_estimate_source, f"one of {AMORLIP_ESTIMATE_SOURCES}",
        )
        _check(
            self.amorlip_grad_clip is None or self.amorlip_grad_clip > 0, "amorlip_grad_clip",
            self.amorlip_grad_clip, "None or > 0",
        )
        _check(
            self.fastclip_dataset_size is None or self.fastclip_dataset_size >= 2, "fastclip_dataset_size",
            self.fastclip_dataset_size, "None or an integer >= 2 (the number of training samples)",
        )
        _check(
            self.fastclip_dataset_size is not None or self.train_num_samples is not None
            or self.objective != "fastclip", "fastclip_dataset_size", self.fastclip_dataset_size,
            "the number of training samples (or set train_num_samples): objective='fastclip' keeps one moving "
            "average per sample",
        )
        for name, allowed in (
            ("fastclip_gamma_schedule", FASTCLIP_GAMMA_SCHEDULES),
            ("fastclip_direction_reduction", FASTCLIP_DIRECTION_REDUCTIONS),
            ("fastclip_temperature_gradient", FASTCLIP_TEMPERATURE_GRADIENTS),
        ):
            _check(getattr(self, name) in allowed, name, getattr(self, name), f"one of {allowed}")
        _check(
            self.fastclip_id_mode in FASTCLIP_ID_MODES, "fastclip_id_mode", self.fastclip_id_mode,
            f"one of {FASTCLIP_ID_MODES}",
        )
        _check(0 < self.fastclip_gamma_min <= 1, "fastclip_gamma_min", self.fastclip_gamma_min, "a value in (0, 1]")
        _check(
            self.fastclip_gamma_decay_epochs >= 0, "fastclip_gamma_decay_epochs", self.fastclip_gamma_decay_epochs,
            ">= 0",
        )

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


__all__ = ["NeuCLIPConfig", "OBJECTIVES"]
