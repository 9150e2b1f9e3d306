"""The math of the objectives: the conjugate identity, the unified objective against RGCL-g, and CLIP parity."""

import math

import pytest
import torch
from helpers import tiny_batch, tiny_config, unit_vectors
from transformers import CLIPModel

from neuclip_hf import NeuCLIPModel
from neuclip_hf.normalizer_amorlip import amorlip_loss, log_partition_sum
from neuclip_hf.normalizer_clip import clip_loss
from neuclip_hf.normalizer_fastclip import fastclip_loss
from neuclip_hf.normalizer_siglip import siglip_loss
from neuclip_hf.objectives import (
    ContrastiveBatch,
    batch_aware_rho,
    NormalizerInputs,
    global_contrastive_loss,
    log_mean_exp_negatives,
    unified_loss,
)

EPS = 1e-6


def make_batch(n=12, dim=8, temperature=0.1, seed=0, requires_grad=True):
    image = unit_vectors(n, dim, seed).requires_grad_(requires_grad)
    text = unit_vectors(n, dim, seed + 1).requires_grad_(requires_grad)
    logit_scale = torch.tensor(math.log(1 / temperature), requires_grad=requires_grad)
    return ContrastiveBatch.gather(image, text, logit_scale), (image, text, logit_scale)


def brute_force_log_g(image, text, temperature, eps):
    """log(eps + mean_{j != i} exp((s_ij - s_ii) / T)) with Python loops, both directions."""
    n = image.shape[0]
    out_image, out_text = [], []
    for i in range(n):
        s_ii = float(image[i] @ text[i])
        neg_i = [math.exp((float(image[i] @ text[j]) - s_ii) / temperature) for j in range(n) if j != i]
        neg_t = [math.exp((float(text[i] @ image[j]) - s_ii) / temperature) for j in range(n) if j != i]
        out_image.append(math.log(eps + sum(neg_i) / (n - 1)))
        out_text.append(math.log(eps + sum(neg_t) / (n - 1)))
    return torch.tensor(out_image, dtype=torch.float64), torch.tensor(out_text, dtype=torch.float64)


def test_conjugate_identity_minimum_is_log():
    """log y = min_a exp(-a) y + a - 1, attained at a = log y; every other a gives more."""
    y = torch.tensor([1e-6, 1e-3, 0.5, 1.0, 7.0, 1e4], dtype=torch.float64)
    a_star = torch.log(y)
    value_at_star = torch.exp(-a_star) * y + a_star - 1
    torch.testing.assert_close(value_at_star, torch.log(y))
    # A dense grid around the minimiser never goes below it.
    grid = a_star[:, None] + torch.linspace(-5, 5, 2001, dtype=torch.float64)[None, :]
    values = torch.exp(-grid) * y[:, None] + grid - 1
    assert torch.all(values >= torch.log(y)[:, None] - 1e-12)
    torch.testing.assert_close(values.min(dim=1).values, torch.log(y), atol=1e-5, rtol=0)
    # And the derivative -exp(-a) y + 1 vanishes exactly there.
    torch.testing.assert_close(-torch.exp(-a_star) * y + 1, torch.zeros_like(y))


def test_normalizer_inputs_match_brute_force():
    batch, (image, text, _) = make_batch(n=9, dim=6, temperature=0.05)
    inputs = NormalizerInputs.from_batch(batch, EPS)
    ref_image, ref_text = brute_force_log_g(image.detach().double(), text.detach().double(), 0.05, EPS)
    torch.testing.assert_close(inputs.log_g_image.double(), ref_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs.log_g_text.double(), ref_text, atol=1e-5, rtol=1e-5)


