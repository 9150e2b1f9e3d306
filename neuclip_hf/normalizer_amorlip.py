"""AmorLIP: small per-modality MLPs amortise each anchor's partition function (docs/algorithms.md, section 2.3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import rank_and_world_size
from .normalizer_base import (
    ConfigField,
    NormalizerEstimator,
    bool_field,
    choice_field,
    int_field,
    number_field,
    register_normalizer,
    sum_parts_across_ranks,
    zero_counter,
)
from .objectives import ContrastiveBatch, NormalizerInputs, full_precision, log_eps_plus


def log_partition_sum(
    logits: torch.Tensor, positive_index: torch.Tensor, positive_weight: float
) -> torch.Tensor:
    """AmorLIP's log Z_i = log(sum_{j != i} exp(logits_ij) + c_pos * exp(logits_ii)), row-wise."""
    log_weight = math.log(positive_weight) if positive_weight > 0 else float("-inf")
    positive_logits = logits.gather(1, positive_index[:, None]) + log_weight
    return torch.logsumexp(logits.scatter(1, positive_index[:, None], positive_logits), dim=1)


def amorlip_loss(
    batch: ContrastiveBatch,
    log_partition_image: torch.Tensor,
    log_partition_text: torch.Tensor,
    positive_weight: float,
    rho: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AmorLIP's Stage II encoder loss with the partition estimates log Lambda detached.

    Per direction and anchor: -tau s_ii + sum_j w_j exp(tau s_ij - log Lambda_i) (w_i = c_pos, else 1), with
    tau = 1/T the logit scale. Its gradient equals InfoNCE's when Lambda equals the batch's partition sum. The
    sum over both directions is rescaled by sg(T) and the temperature penalty 2 rho T is added (AmorLIP writes
    it as rho_A / tau with rho_A = 2 rho).
    """
    image_to_text, text_to_image, positive = batch.similarities()
    scale = batch.logit_scale.exp()
    target = batch.positive_index
    log_z_image = log_partition_sum(scale * image_to_text, target, positive_weight)
    log_z_text = log_partition_sum(scale * text_to_image, target, positive_weight)
    term_image = -scale * positive + torch.exp(log_z_image - log_partition_image.detach().float())
    term_text = -scale * positive + torch.exp(log_z_text - log_partition_text.detach().float())
    temperature = batch.temperature
    penalty = 2 * rho * temperature
    loss = temperature.detach() * (term_image + term_text).mean() + penalty
    with torch.no_grad():  # in-batch InfoNCE with the same positive weight, for logging
        info_nce = (log_z_image + log_z_text - 2 * scale * positive).mean() / 2
    return loss, {
        "amortized": loss.detach(),
        "in_batch_info_nce": info_nce,
        "temperature_penalty": penalty.detach(),
    }


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

    Per step (the released recipe, docs/algorithms.md 2.3): targets log Z_i = log(sum_{j!=i} exp(tau s_ij) +
    c_pos exp(tau s_ii)), blended with the previous epoch's network as log(beta lambda_prev + (1 - beta) Z);
    every `amorlip_update_period` steps `amorlip_inner_steps` Adam steps on the l2-log loss; every
    `amorlip_ema_period` steps an EMA of the online networks into the target networks. At each epoch boundary the
    target networks become the previous-epoch networks and the online and target networks are re-initialised
    (with a fresh Adam state); beta follows the integer epoch. An epoch is one pass over the data (samples seen /
    `train_num_samples`, as the release), or `amorlip_epoch_steps` steps when that is set. The encoders divide by
    the blended target (`blend`) or by the target network (`target`).
    """

    objective = "amorlip"
    title = "AmorLIP"
    summary = ("Small per-modality MLPs amortise each anchor's partition function; they regress (blended) in-batch "
               "log-partition targets and the encoders divide by their estimate (Sun et al., NeurIPS 2025).")
    citation = """@inproceedings{sun2025amorlip,
  title         = {AmorLIP: Efficient Language-Image Pretraining via Amortization},
  author        = {Sun, Haotian and Li, Yitong and Zhuang, Yuchen and He, Niao and Dai, Hanjun and Dai, Bo},
  booktitle     = {Advances in Neural Information Processing Systems (NeurIPS)},
  year          = {2025},
  eprint        = {2505.18983},
  archivePrefix = {arXiv}
}"""
    config_prefix = "amorlip_"
    config_fields = {
        "hidden_factor": number_field(0.5, "f_d, hidden width of the residual MLPs as a fraction of the embedding "
                                           "size.", 0, low_open=True),
        "inner_steps": int_field(3, "T_lambda, Adam steps of the online networks per update (3 in the paper)."),
        "update_period": int_field(1, "T_online, steps between online-network updates (1 large scale, 8 medium "
                                      "scale)."),
        "learning_rate": number_field(1e-3, "Adam learning rate of the online networks (1e-3 in the paper).", 0,
                                      low_open=True),
        "ema_decay": number_field(0.92, "alpha of the EMA target networks (0.92 large scale, 0.999 medium scale).",
                                  0, 1, high_open=True),
        "ema_period": int_field(2, "T_target, steps between EMA updates (2 in the paper)."),
        "beta_max": number_field(0.8, "beta_T, final weight of the previous-epoch network in the blended target "
                                      "(0.8).", 0, 1),
        "beta_ramp_epochs": number_field(16, "Epochs over which beta ramps from 0 to beta_T by a cosine (16 in the "
                                             "release).", 0),
        "epoch_steps": ConfigField(
            None, "Length of an AmorLIP epoch in steps, overriding the true epoch: the previous-epoch snapshot, the "
                  "re-initialisation and the beta ramp follow its boundaries. None (default): one pass over the "
                  "data, `train_num_samples / global batch` steps, as the release.",
            lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "None or an integer >= 1"),
        "positive_weight": number_field(1.0, "c_pos, weight of the positive pair inside the partition sum (1.0 in "
                                             "the paper, 1e-3 in the released script).", 0),
        "estimate_source": choice_field("blend", "What the encoder loss divides by: `blend` (beta * previous-epoch "
                                                 "network + (1 - beta) * in-batch sum, the released recipe) or "
                                                 "`target` (the EMA target network, the paper's text).",
                                        ("blend", "target")),
        "grad_clip": number_field(1.0, "Gradient-norm clip of the online networks (1.0 in the release).", 0,
                                  low_open=True, optional=True),
        "scale_lr_by_world_size": bool_field(
            False, "Multiply the online networks' learning rate by the number of processes, as the release does "
                   "after each epoch's re-initialisation (`lambda_lr x world_size`); False: the paper's plain 1e-3."),
    }
    allows_negative_rho = True  # AmorLIP anneals rho to a negative value at the end of training
    rgcl_temperature = False  # its rescaled InfoNCE has no log(B - 1) bound; fix T instead (learn_temperature)

    def __init__(self, config):
        super().__init__(config)
        settings = self.settings(config)
        dim = int(config.projection_dim)
        hidden = max(1, int(round(settings.hidden_factor * dim)))
        self.online = _ModalityPair(dim, hidden)
        self.target = _ModalityPair(dim, hidden)
        self.previous = _ModalityPair(dim, hidden)
        for frozen in (self.target, self.previous):
            frozen.requires_grad_(False)
        self.inner_steps = settings.inner_steps
        self.update_period = settings.update_period
        self.learning_rate = float(settings.learning_rate)
        self.ema_decay = float(settings.ema_decay)
        self.ema_period = settings.ema_period
        self.beta_max = float(settings.beta_max)
        self.beta_ramp_epochs = float(settings.beta_ramp_epochs)
        self.epoch_steps = settings.epoch_steps
        self.positive_weight = float(settings.positive_weight)
        self.estimate_source = settings.estimate_source
        self.grad_clip = settings.grad_clip
        self.scale_lr_by_world_size = bool(settings.scale_lr_by_world_size)
        self.register_buffer("num_updates", zero_counter())
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
            # A sharded update fits this rank's anchors only (their targets need its L x B block of similarities);
            # the fit is a mean over the global batch, so the ranks' gradient parts are summed before each step.
            diagnostics = {"beta": self.beta.clone()}
            if step % self.update_period == 0:
                rows = inputs.update_rows
                target_image, target_text = self._log_targets(inputs, rows)
                image, text = inputs.image[rows], inputs.text[rows]
                params = self.estimator_parameters()
                with self.rollback_if_nonfinite(params, diagnostics):
                    for _ in range(self.inner_steps):
                        with torch.enable_grad():
                            # l2-log objective: mean over the B anchors of (log lambda(e) - log Z)^2, both modalities.
                            fit = (F.mse_loss(self.online.image(image), target_image, reduction="sum")
                                   + F.mse_loss(self.online.text(text), target_text, reduction="sum")) / batch
                        *gradients, fit = sum_parts_across_ranks(inputs, [*torch.autograd.grad(fit, params), fit])
                        self._apply_gradients(params, gradients, self.grad_clip)
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


__all__ = ["AmortizedNormalizer", "ResidualMLP", "amorlip_loss", "log_partition_sum"]
