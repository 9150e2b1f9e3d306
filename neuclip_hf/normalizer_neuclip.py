"""NeuCLIP: a compact prototype network predicts each anchor's log-normalizer (docs/algorithms.md, section 2.2)."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adagrad import adagrad

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
from .distributed import all_reduce_max_, all_reduce_sum_, gather_no_grad, rank_and_world_size, row_blocks
from .objectives import NormalizerInputs, full_precision, log_eps_plus


class _Scores(NamedTuple):
    """One direction's block of prototype scores (`PrototypeNormalizer._scores`)."""

    shifted: torch.Tensor  # (L, m_r) exp(z_ik - z_max_i)
    z_max: torch.Tensor  # (L,) max_k z_ik over these rows
    log_total: torch.Tensor  # (L,) log sum_k exp(z_ik) over these rows
    inverse_norm: torch.Tensor  # (m_r,) 1 / |W_k|
    cosine: torch.Tensor | None  # (L, m_r) cos(e_i, W_k) when the block is small (`radial_from_block`), else None


def radial_from_block(anchors: int, dim: int) -> bool:
    """Whether an inner step on L = `anchors` rows takes the gradient's radial part from the (L, m_r) block of cosines
    rather than from the (m_r, d) gradient. Counted in element transfers per direction: the block way costs about 14
    more per block entry (L m_r) and 6 fewer per prototype entry (m_r d), so it is cheaper while 14 L <= 6 d
    (small per-rank batches, e.g. the anchor split); the CPU timings in docs/scale.md agree (crossover 64-512 at d=512).
    """
    return 14 * anchors <= 6 * dim


# Below this temperature the fixed shift (1 - s_ii) / T of `log_sum_over_ranks` could underflow float64 (e^-745).
FIXED_SHIFT_MIN_TEMPERATURE = 2 / 700


@torch.no_grad()
def log_sum_over_ranks(
    log_totals: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor, fixed_shift: bool | None = None
) -> torch.Tensor:
    """log sum over all ranks of exp(log_totals): each rank's log-sums over its own prototype rows added up with one
    all-reduce (identity in one process).

    z_ik = (cos_ik - s_ii) / T <= (1 - s_ii) / T = c_i for unit anchors, so each rank's exp(log_total_i - c_i) lies
    in [e^{-2/T}, m] (0 for an empty block) and the parts are added in float64 with this fixed shift, without first
    agreeing on a maximum; below `FIXED_SHIFT_MIN_TEMPERATURE` the shift is the ranks' maximum instead (one more
    all-reduce of 2 B floats).

    Args:
        log_totals: (2, B) log sum_k exp(z_ik) of this rank's rows, per direction.
        positive: (B,) s_ii.
        temperature: scalar T.
        fixed_shift: Whether T >= `FIXED_SHIFT_MIN_TEMPERATURE` (None: read T, a device sync; every rank must take
            the same branch, as T is the same on all).
    """
    if fixed_shift is None:
        fixed_shift = float(temperature) >= FIXED_SHIFT_MIN_TEMPERATURE
    if fixed_shift:
        shift = ((1 - positive) / temperature).double().expand_as(log_totals)
    else:
        shift = all_reduce_max_(log_totals.clone()).double()
    parts = all_reduce_sum_(torch.exp(log_totals.double() - shift))
    return (torch.log(parts) + shift).to(log_totals.dtype)