def test_unified_objective_equals_rgcl_at_optimum_and_bounds_it():
    batch, _ = make_batch(temperature=0.07)
    inputs = NormalizerInputs.from_batch(batch, EPS)
    rho = 6.5
    rgcl = global_contrastive_loss(batch, EPS, rho)
    unified, parts = unified_loss(batch, inputs.log_g_image, inputs.log_g_text, EPS, rho)
    torch.testing.assert_close(unified, rgcl, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts["global_in_batch"], rgcl.detach(), atol=1e-6, rtol=0)
    assert abs(float(parts["unified_gap"])) < 1e-5
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        alpha_image = inputs.log_g_image + torch.randn(12, generator=generator) * 2
        alpha_text = inputs.log_g_text + torch.randn(12, generator=generator) * 2
        value, parts = unified_loss(batch, alpha_image, alpha_text, EPS, rho)
        assert float(value.detach()) >= float(rgcl.detach()) - 1e-6
        assert float(parts["unified_gap"]) >= -1e-6


def test_unified_gradient_equals_rgcl_gradient_at_optimum():
    """With alpha = log(eps + ghat) detached, the encoder and temperature gradients are RGCL-g's."""
    batch, leaves = make_batch(temperature=0.07)
    inputs = NormalizerInputs.from_batch(batch, EPS)
    unified, _ = unified_loss(batch, inputs.log_g_image, inputs.log_g_text, EPS, 2.0)
    grads_unified = torch.autograd.grad(unified, leaves)
    batch, leaves = make_batch(temperature=0.07)
    grads_rgcl = torch.autograd.grad(global_contrastive_loss(batch, EPS, 2.0), leaves)
    for a, b in zip(grads_unified, grads_rgcl):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unified_gradient_is_fastclip_weighting():
    """d/de of the unified objective is T * exp(-alpha_i) * d ghat_i / de (FastCLIP's weighted gradient)."""
    batch, (image, text, _) = make_batch(n=6, dim=4, temperature=0.2)
    alpha_image = torch.linspace(-1, 1, 6)
    alpha_text = torch.linspace(1, -1, 6)
    loss, _ = unified_loss(batch, alpha_image, alpha_text, EPS, 0.0)
    grad_image = torch.autograd.grad(loss, image)[0]

    def ghat(image_, text_, transpose):
        sim = image_ @ text_.T
        if transpose:
            sim = sim.T
        diff = (sim - sim.diagonal()[:, None]) / 0.2
        mask = ~torch.eye(6, dtype=torch.bool)
        return (torch.exp(diff) * mask).sum(1) / 5

    image2 = image.detach().clone().requires_grad_(True)
    weighted = 0.2 * (
        (torch.exp(-alpha_image) * ghat(image2, text.detach(), False)).mean()
        + (torch.exp(-alpha_text) * ghat(image2, text.detach(), True)).mean()
    )
    torch.testing.assert_close(grad_image, torch.autograd.grad(weighted, image2)[0], atol=1e-6, rtol=1e-5)


def test_log_mean_exp_negatives_excludes_positive():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 100.0, 3.0]])
    out = log_mean_exp_negatives(logits, torch.tensor([0, 1]))
    expected = torch.log(torch.tensor([(math.e + math.e**2) / 2, (math.exp(5) + math.exp(3)) / 2]))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="at least 2"):
        log_mean_exp_negatives(torch.zeros(1, 1), torch.tensor([0]))


def test_log_partition_sum_weights_positive():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = log_partition_sum(logits, torch.tensor([1]), positive_weight=0.5)
    torch.testing.assert_close(out, torch.log(torch.tensor([math.e + 0.5 * math.e**2 + math.e**3])))
    out_zero = log_partition_sum(logits, torch.tensor([1]), positive_weight=0.0)
    torch.testing.assert_close(out_zero, torch.log(torch.tensor([math.e + math.e**3])))


def test_clip_objective_equals_hf_clip_model_loss():
    model = NeuCLIPModel(tiny_config("clip")).eval()
    reference = CLIPModel(model.config).eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("normalizer.") for k in unexpected)
    batch = tiny_batch(8)
    ours = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True)
    theirs = reference(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, atol=1e-5, rtol=1e-5)


