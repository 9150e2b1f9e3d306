"""Normaliser estimators: one class per method, behind one small contract.

A `Normalizer` is the part of a contrastive objective that estimates (or, for SigLIP, replaces) each anchor's
log-normaliser. It lives in the model as `model.normalizer` and:

- `update(inputs)` changes its own state from the detached global batch (`NormalizerInputs`). Every rank sees the
  same gathered batch and runs the same deterministic computation, so the state stays identical on all ranks
  without communication;
- `estimate(inputs)` returns detached estimates of log(eps + g_i) for this rank's image and text anchors
  (`NormalizerEstimator` only);
- `loss(batch, inputs, rho)` is the encoder objective that uses the estimate;
- its parameters, buffers and counters are in `state_dict()`, its optimizer (owned here, because restarts and
  re-initialisations reset it) in `optimizer.state_dict()`.

Adding a method means adding one class here and decorating it with `@register_normalizer`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import configuration_neuclip
from .distributed import rank_and_world_size
from .objectives import (
    ContrastiveBatch,
    NormalizerInputs,
    amorlip_loss,
    clip_loss,
    fastclip_loss,
    full_precision,
    log_eps_plus,
    log_partition_sum,
    siglip_loss,
    unified_loss,
)

NORMALIZERS: dict[str, type["Normalizer"]] = {}


def register_normalizer(cls: type["Normalizer"]) -> type["Normalizer"]:
    """Class decorator: make `cls` available as `NeuCLIPConfig(objective=cls.objective)`."""
    NORMALIZERS[cls.objective] = cls
    if cls.objective not in configuration_neuclip.OBJECTIVES:
        configuration_neuclip.OBJECTIVES = (*configuration_neuclip.OBJECTIVES, cls.objective)
    return cls


def build_normalizer(config) -> "Normalizer":
    """The normaliser of `config.objective`."""
    if config.objective not in NORMALIZERS:
        raise ValueError(f"objective={config.objective!r} has no registered normaliser; known: {sorted(NORMALIZERS)}")
    return NORMALIZERS[config.objective](config)


def find_normalizer(model: torch.nn.Module) -> Normalizer:
    """The normaliser that the model's forward uses, through DDP and PEFT wrappers (under peft's `modules_to_save`,
    which `neuclip_hf.lora` refuses, the trained copy)."""
    found = [m for m in model.modules() if isinstance(m, Normalizer)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no normaliser: NeuCLIPTrainer trains NeuCLIPModel")
    if len(found) > 1:  # PEFT's modules_to_save keeps a frozen original next to the trained copy
        trainable = [m for m in found if any(p.requires_grad for p in m.parameters())]
        found = trainable or found
    return found[-1]


def _zero_counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.long)


def _tile_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows taken cyclically from `rows` (repeats them when there are fewer than `count`)."""
    repeats = math.ceil(count / rows.shape[0])
    return rows.repeat(repeats, 1)[:count]