class RowBlockAdagrad(torch.optim.Adagrad):
    """`torch.optim.Adagrad` that, while `rows` is set, steps only those rows (a slice of dim 0) of every parameter
    and of its accumulator, reading only those rows of the gradients: NeuCLIP's prototype-split update, where each
    rank owns a block of W's rows. With `rows` None it steps the whole tensors, as torch's AdaGrad.

    Both go through torch's functional `adagrad` here rather than `super().step()`: torch wraps each optimizer
    class's `step` with the step hooks, so calling the parent's wrapped `step` would fire every hook twice.
    """

    rows: slice | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = self.rows if self.rows is not None else slice(None)
        for group in self.param_groups:
            params, grads, sums, steps = [], [], [], []
            self._init_group(group, params, grads, sums, steps)  # torch's own (lazy) state creation
            adagrad([p[rows] for p in params], [g[rows] for g in grads], [s[rows] for s in sums], steps,
                    fused=group["fused"], foreach=group["foreach"], lr=group["lr"],
                    weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
                    maximize=group["maximize"])
        return loss


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
        "update_sharding": choice_field(
            "prototypes", "How several processes split the T_u inner steps (docs/scale.md; all three give the "
                          "single-process result): `prototypes` (each rank owns m / W rows of W1 and W2, scores the "
                          "whole batch against them and steps them; per inner step one all-reduce of 2 B per-anchor "
                          "sums, per update one all-gather of the rows and their AdaGrad sums), `anchors` (each rank "
                          "takes its own anchors against all m prototypes; per inner step one all-reduce of the 2 m d "
                          "gradient) or `replicated` (every rank runs the whole update, no communication).",
            ("prototypes", "anchors", "replicated")),
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
        self.update_sharding = settings.update_sharding
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
        return RowBlockAdagrad(params, lr=lr, fused=fused)

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
    def objective_and_gradients(
        self, inputs: NormalizerInputs, prototype_rows: slice | None = None, fixed_shift: bool | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`objective_value` and its gradient in (W1, W2), in closed form: two matrix products per direction and
        no autograd graph, which matters for T_u inner steps per training step (tested against autograd).

        With z_ik = (cos(e_i, W_k) - s_ii) / T, S_i = logsumexp_k z_ik - log m and alpha_i = log(eps + e^{S_i}):
        dL/dalpha_i = (1 - e^{log(eps + ghat_i) - alpha_i}) / B, dalpha_i/dS_i = e^{S_i - alpha_i},
        dS_i/dz_ik = softmax_k(z_i)_k and dz_ik/dcos_ik = 1/T.

        Two ways to split it over ranks, both exact: by anchors (`inputs.sharded`, `update_rows`: each rank adds its
        anchors' terms of the value and gradient, summed by one all-reduce of 2 m d + 1 floats), or by prototypes
        (`prototype_rows`, this rank's block of W's rows: each rank scores every anchor against its rows, the 2 B
        partial sums over k of S_i are added by one all-reduce, and the gradient of its own rows follows).

        Args:
            inputs: The batch statistics.
            prototype_rows: This rank's rows of W1 and W2 under the prototype split (None: all of them).
            fixed_shift: Passed to `log_sum_over_ranks` (decided once per update, not per inner step).

        Returns:
            The objective's value (the whole batch's) and the gradients of the rows `prototype_rows` of W1 and W2.
        """
        split_prototypes = prototype_rows is not None
        anchor_rows = slice(0, inputs.batch_size) if split_prototypes else inputs.update_rows
        prototype_rows = prototype_rows if split_prototypes else slice(0, self.num_prototypes)
        batch, temperature = inputs.batch_size, inputs.temperature
        positive = inputs.positive[anchor_rows]
        directions = (
            (inputs.image[anchor_rows], self.text_prototypes[prototype_rows], inputs.log_g_image[anchor_rows]),
            (inputs.text[anchor_rows], self.image_prototypes[prototype_rows], inputs.log_g_text[anchor_rows]),
        )
        scores = [self._scores(anchors, prototypes, positive, temperature) for anchors, prototypes, _ in directions]
        # log sum_k exp(z_ik) over these rows, per direction: (2, rows) stacked for one collective.
        log_totals = torch.stack([score.log_total for score in scores])
        if split_prototypes:
            log_totals = log_sum_over_ranks(log_totals, positive, temperature, fixed_shift)
        # The value and both gradients in one buffer, so the anchor split needs a single all-reduce.
        rows, dim = self.text_prototypes[prototype_rows].shape
        flat = self.text_prototypes.new_empty(2 * rows * dim + 1)
        gradients = list(flat[:-1].view(2, rows, dim).unbind(0))
        value = flat[-1]
        value.zero_()
        for (anchors, prototypes, log_g), score, log_total, gradient in zip(directions, scores, log_totals, gradients):
            log_mean = log_total - math.log(self.num_prototypes)  # S_i
            alpha = log_eps_plus(log_mean, self.eps)
            ratio = torch.exp(log_g - alpha)  # exp(-alpha) (eps + ghat)
            value += (ratio + alpha).sum() / batch  # (this rank's part of) the mean over the global batch
            coefficient = (1 - ratio) * torch.exp(log_mean - alpha) / (batch * temperature)  # dL/dcos, up to softmax
            # softmax_k(z_i) = shifted_ik exp(z_max_i - log_total_i), so dL/dcos_ik = shifted_ik weight_i.
            weight = coefficient * torch.exp(score.z_max - log_total)
            # dL/dW_k = (g_k - (g_k . u_k) u_k) / |W_k| with g_k = sum_i dL/dcos_ik e_i and u_k = W_k / |W_k|.
            if score.cosine is not None:
                # A small block: the radial part g_k . u_k = sum_i dL/dcos_ik cos_ik from the kept cosines, so
                # dL/dW_k = sum_i (dL/dcos_ik / |W_k|) e_i - (g_k . u_k) / |W_k|^2 W_k: one scaled copy of W, one GEMM.
                grad_cosine = score.shifted.mul_(weight[:, None])
                radial = score.cosine.mul_(grad_cosine).sum(dim=0).mul_(score.inverse_norm.square())
                torch.mul(prototypes, -radial[:, None], out=gradient)
                torch.addmm(gradient, grad_cosine.mul_(score.inverse_norm).T, anchors, out=gradient)  # (m, L) @ (L, d)
                continue
            # A large block: g_k by one (m_r, L) @ (L, d) GEMM, the row weights applied to whichever of the (L, d)
            # anchors and the (L, m_r) block is smaller, and the radial part g_k . u_k as a row-wise dot product of
            # two (m_r, d) tensors, with no further pass over the block.
            if anchors.shape[1] <= score.shifted.shape[1]:
                torch.mm(score.shifted.T, anchors * weight[:, None], out=gradient)
            else:
                torch.mm(score.shifted.mul_(weight[:, None]).T, anchors, out=gradient)
            radial = torch.linalg.vecdot(gradient, prototypes).mul_(score.inverse_norm.square())  # (g_k . u_k) / |W_k|
            gradient.addcmul_(prototypes, radial[:, None], value=-1).mul_(score.inverse_norm[:, None])
        if not split_prototypes:
            inputs.sum_across_ranks_(flat)
        return value, gradients

    @staticmethod
    def _scores(
        anchors: torch.Tensor, prototypes: torch.Tensor, positive: torch.Tensor, temperature: torch.Tensor
    ) -> "_Scores":
        """The (L, m_r) block of one direction: exp(z - z_max) and log sum_k exp(z_ik) over these rows, and the
        cosines themselves when the block is small (`radial_from_block`).

        A large block (B x m_r under the prototype split) is the update's largest tensor, so it is made by one GEMM
        and then touched by as few element-wise passes as eager torch allows: the max, the shift, the exp and the row
        sum here, and the gradient GEMM's read (the row norms, T and s_ii are folded into the GEMM's operands). A small
        one takes the passes instead of the (m_r, d) prototypes: its cosines give the gradient's radial part.
        """
        inverse_norm = 1 / torch.linalg.vector_norm(prototypes, dim=-1).clamp_min(1e-12)  # 1/|W_k|, as F.normalize
        if radial_from_block(anchors.shape[0], anchors.shape[1]):
            cosine = torch.mm(anchors, prototypes.T).mul_(inverse_norm)  # cos(e_i, W_k), W never normalised
            z = (cosine - positive[:, None]).div_(temperature)
        else:
            # z_ik = (cos(e_i, W_k) - s_ii) / T = e_i . (W_k / (|W_k| T)) - s_ii / T: the scaling is applied to the
            # (m_r, d) prototypes and the (L, 1) bias, not to the block.
            cosine = None
            scaled = prototypes * (inverse_norm / temperature)[:, None]
            z = torch.addmm((-positive / temperature)[:, None], anchors, scaled.T)
        # One exp over the scores serves both logsumexp_k z_ik and softmax_k(z_i).
        # An empty block (fewer prototypes than ranks) adds exp(-inf) = 0 to every sum.
        z_max = z.amax(dim=1) if z.shape[1] else z.new_full(z.shape[:1], -math.inf)
        shifted = z.sub_(z_max[:, None]).exp_()
        log_total = z_max + torch.log(shifted.sum(dim=1))
        return _Scores(shifted, z_max, log_total, inverse_norm, cosine)

    def _own_prototype_rows(self, inputs: NormalizerInputs) -> slice | None:
        """This rank's block of prototype rows under the prototype split, or None when the update is not split so."""
        if not inputs.sharded or self.update_sharding != "prototypes":
            return None
        rank, world_size = rank_and_world_size()
        return row_blocks(self.num_prototypes, world_size)[rank]

    @contextmanager
    def _stepping_rows(self, rows: slice | None) -> Iterator[list[torch.Tensor] | None]:
        """Inside, with `rows` set (this rank's block under the prototype split), the optimizer steps only those rows
        of W1, W2 and their accumulators; yields the whole-shaped gradient tensors that torch requires as `.grad`
        (made once per update; only their block rows are ever written or read), or None when `rows` is None."""
        if rows is None:
            yield None
            return
        self.optimizer.rows = rows
        try:
            yield [torch.zeros_like(self.text_prototypes), torch.zeros_like(self.image_prototypes)]
        finally:
            self.optimizer.rows = None

    @torch.no_grad()
    def _gather_rows(self, own: slice) -> None:
        """After a prototype-split update: every rank gets all rows of W1, W2 and their AdaGrad sums (one all-gather
        of each rank's block `own`), so estimates, checkpoints and the next restart see the same state everywhere."""
        params = [self.text_prototypes, self.image_prototypes]
        tensors = [*params, *(self.optimizer.state[p]["sum"] for p in params)]
        gathered = gather_no_grad(torch.cat([tensor.data[own] for tensor in tensors], dim=1))  # (m, 4 d) in rank order
        for tensor, block in zip(tensors, gathered.chunk(len(tensors), dim=1)):
            tensor.data.copy_(block)

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
        if inputs.sharded and self.update_sharding == "replicated":
            inputs = dataclasses.replace(inputs, sharded=False)  # every rank runs the whole batch
        with full_precision(inputs.image.device):
            step = int(self.num_updates)
            if self.restart_source == "bank":
                self._push_bank(inputs)
            restarted = self.is_restart_step(step)
            if restarted:
                self.restart(inputs)
            params = [self.text_prototypes, self.image_prototypes]
            own_rows = self._own_prototype_rows(inputs)
            fixed_shift = float(inputs.temperature) >= FIXED_SHIFT_MIN_TEMPERATURE if own_rows is not None else None
            diagnostics = {"restart": torch.tensor(float(restarted))}
            first = last = None
            with self.rollback_if_nonfinite(params, diagnostics), self._stepping_rows(own_rows) as whole_gradients:
                for _ in range(self.inner_steps):
                    value, gradients = self.objective_and_gradients(inputs, own_rows, fixed_shift)
                    if whole_gradients is not None:  # this rank's rows, in the .grad tensors of the whole W1, W2
                        for whole, block in zip(whole_gradients, gradients):
                            whole[own_rows].copy_(block)
                        gradients = whole_gradients
                    self._apply_gradients(params, gradients)
                    first = value if first is None else first
                    last = value
                if own_rows is not None:
                    self._gather_rows(own_rows)
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