def test_clip_loss_matches_cross_entropy_by_hand():
    batch, (image, text, logit_scale) = make_batch(n=5, dim=4, temperature=0.5)
    loss, parts = clip_loss(batch)
    logits = logit_scale.exp() * image @ text.T
    by_hand = 0
    for i in range(5):
        by_hand += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    torch.testing.assert_close(loss, by_hand / 10)
    assert set(parts) == {"contrastive", "image_to_text", "text_to_image"}


def test_siglip_loss_by_hand():
    batch, (image, text, logit_scale) = make_batch(n=4, dim=3, temperature=0.1)
    bias = torch.tensor(-2.0)
    loss, _ = siglip_loss(batch, bias)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (10 * float(image[i].detach() @ text[j].detach()) - 2.0))))
    assert abs(float(loss.detach()) - total / 4) < 1e-5


def test_amorlip_loss_has_info_nce_gradient_when_lambda_is_exact():
    """With Lambda equal to the batch partition sum (c_pos = 1), the encoder gradient is sg(T) * grad InfoNCE."""
    batch, (image, text, logit_scale) = make_batch(n=7, dim=5, temperature=0.1)
    scale = logit_scale.exp().detach()
    index = torch.arange(7)
    log_z_image = log_partition_sum(scale * image.detach() @ text.detach().T, index, 1.0)
    log_z_text = log_partition_sum(scale * text.detach() @ image.detach().T, index, 1.0)
    loss, _ = amorlip_loss(batch, log_z_image, log_z_text, 1.0, 0.0)
    grad_image = torch.autograd.grad(loss, image, retain_graph=True)[0]
    image2 = image.detach().clone().requires_grad_(True)
    logits = scale * image2 @ text.detach().T
    info_nce = torch.nn.functional.cross_entropy(logits, index) + torch.nn.functional.cross_entropy(logits.T, index)
    torch.testing.assert_close(grad_image, 0.1 * torch.autograd.grad(info_nce, image2)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", ["clip", "siglip", "fastclip", "amorlip", "neuclip"])
def test_loss_is_fp32_under_bf16_autocast(objective):
    """Loss and estimator math run in fp32 even when the encoders run under bf16 autocast."""
    model = NeuCLIPModel(tiny_config(objective))
    batch = tiny_batch(8)
    reference = NeuCLIPModel(tiny_config(objective))
    reference.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, return_loss=True, update_normalizer=True)
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    ref = reference(**batch, return_loss=True, update_normalizer=True)
    # bf16 encoders perturb the embeddings (~1e-2), the loss stays close and finite.
    assert abs(float(out.loss) - float(ref.loss)) < 0.1 * max(1.0, abs(float(ref.loss)))
    for name, tensor in model.normalizer.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name


# -- FastCLIP's named choices and the batch-aware rho ------------------------------------------------------------
def _ghat_float64(image, text, temperature, transpose):
    """ghat_i = mean_{j != i} exp((s_ij - s_ii) / T) in float64, written out (rows: anchors)."""
    sim = image @ text.T
    sim = sim.T if transpose else sim
    n = sim.shape[0]
    return torch.stack([
        sum(torch.exp((sim[i, j] - sim[i, i]) / temperature) for j in range(n) if j != i) / (n - 1) for i in range(n)
    ])


def _ghat_temperature_derivative(image, text, temperature, transpose):
    """d ghat_i / dT = mean_{j != i} exp(d_ij / T) * (-d_ij / T^2), d_ij = s_ij - s_ii, by the formula."""
    sim = (image @ text.T).double()
    sim = sim.T if transpose else sim
    n = sim.shape[0]
    out = []
    for i in range(n):
        terms = [(sim[i, j] - sim[i, i]) for j in range(n) if j != i]
        out.append(sum(math.exp(float(d) / temperature) * (-float(d) / temperature**2) for d in terms) / (n - 1))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("temperature_gradient", ["objective", "release"])