class Normalizer(nn.Module):
    """Base of everything that can sit under `model.normalizer`."""

    objective: ClassVar[str]
    needs_sample_ids: ClassVar[bool] = False
    # Whether `loss`/`update` read the detached batch statistics (a B x B similarity matrix per step).
    needs_statistics: ClassVar[bool] = True
    # Initial values of the buffers that do not start at zero (counters, tables, banks and flags start at zero).
    buffer_initial_values: ClassVar[dict[str, float]] = {}
    # Whether the loss is RGCL-g-shaped in T (dL/dT >= 2 rho - 2 log(B - 1)), so `rho_reference_batch` applies.
    rgcl_temperature: ClassVar[bool] = False

    def __init__(self, config):
        super().__init__()
        self.eps = float(config.eps)
        self.train_num_samples: int | None = config.train_num_samples
        self._optimizer: torch.optim.Optimizer | None = None
        self._learning_rate: float | None = None

    def set_train_num_samples(self, n: int) -> None:
        """The training-set size (one epoch = n samples seen), for estimators with epoch-based schedules."""
        self.train_num_samples = int(n)

    def epoch_length_problem(self) -> str | None:
        """Why this estimator cannot run without knowing the epoch length (None: it can)."""
        return None

    # -- parameters and optimizer ------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """(Re-)initialise learnable state. Called by the model's weight init (guarded against loaded tensors)."""

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Give every buffer not loaded from a checkpoint its initial value. Called by the model's weight init:
        `from_pretrained` materialises the buffers a checkpoint lacks (a CLIP checkpoint has no normaliser)
        uninitialised, so counters, tables and banks would otherwise start from garbage."""
        for name, buffer in self.named_buffers():
            if not getattr(buffer, "_is_hf_initialized", False):  # set by transformers on tensors it loaded
                buffer.fill_(self.buffer_initial_values.get(name.rsplit(".", 1)[-1], 0))

    def encoder_parameter_names(self) -> set[str]:
        """Names (relative to this module) of parameters trained with the encoders rather than by `update`."""
        return set()

    def estimator_parameters(self) -> list[nn.Parameter]:
        """Parameters the normaliser's own optimizer trains in `update`."""
        encoder_side = self.encoder_parameter_names()
        return [p for n, p in self.named_parameters() if n not in encoder_side and p.requires_grad]

    def default_learning_rate(self) -> float | None:
        return None

    def scaled_learning_rate(self, lr: float) -> float:
        """The learning rate the own optimizer runs at for a requested `lr` (see AmorLIP's world-size scaling)."""
        return lr

    def _make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        raise TypeError(f"{type(self).__name__} has no optimizer")

    def build_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer | None:
        """Create the normaliser's optimizer (after the model is on its device); `lr=None` uses the config's."""
        params = self.estimator_parameters()
        if not params:
            return None
        self._learning_rate = lr if lr is not None else self.default_learning_rate()
        self._optimizer = self._make_optimizer(params, self.scaled_learning_rate(self._learning_rate))
        return self._optimizer

    def ensure_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer | None:
        """Build the optimizer if needed (keeping an existing one and its state), then apply `lr` if given."""
        if self._optimizer is None:
            return self.build_optimizer(lr)
        if lr is not None:
            self._learning_rate = lr
            for group in self._optimizer.param_groups:
                group["lr"] = self.scaled_learning_rate(lr)
        return self._optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The normaliser's optimizer, built on first use."""
        if self._optimizer is None:
            self.build_optimizer(self._learning_rate)
        return self._optimizer

    def reset_optimizer_state(self) -> None:
        """Forget accumulated optimizer statistics (torch re-creates them lazily on the next step)."""
        if self._optimizer is not None:
            self._optimizer.state.clear()

    def _optimizer_step(self, loss: torch.Tensor, params: list[nn.Parameter], clip: float | None = None) -> None:
        """One step of the own optimizer. Uses `autograd.grad`, so encoder gradients and DDP hooks are untouched."""
        self._apply_gradients(params, torch.autograd.grad(loss, params), clip)

    def _apply_gradients(
        self, params: list[nn.Parameter], gradients: list[torch.Tensor], clip: float | None = None
    ) -> None:
        """Step the own optimizer with the given gradients; `.grad` is cleared again afterwards."""
        for p, g in zip(params, gradients):
            p.grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        for p in params:
            p.grad = None

    # -- the contract ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, inputs: NormalizerInputs | None) -> dict[str, torch.Tensor]:
        """Update own state from the detached global batch; returns diagnostics (detached scalars)."""
        return {}

    def loss(
        self, batch: ContrastiveBatch, inputs: NormalizerInputs | None, rho: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder objective of this method, for this rank's local anchors."""
        raise NotImplementedError


class NormalizerEstimator(Normalizer):
    """A normaliser that estimates alpha_i ~ log(eps + g_i) for each anchor and direction."""

    rgcl_temperature = True

    def estimate(self, inputs: NormalizerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached estimates of log(eps + g1_i), log(eps + g2_i) for the anchors in `inputs.local`."""
        raise NotImplementedError

    def loss(self, batch, inputs, rho):
        """NeuCLIP's unified objective with this estimator's (detached) estimate."""
        alpha_image, alpha_text = self.estimate(inputs)
        return unified_loss(batch, alpha_image, alpha_text, self.eps, rho)


@register_normalizer
class InBatchNormalizer(NormalizerEstimator):
    """OpenCLIP / HF CLIP: the normaliser is the mini-batch itself (plain symmetric InfoNCE).

    Its estimate of log(eps + g_i) is log(eps + ghat_i) over the global batch, reported for diagnostics; the
    loss differentiates through the batch, as InfoNCE does.
    """

    objective = "clip"
    needs_statistics = False
    rgcl_temperature = False

    def estimate(self, inputs):
        return inputs.log_g_image[inputs.local], inputs.log_g_text[inputs.local]

    def loss(self, batch, inputs, rho):
        return clip_loss(batch)


@register_normalizer
class SigmoidBias(Normalizer):
    """SigLIP: no normaliser to estimate; the pairwise sigmoid loss has a learned logit bias b instead.

    b plays the role of one global log-normaliser, so it lives under `normalizer.`; it is trained with the
    encoders (it is in the encoder optimizer and in DDP's gradient averaging).
    """

    objective = "siglip"
    needs_statistics = False

    def __init__(self, config):
        super().__init__(config)
        self.bias_init = float(config.siglip_bias_init)
        self.logit_bias = nn.Parameter(torch.tensor(self.bias_init))

    def reset_parameters(self):
        nn.init.constant_(self.logit_bias, self.bias_init)

    def encoder_parameter_names(self):
        return {"logit_bias"}

    def loss(self, batch, inputs, rho):
        return siglip_loss(batch, self.logit_bias)


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
    needs_sample_ids = True
    buffer_initial_values = {"slot_ids": -1}  # -1: a free table slot (map mode)

    def __init__(self, config):
        super().__init__(config)
        n = int(config.fastclip_dataset_size or config.train_num_samples)
        self.dataset_size = n
        self.id_mode = config.fastclip_id_mode
        self.gamma_min = float(config.fastclip_gamma_min)
        self.gamma_decay_epochs = float(config.fastclip_gamma_decay_epochs)
        self.gamma_schedule = config.fastclip_gamma_schedule
        self.direction_reduction = config.fastclip_direction_reduction
        self.temperature_gradient = config.fastclip_temperature_gradient
        self.register_buffer("log_u", torch.zeros(2, n))  # row 0: image anchors, row 1: text anchors
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("num_updates", _zero_counter())
        if self.id_mode == "map":
            self.register_buffer("slot_ids", torch.full((n,), -1, dtype=torch.long))  # slot -> sample id
            self.register_buffer("num_slots", _zero_counter())
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


class ResidualMLP(nn.Module):
    """AmorLIP's amortisation network: Linear-ReLU-LayerNorm-Linear-ReLU-LayerNorm, + input, ReLU, Linear(d, 1)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def reset_parameters(self) -> None:
        for module in (self.fc1, self.norm1, self.fc2, self.norm2, self.head):
            module.reset_parameters()  # PyTorch defaults, as in the released code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(F.relu(self.fc1(x)))
        h = self.norm2(F.relu(self.fc2(h)))
        return self.head(F.relu(h + x)).squeeze(-1)


class _ModalityPair(nn.Module):
    """One network per modality."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.image = ResidualMLP(dim, hidden)
        self.text = ResidualMLP(dim, hidden)


@register_normalizer
class AmortizedNormalizer(NormalizerEstimator):
    """AmorLIP: per-modality MLPs regress log Z_i, the log partition SUM over the global batch.

    Per step (the released recipe, ALGORITHMS.md 2.3): targets log Z_i = log(sum_{j!=i} exp(tau s_ij) +
    c_pos exp(tau s_ii)), blended with the previous epoch's network as log(beta lambda_prev + (1 - beta) Z);
    every `amorlip_update_period` steps `amorlip_inner_steps` Adam steps on the l2-log loss; every
    `amorlip_ema_period` steps an EMA of the online networks into the target networks. At each epoch boundary the
    target networks become the previous-epoch networks and the online and target networks are re-initialised
    (with a fresh Adam state); beta follows the integer epoch. An epoch is one pass over the data (samples seen /
    `train_num_samples`, as the release), or `amorlip_epoch_steps` steps when that is set. The encoders divide by
    the blended target (`blend`) or by the target network (`target`).
    """

    objective = "amorlip"
    rgcl_temperature = False  # its rescaled InfoNCE has no log(B - 1) bound; fix T instead (learn_temperature)

    def __init__(self, config):
        super().__init__(config)
        dim = int(config.projection_dim)
        hidden = max(1, int(round(config.amorlip_hidden_factor * dim)))
        self.online = _ModalityPair(dim, hidden)
        self.target = _ModalityPair(dim, hidden)
        self.previous = _ModalityPair(dim, hidden)
        for frozen in (self.target, self.previous):
            frozen.requires_grad_(False)
        self.inner_steps = config.amorlip_inner_steps
        self.update_period = config.amorlip_update_period
        self.learning_rate = float(config.amorlip_learning_rate)
        self.ema_decay = float(config.amorlip_ema_decay)
        self.ema_period = config.amorlip_ema_period
        self.beta_max = float(config.amorlip_beta_max)
        self.beta_ramp_epochs = float(config.amorlip_beta_ramp_epochs)
        self.epoch_steps = config.amorlip_epoch_steps
        self.positive_weight = float(config.amorlip_positive_weight)
        self.estimate_source = config.amorlip_estimate_source
        self.grad_clip = config.amorlip_grad_clip
        self.scale_lr_by_world_size = bool(config.amorlip_scale_lr_by_world_size)
        self.register_buffer("num_updates", _zero_counter())
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self.register_buffer("beta", torch.zeros(()))  # blend weight of the current epoch

    def reset_parameters(self):
        self.online.image.reset_parameters()
        self.online.text.reset_parameters()
        self.target.load_state_dict(self.online.state_dict())
        self.previous.load_state_dict(self.online.state_dict())

    def default_learning_rate(self):
        return self.learning_rate

    def scaled_learning_rate(self, lr):
        """`lr x world size` under `amorlip_scale_lr_by_world_size` (the release's `lambda_lr x world_size`)."""
        return lr * rank_and_world_size()[1] if self.scale_lr_by_world_size else lr

    def _make_optimizer(self, params, lr):
        return torch.optim.Adam(params, lr=lr)

    def estimator_parameters(self):
        return list(self.online.parameters())

    def epoch_length_problem(self):
        if self.epoch_steps is None and self.train_num_samples is None:
            return ("objective='amorlip' re-initialises its networks every epoch and ramps beta by epoch: set "
                    "--train_num_samples (the training-set size; NeuCLIPConfig.train_num_samples) or "
                    "amorlip_epoch_steps")
        return None

    def epoch_index(self, step: int, batch_size: int) -> int:
        """The integer epoch of update `step` (0-based) at global batch `batch_size`."""
        problem = self.epoch_length_problem()
        if problem is not None:
            raise ValueError(problem)
        if self.epoch_steps is not None:
            return step // self.epoch_steps
        return step * batch_size // self.train_num_samples  # samples seen before this step // n

    def beta_at(self, epoch: int) -> float:
        """beta_t = beta_T (1 - cos(pi t / T_ramp)) / 2, held at beta_T after the ramp."""
        if self.beta_ramp_epochs <= 0:
            return self.beta_max
        progress = min(epoch / self.beta_ramp_epochs, 1.0)
        return self.beta_max * 0.5 * (1 - math.cos(math.pi * progress))

    def _start_epoch(self) -> None:
        """Snapshot the target as previous-epoch network, re-initialise online and target networks and Adam."""
        self.previous.load_state_dict(self.target.state_dict())
        self.has_previous.fill_(True)
        self.online.image.reset_parameters()
        self.online.text.reset_parameters()
        self.target.load_state_dict(self.online.state_dict())
        self.reset_optimizer_state()

    def _log_targets(self, inputs: NormalizerInputs, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Blended log partition targets for anchors `rows` (against the whole global batch)."""
        scale = 1.0 / inputs.temperature
        image, text = inputs.image[rows], inputs.text[rows]
        index = torch.arange(inputs.batch_size, device=image.device)[rows]
        log_z_image = log_partition_sum(scale * (image @ inputs.text.T), index, self.positive_weight)
        log_z_text = log_partition_sum(scale * (text @ inputs.image.T), index, self.positive_weight)
        beta = float(self.beta)
        if bool(self.has_previous) and beta > 0:
            # log(beta * lambda_prev + (1 - beta) * Z), with lambda_prev = exp(previous network's output).
            log_1m_beta = math.log1p(-beta) if beta < 1 else float("-inf")
            log_z_image = torch.logaddexp(self.previous.image(image) + math.log(beta), log_z_image + log_1m_beta)
            log_z_text = torch.logaddexp(self.previous.text(text) + math.log(beta), log_z_text + log_1m_beta)
        return log_z_image, log_z_text

    @torch.no_grad()
    def update(self, inputs):
        with full_precision(inputs.image.device):
            step, batch = int(self.num_updates), inputs.batch_size
            epoch = self.epoch_index(step, batch)
            if step > 0 and epoch > self.epoch_index(step - 1, batch):
                self._start_epoch()
            self.beta.fill_(self.beta_at(epoch))
            target_image, target_text = self._log_targets(inputs, slice(None))
            diagnostics = {"beta": self.beta.clone()}
            if step % self.update_period == 0:
                params = self.estimator_parameters()
                backup = [p.detach().clone() for p in params]
                for _ in range(self.inner_steps):
                    with torch.enable_grad():
                        # l2-log objective: mean (log lambda(e) - log Z)^2, summed over the two modalities.
                        fit = F.mse_loss(self.online.image(inputs.image), target_image) + F.mse_loss(
                            self.online.text(inputs.text), target_text
                        )
                    self._optimizer_step(fit, params, self.grad_clip)
                if not all(torch.isfinite(p).all() for p in params):  # never let a bad step poison the networks
                    for p, b in zip(params, backup):
                        p.copy_(b)
                    self.reset_optimizer_state()
                    diagnostics["nonfinite"] = torch.tensor(1.0)
                diagnostics["fit_loss"] = fit.detach()
            if step % self.ema_period == 0:
                for t, o in zip(self.target.parameters(), self.online.parameters()):
                    t.lerp_(o, 1 - self.ema_decay)  # t <- decay * t + (1 - decay) * o
                for t, o in zip(self.target.buffers(), self.online.buffers()):
                    t.copy_(o)
            self.num_updates += 1
        return diagnostics

    @torch.no_grad()
    def log_partition(self, inputs: NormalizerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoders' log Lambda for the local anchors (sum form, as AmorLIP's loss uses it)."""
        with full_precision(inputs.image.device):
            if self.estimate_source == "blend":
                return self._log_targets(inputs, inputs.local)
            return self.target.image(inputs.image[inputs.local]), self.target.text(inputs.text[inputs.local])

    @torch.no_grad()
    def estimate(self, inputs):
        """log Lambda converted to the mean form: log(eps + (Lambda exp(-tau s_ii) - c_pos) / (B - 1))."""
        log_lambda_image, log_lambda_text = self.log_partition(inputs)
        positive = inputs.positive[inputs.local] / inputs.temperature
        return (
            self._to_log_normalizer(log_lambda_image - positive, inputs.batch_size),
            self._to_log_normalizer(log_lambda_text - positive, inputs.batch_size),
        )

    def _to_log_normalizer(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """log(eps + max(exp(x) - c, 0) / (B - 1)) computed as x + log1p(-c exp(-x)) to avoid overflow."""
        c = self.positive_weight
        if c > 0:
            above = x > math.log(c) + 1e-6
            log_sum = x + torch.log1p(-c * torch.exp(-x.clamp_min(math.log(c) + 1e-6)))
            log_sum = torch.where(above, log_sum, torch.full_like(x, float("-inf")))
        else:
            log_sum = x
        return log_eps_plus(log_sum - math.log(batch_size - 1), self.eps)

    def loss(self, batch, inputs, rho):
        log_lambda_image, log_lambda_text = self.log_partition(inputs)
        return amorlip_loss(batch, log_lambda_image, log_lambda_text, self.positive_weight, rho)


@register_normalizer
class PrototypeNormalizer(NormalizerEstimator):
    """NeuCLIP's normaliser prediction network: m prototypes per direction.

        alpha1(i) = log(eps + mean_k exp((cos(e1_i, W1_k) - s_ii) / T))      W1 in text space (image anchors)
        alpha2(i) = log(eps + mean_k exp((cos(e2_i, W2_k) - s_ii) / T))      W2 in image space (text anchors)

    Each update: (restart) re-seed W1 with text and W2 with image embeddings and reset AdaGrad; then T_u AdaGrad
    steps on the unified objective in W with features and T detached:

        L(W) = mean_i [exp(-alpha1_i) (eps + ghat1_i) + alpha1_i + exp(-alpha2_i) (eps + ghat2_i) + alpha2_i]

    whose minimiser over a free alpha_i is log(eps + g_i), so W learns the dataset-wide normaliser across batches.

    Restart source when the global batch B is smaller than m: `bank` keeps a FIFO of the last m gathered
    embeddings per modality, so restarts seed m distinct prototypes (the bank is cycled while it holds fewer
    than m, at the very start). `batch` uses the current batch only, cycled to m rows: identical prototypes get
    identical gradients and stay identical, so its capacity is then only B.
    """

    objective = "neuclip"

    def __init__(self, config):
        super().__init__(config)
        m, dim = int(config.neuclip_num_prototypes), int(config.projection_dim)
        self.num_prototypes = m
        self.inner_steps = config.neuclip_inner_steps
        self.restart_period = config.neuclip_restart_period
        self.restart_schedule = config.neuclip_restart_schedule
        self.restart_initial_period = config.neuclip_restart_initial_period
        self.restart_source = config.neuclip_restart_source
        self.learning_rate = float(config.neuclip_learning_rate)
        self.reset_optimizer_on_restart = config.neuclip_reset_optimizer_on_restart
        self.text_prototypes = nn.Parameter(torch.empty(m, dim))  # W1: stand in for the texts of image anchors
        self.image_prototypes = nn.Parameter(torch.empty(m, dim))  # W2: stand in for the images of text anchors
        self.register_buffer("num_updates", _zero_counter())
        self.register_buffer("num_restarts", _zero_counter())
        if self.restart_source == "bank":
            self.register_buffer("text_bank", torch.zeros(m, dim))
            self.register_buffer("image_bank", torch.zeros(m, dim))
            self.register_buffer("bank_count", _zero_counter())
            self.register_buffer("bank_position", _zero_counter())

    def reset_parameters(self):
        nn.init.normal_(self.text_prototypes)
        nn.init.normal_(self.image_prototypes)

    def default_learning_rate(self):
        return self.learning_rate

    def _make_optimizer(self, params, lr):
        return torch.optim.Adagrad(params, lr=lr)

    def is_restart_step(self, step: int) -> bool:
        """Restart at step 0 and then every T_r steps (`constant`), or after gaps p0, 2 p0, 4 p0, ... < T_r and
        then every T_r steps (`doubling`)."""
        if self.restart_schedule == "constant":
            return step % self.restart_period == 0
        start, gap = 0, self.restart_initial_period
        while gap < self.restart_period:
            if step == start:
                return True
            if step < start:
                return False
            start, gap = start + gap, gap * 2
        return step >= start and (step - start) % self.restart_period == 0

    def alpha(
        self, anchors: torch.Tensor, prototypes: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor
    ) -> torch.Tensor:
        """log(eps + mean_k exp((cos(anchor, W_k) - s_ii) / T)) for each anchor row."""
        cosine = anchors @ F.normalize(prototypes, dim=-1).T
        log_mean = torch.logsumexp((cosine - positive[:, None]) / temperature, dim=1) - math.log(self.num_prototypes)
        return log_eps_plus(log_mean, self.eps)

    def objective_value(self, inputs: NormalizerInputs) -> torch.Tensor:
        """The unified objective in W (without the constants), averaged over the global batch (differentiable)."""
        alpha_image = self.alpha(inputs.image, self.text_prototypes, inputs.positive, inputs.temperature)
        alpha_text = self.alpha(inputs.text, self.image_prototypes, inputs.positive, inputs.temperature)
        value_image = torch.exp(inputs.log_g_image - alpha_image) + alpha_image
        value_text = torch.exp(inputs.log_g_text - alpha_text) + alpha_text
        return (value_image + value_text).mean()

    @torch.no_grad()
    def objective_and_gradients(self, inputs: NormalizerInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`objective_value` and its gradient in (W1, W2), in closed form: two matrix products per direction and
        no autograd graph, which matters for T_u inner steps per training step (tested against autograd).

        With z_ik = (cos(e_i, W_k) - s_ii) / T, S_i = logsumexp_k z_ik - log m and alpha_i = log(eps + e^{S_i}):
        dL/dalpha_i = (1 - e^{log(eps + ghat_i) - alpha_i}) / B, dalpha_i/dS_i = e^{S_i - alpha_i},
        dS_i/dz_ik = softmax_k(z_i)_k and dz_ik/dcos_ik = 1/T.
        """
        batch, temperature = inputs.batch_size, inputs.temperature
        value = torch.zeros((), device=inputs.image.device)
        gradients = []
        for anchors, prototypes, log_g in (
            (inputs.image, self.text_prototypes, inputs.log_g_image),
            (inputs.text, self.image_prototypes, inputs.log_g_text),
        ):
            norm = prototypes.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as F.normalize
            unit = prototypes / norm
            z = (anchors @ unit.T - inputs.positive[:, None]) / temperature  # (B, m)
            # One exp over the (B, m) scores serves both logsumexp_k z_ik and softmax_k(z_i).
            z_max = z.amax(dim=1, keepdim=True)
            shifted = torch.exp(z - z_max)
            total = shifted.sum(dim=1)
            log_mean = z_max.squeeze(1) + torch.log(total) - math.log(self.num_prototypes)  # S_i
            alpha = log_eps_plus(log_mean, self.eps)
            ratio = torch.exp(log_g - alpha)  # exp(-alpha) (eps + ghat)
            value = value + (ratio + alpha).mean()
            coefficient = (1 - ratio) * torch.exp(log_mean - alpha) / (batch * temperature)  # dL/dz, up to softmax
            grad_cosine = shifted * (coefficient / total)[:, None]  # softmax_k(z_i) * coefficient_i, (B, m)
            grad_unit = grad_cosine.T @ anchors  # (m, d): dL / d(W_k / |W_k|)
            # Through the normalisation: remove the radial component, divide by the norm.
            gradients.append((grad_unit - (grad_unit * unit).sum(-1, keepdim=True) * unit) / norm)
        return value, gradients

    @torch.no_grad()
    def _push_bank(self, inputs: NormalizerInputs) -> None:
        """Write the global batch into the FIFO banks (keeps the most recent m embeddings)."""
        m, batch = self.num_prototypes, inputs.batch_size
        if batch >= m:
            self.text_bank.copy_(inputs.text[-m:])
            self.image_bank.copy_(inputs.image[-m:])
            self.bank_position.zero_()
            self.bank_count.fill_(m)
            return
        slots = (torch.arange(batch, device=self.text_bank.device) + self.bank_position) % m
        self.text_bank[slots] = inputs.text
        self.image_bank[slots] = inputs.image
        self.bank_position.copy_((self.bank_position + batch) % m)
        self.bank_count.clamp_(max=m - batch).add_(batch)

    @torch.no_grad()
    def restart(self, inputs: NormalizerInputs) -> None:
        """Re-seed W1 with text and W2 with image embeddings (from the bank or the batch); reset AdaGrad."""
        m = self.num_prototypes
        if self.restart_source == "bank":
            count = int(self.bank_count)
            text, image = self.text_bank[:count], self.image_bank[:count]
        elif inputs.batch_size > m:
            # The same subset on every rank: a generator seeded by the restart count, not the global RNG.
            generator = torch.Generator().manual_seed(int(self.num_restarts))
            chosen = torch.randperm(inputs.batch_size, generator=generator)[:m].to(inputs.text.device)
            text, image = inputs.text[chosen], inputs.image[chosen]
        else:
            text, image = inputs.text, inputs.image
        self.text_prototypes.copy_(_tile_rows(text, m))
        self.image_prototypes.copy_(_tile_rows(image, m))
        if self.reset_optimizer_on_restart:
            self.reset_optimizer_state()
        self.num_restarts += 1

    @torch.no_grad()
    def update(self, inputs):
        with full_precision(inputs.image.device):
            step = int(self.num_updates)
            if self.restart_source == "bank":
                self._push_bank(inputs)
            restarted = self.is_restart_step(step)
            if restarted:
                self.restart(inputs)
            params = [self.text_prototypes, self.image_prototypes]
            backup = [p.detach().clone() for p in params]
            first = last = None
            for _ in range(self.inner_steps):
                value, gradients = self.objective_and_gradients(inputs)
                self._apply_gradients(params, gradients)
                first = value if first is None else first
                last = value
            diagnostics = {"objective_first": first, "objective_last": last, "restart": torch.tensor(float(restarted))}
            if not all(torch.isfinite(p).all() for p in params):  # never let a bad step poison the prototypes
                for p, b in zip(params, backup):
                    p.copy_(b)
                self.reset_optimizer_state()
                diagnostics["nonfinite"] = torch.tensor(1.0)
            self.num_updates += 1
        return diagnostics

    @torch.no_grad()
    def estimate(self, inputs):
        with full_precision(inputs.image.device):
            rows = inputs.local
            positive, temperature = inputs.positive[rows], inputs.temperature
            return (
                self.alpha(inputs.image[rows], self.text_prototypes, positive, temperature),
                self.alpha(inputs.text[rows], self.image_prototypes, positive, temperature),
            )
