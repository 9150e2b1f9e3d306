"""NeuCLIP: a compact prototype network predicts each anchor's log-normalizer (docs/algorithms.md, section 2.2)."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .normalizer_base import (
    NormalizerEstimator,
    bool_field,
    choice_field,
    int_field,
    number_field,
    register_normalizer,
    tile_rows,
    zero_counter,
)
from .objectives import NormalizerInputs, full_precision, log_eps_plus


@register_normalizer
class PrototypeNormalizer(NormalizerEstimator):
    """NeuCLIP's normalizer prediction network: m prototypes per direction.

        alpha1(i) = log(eps + mean_k exp((cos(e1_i, W1_k) - s_ii) / T))      W1 in text space (image anchors)
        alpha2(i) = log(eps + mean_k exp((cos(e2_i, W2_k) - s_ii) / T))      W2 in image space (text anchors)

    Each update: (restart) re-seed W1 with text and W2 with image embeddings and reset AdaGrad; then T_u AdaGrad
    steps on the unified objective in W with features and T detached:

        L(W) = mean_i [exp(-alpha1_i) (eps + ghat1_i) + alpha1_i + exp(-alpha2_i) (eps + ghat2_i) + alpha2_i]

    whose minimiser over a free alpha_i is log(eps + g_i), so W learns the dataset-wide normalizer across batches.

    Restart source when the global batch B is smaller than m: `bank` keeps a FIFO of the last m gathered
    embeddings per modality, so restarts seed m distinct prototypes (the bank is cycled while it holds fewer
    than m, at the very start). `batch` uses the current batch only, cycled to m rows: identical prototypes get
    identical gradients and stay identical, so its capacity is then only B.
    """

    objective = "neuclip"
    title = "NeuCLIP"
    summary = ("The per-anchor log-normalizer of the global contrastive loss is rewritten by convex conjugation as a "
               "minimisation over a log-normalizer variable, which a compact prototype network predicts; network and "
               "encoders are optimised alternately (Wei, Lin and Yang, ICLR 2026).")
    citation = """@inproceedings{wei2026neuclip,
  title         = {NeuCLIP: Efficient Large-Scale CLIP Training with Neural Normalizer Optimization},
  author        = {Wei, Xiyuan and Lin, Chih-Jen and Yang, Tianbao},
  booktitle     = {International Conference on Learning Representations (ICLR)},
  year          = {2026},
  eprint        = {2511.08417},
  archivePrefix = {arXiv}
}"""
    config_prefix = "neuclip_"
    config_fields = {
        "num_prototypes": int_field(4096, "m, prototypes per direction (4096 in the paper)."),
        "inner_steps": int_field(10, "T_u, AdaGrad steps on the prototypes per training step (10 in the paper)."),
        "restart_period": int_field(500, "T_r, steps between restarts that re-seed the prototypes (500 in the "
                                         "paper)."),
        "restart_schedule": choice_field(
            "constant", "`constant` restarts every T_r steps; `doubling` restarts after "
                        "`neuclip_restart_initial_period` steps and doubles the gap until it reaches T_r (early "
                        "restarts keep the prototypes fresh while a randomly initialised encoder moves fast).",
            ("constant", "doubling")),
        "restart_initial_period": int_field(25, "First gap of the `doubling` schedule."),
        "restart_source": choice_field(
            "bank", "Where restarts take their embeddings: `bank` (a FIFO of the last m gathered embeddings of each "
                    "modality, so m distinct prototypes even when the global batch is smaller than m) or `batch` "
                    "(the current global batch only, as in the paper; repeated cyclically when it is smaller than "
                    "m).", ("bank", "batch")),
        "learning_rate": number_field(0.05, "AdaGrad learning rate of the prototypes (not published; tuned in "
                                            "`benchmarks/`).", 0, low_open=True),
        "reset_optimizer_on_restart": bool_field(True, "Reset the AdaGrad accumulators when the prototypes are "
                                                       "re-seeded."),
        "shard_update": bool_field(
            True, "Across several processes, split each inner step's sum over anchors between the ranks and add the "
                  "parts with one all-reduce of 2 m d floats (True), or run it on the whole global batch on every rank "
                  "without communication (False: cheaper where the all-reduce is slow against the B m d GEMMs, e.g. "
                  "small per-GPU batches across nodes; docs/scale.md). Both give the single-process result."),
    }
    count_diagnostics = ("nonfinite", "restart")

    def __init__(self, config):
        super().__init__(config)
        settings = self.settings(config)
        m, dim = int(settings.num_prototypes), int(config.projection_dim)
        self.num_prototypes = m
        self.inner_steps = settings.inner_steps
        self.restart_period = settings.restart_period
        self.restart_schedule = settings.restart_schedule
        self.restart_initial_period = settings.restart_initial_period
        self.restart_source = settings.restart_source
        self.learning_rate = float(settings.learning_rate)
        self.reset_optimizer_on_restart = settings.reset_optimizer_on_restart
        self.shard_update = bool(settings.shard_update)
        self.text_prototypes = nn.Parameter(torch.empty(m, dim))  # W1: stand in for the texts of image anchors
        self.image_prototypes = nn.Parameter(torch.empty(m, dim))  # W2: stand in for the images of text anchors
        self.register_buffer("num_updates", zero_counter())
        self.register_buffer("num_restarts", zero_counter())
        if self.restart_source == "bank":
            self.register_buffer("text_bank", torch.zeros(m, dim))
            self.register_buffer("image_bank", torch.zeros(m, dim))
            self.register_buffer("bank_count", zero_counter())
            self.register_buffer("bank_position", zero_counter())

    def reset_parameters(self):
        nn.init.normal_(self.text_prototypes)
        nn.init.normal_(self.image_prototypes)

    def default_learning_rate(self):
        return self.learning_rate

    def _make_optimizer(self, params, lr):
        # The fused kernel updates W, its gradient and AdaGrad's state in one pass over the m x d tensors (the
        # default single-tensor loop makes four); T_u such steps per training step do not depend on the batch.
        fused = params[0].device.type in ("cpu", "cuda")
        return torch.optim.Adagrad(params, lr=lr, fused=fused)

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

        Both are sums over anchors: under a sharded update (several ranks) each rank adds its own anchors' terms and
        one all-reduce of the (2 m d + 1)-float buffer sums them, so every rank gets the whole batch's gradient.
        Work that does not grow with the batch is kept to one read of W (its row norms) and two passes to form the
        gradient: no normalised copy of W and no m x d radial projection (both are done on the (L, m) block).
        """
        rows = inputs.update_rows
        batch, temperature, positive = inputs.batch_size, inputs.temperature, inputs.positive[rows]
        m, dim = self.text_prototypes.shape
        # The objective's value and both gradients in one buffer, so a sharded update needs a single all-reduce.
        flat = self.text_prototypes.new_empty(2 * m * dim + 1)
        gradients = list(flat[:-1].view(2, m, dim).unbind(0))
        value = flat[-1]
        value.zero_()
        for (anchors, prototypes, log_g), gradient in zip(
            ((inputs.image[rows], self.text_prototypes, inputs.log_g_image[rows]),
             (inputs.text[rows], self.image_prototypes, inputs.log_g_text[rows])),
            gradients,
        ):
            inverse_norm = 1 / torch.linalg.vector_norm(prototypes, dim=-1).clamp_min(1e-12)  # 1/|W_k|, as F.normalize
            # (L, m) blocks are updated in place where they are not needed again: at large L their allocation costs
            # as much as the arithmetic.
            cosine = torch.mm(anchors, prototypes.T).mul_(inverse_norm)  # cos(e_i, W_k), W never normalised
            z = (cosine - positive[:, None]).div_(temperature)
            # One exp over the (L, m) scores serves both logsumexp_k z_ik and softmax_k(z_i).
            z_max = z.amax(dim=1, keepdim=True)
            shifted = z.sub_(z_max).exp_()
            total = shifted.sum(dim=1)
            log_mean = z_max.squeeze(1) + torch.log(total) - math.log(self.num_prototypes)  # S_i
            alpha = log_eps_plus(log_mean, self.eps)
            ratio = torch.exp(log_g - alpha)  # exp(-alpha) (eps + ghat)
            value += (ratio + alpha).sum() / batch  # this rank's part of the mean over the global batch
            coefficient = (1 - ratio) * torch.exp(log_mean - alpha) / (batch * temperature)  # dL/dz, up to softmax
            grad_cosine = shifted.mul_((coefficient / total)[:, None])  # softmax_k(z_i) * coefficient_i, (L, m)
            # dL/dW_k = (g_k - (g_k . u_k) u_k) / |W_k| with g_k = sum_i dL/dcos_ik e_i and u_k = W_k / |W_k|. The
            # radial part g_k . u_k = sum_i dL/dcos_ik cos_ik comes from the (L, m) block, so
            # dL/dW_k = sum_i (dL/dcos_ik / |W_k|) e_i - (g_k . u_k) / |W_k|^2 W_k: one scaled copy of W, one GEMM.
            radial = cosine.mul_(grad_cosine).sum(dim=0).mul_(inverse_norm.square())
            torch.mul(prototypes, -radial[:, None], out=gradient)
            torch.addmm(gradient, grad_cosine.mul_(inverse_norm).T, anchors, out=gradient)  # += (m, L) @ (L, d)
        inputs.sum_across_ranks_(flat)
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
        self.text_prototypes.copy_(tile_rows(text, m))
        self.image_prototypes.copy_(tile_rows(image, m))
        if self.reset_optimizer_on_restart:
            self.reset_optimizer_state()
        self.num_restarts += 1

    @torch.no_grad()
    def update(self, inputs):
        if inputs.sharded and not self.shard_update:
            inputs = dataclasses.replace(inputs, sharded=False)  # every rank runs the whole batch
        with full_precision(inputs.image.device):
            step = int(self.num_updates)
            if self.restart_source == "bank":
                self._push_bank(inputs)
            restarted = self.is_restart_step(step)
            if restarted:
                self.restart(inputs)
            params = [self.text_prototypes, self.image_prototypes]
            diagnostics = {"restart": torch.tensor(float(restarted))}
            first = last = None
            with self.rollback_if_nonfinite(params, diagnostics):
                for _ in range(self.inner_steps):
                    value, gradients = self.objective_and_gradients(inputs)
                    self._apply_gradients(params, gradients)
                    first = value if first is None else first
                    last = value
            diagnostics.update(objective_first=first, objective_last=last)
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


__all__ = ["PrototypeNormalizer"]