def test_fastclip_named_choices_match_float64_formulas(reduction, temperature_gradient):
    """fastclip_loss's value and its gradients in the embeddings and T against docs/algorithms.md's formulas in float64.

    objective: dL/dT = mean_i sum_dir [exp(-a)(eps + ghat) + a - 1 + T exp(-a) dghat/dT] + 2 rho (the unified
    objective); release: mean_i sum_dir [a + 2 T exp(-a) dghat/dT] + 2 rho. Embeddings, both: T exp(-a) grad ghat.
    `mean` halves everything.
    """
    n, temperature, eps, rho = 7, 0.1, 1e-6, 2.5
    batch, (image, text, logit_scale) = make_batch(n=n, dim=5, temperature=temperature, seed=3)
    generator = torch.Generator().manual_seed(0)
    inputs = NormalizerInputs.from_batch(batch, eps)  # estimates near the in-batch values, off by up to ~1
    alpha = [log_g + torch.randn(n, generator=generator) * 0.5 for log_g in (inputs.log_g_image, inputs.log_g_text)]
    loss, parts = fastclip_loss(batch, alpha[0], alpha[1], eps, rho, reduction, temperature_gradient)
    grads = torch.autograd.grad(loss, (image, text, logit_scale))

    scale = 0.5 if reduction == "mean" else 1.0
    image64 = image.detach().double().requires_grad_(True)
    text64 = text.detach().double().requires_grad_(True)
    a = [x.double() for x in alpha]
    ghats = [_ghat_float64(image64, text64, temperature, False), _ghat_float64(image64, text64, temperature, True)]
    values = sum(torch.exp(-ai) * (eps + g) + ai - 1 for ai, g in zip(a, ghats))
    expected_value = scale * (temperature * values.mean() + 2 * rho * temperature)
    encoder_part = scale * temperature * sum(torch.exp(-ai) * (eps + g) for ai, g in zip(a, ghats)).mean()
    expected_image, expected_text = torch.autograd.grad(encoder_part, (image64, text64))
    derivatives = [_ghat_temperature_derivative(image.detach(), text.detach(), temperature, t) for t in (False, True)]
    weighted = sum(torch.exp(-ai) * d for ai, d in zip(a, derivatives))
    if temperature_gradient == "objective":
        d_loss_d_t = values.detach().mean() + temperature * weighted.mean() + 2 * rho
    else:
        d_loss_d_t = sum(a).mean() + 2 * temperature * weighted.mean() + 2 * rho
    d_loss_d_t = scale * d_loss_d_t

    assert abs(float(loss.detach()) - float(expected_value)) < 1e-5 * max(1.0, abs(float(expected_value)))
    assert abs(float(parts["unified"]) - float(expected_value)) < 1e-5 * max(1.0, abs(float(expected_value)))
    torch.testing.assert_close(grads[0].double(), expected_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1].double(), expected_text, atol=1e-5, rtol=1e-4)
    # logit_scale = log(1/T): dL/dlogit_scale = dL/dT * dT/dlogit_scale = -T dL/dT.
    assert abs(float(grads[2]) - (-temperature * float(d_loss_d_t))) < 1e-4 * max(1.0, abs(float(d_loss_d_t)))


def test_release_temperature_gradient_counts_the_derivative_term_twice():
    """release - objective, in dL/dT at alpha = log(eps + ghat): exactly T sum_dir mean exp(-a) dghat/dT."""
    image = unit_vectors(9, 6, 5)  # trained-like pairs: each text near its image, negatives below the positive
    text = torch.nn.functional.normalize(image + 0.3 * unit_vectors(9, 6, 6), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.05), requires_grad=True)
    batch = ContrastiveBatch.gather(image, text, logit_scale)
    inputs = NormalizerInputs.from_batch(batch, EPS)
    grads = {}
    for choice in ("objective", "release"):
        loss, _ = fastclip_loss(batch, inputs.log_g_image, inputs.log_g_text, EPS, 1.0, "sum", choice)
        grads[choice] = -float(torch.autograd.grad(loss, logit_scale)[0]) / 0.05  # dL/dT
    image, text = batch.all_image.detach(), batch.all_text.detach()
    extra = sum(
        (_ghat_temperature_derivative(image, text, 0.05, t) / torch.exp(log_g.double())).mean()
        for t, log_g in ((False, inputs.log_g_image), (True, inputs.log_g_text))
    )
    assert float(extra) > 0  # dg/dT > 0 when negatives sit below the positive: the extra term pushes T down
    assert abs((grads["release"] - grads["objective"]) - 0.05 * float(extra)) < 1e-3 * abs(float(extra))


def test_rgcl_temperature_gradient_is_bounded_by_two_rho_minus_two_log_b():
    """dL/dT >= 2 rho - 2 log(B - 1) at any embeddings (eps -> 0), nearly tight when one negative dominates."""
    rho, eps, batch_size = 6.5, 1e-300, 12
    for seed in range(6):
        for temperature in (0.02, 0.07, 0.3):
            batch, (_, _, logit_scale) = make_batch(n=batch_size, dim=4, temperature=temperature, seed=seed)
            loss = global_contrastive_loss(batch, eps, rho)
            d_loss_d_t = -float(torch.autograd.grad(loss, logit_scale)[0]) / temperature
            assert d_loss_d_t >= 2 * rho - 2 * math.log(batch_size - 1) - 1e-4
    # Each anchor has one close negative and the rest far: the softmax over negatives has almost no entropy.
    text = torch.nn.functional.normalize(torch.eye(batch_size, 16)[:, :16] + 0.0, dim=-1)
    image = torch.nn.functional.normalize(text + 0.9 * text.roll(1, 0), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.02), requires_grad=True)
    batch = ContrastiveBatch.gather(image, text, logit_scale)
    d_loss_d_t = -float(torch.autograd.grad(global_contrastive_loss(batch, eps, rho), logit_scale)[0]) / 0.02
    assert d_loss_d_t == pytest.approx(2 * rho - 2 * math.log(batch_size - 1), abs=0.05)


def test_batch_aware_rho_value_and_where_it_applies():
    assert batch_aware_rho(6.5, 64, None) == 6.5
    assert batch_aware_rho(6.5, 1024, 1024) == 6.5
    assert batch_aware_rho(6.5, 64, 1024) == pytest.approx(6.5 - math.log(1023 / 63))  # 3.7127
    # rho - log(B - 1) is the same at B and at B_ref: the balance of the temperature is kept.
    assert batch_aware_rho(6.5, 64, 1024) - math.log(63) == pytest.approx(6.5 - math.log(1023))
    batch = tiny_batch(8)
    for objective, shifted in (("neuclip", True), ("fastclip", True), ("amorlip", False)):
        model = NeuCLIPModel(tiny_config(objective, rho=6.5, rho_reference_batch=1024))
        out = model(**batch, return_loss=True, update_normalizer=True)
        rho = 6.5 - math.log(1023 / 7) if shifted else 6.5
        expected = 2 * rho * model.temperature
        assert float(out.loss_components["temperature_penalty"]) == pytest.approx(expected, rel=1e-5), objective


def test_statistics_and_loss_share_one_set_of_similarity_blocks():
    """`from_batch` (even under no_grad) keeps the L x B blocks it forms, with autograd, for the loss: the pair costs
    the FLOPs of the loss alone, and the gradients are those of a batch that never computed statistics."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, leaves = make_batch(temperature=0.07)
    with FlopCounterMode(display=False) as both:
        with torch.no_grad():
            inputs = NormalizerInputs.from_batch(batch, EPS)
        loss, _ = unified_loss(batch, inputs.log_g_image + 0.3, inputs.log_g_text - 0.2, EPS, 2.0)
    grads = torch.autograd.grad(loss, leaves)
    fresh, fresh_leaves = make_batch(temperature=0.07)
    with FlopCounterMode(display=False) as alone:
        expected, _ = unified_loss(fresh, inputs.log_g_image + 0.3, inputs.log_g_text - 0.2, EPS, 2.0)
    assert both.get_total_flops() == alone.get_total_flops() > 0
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, fresh_leaves)):
        torch.testing.assert_close(got, want)
