"""Exact dataset-wide log-normalizers against a brute-force loop, estimator errors, and the live callback."""

import math

import pytest
import torch
from helpers import tiny_config, unit_vectors
from trainer_helpers import PairDataset, make_trainer

from neuclip_hf.diagnostics import (
    NormalizerDiagnosticsCallback,
    estimate_errors,
    estimates_in_training_batches,
    exact_log_normalizers,
)
from neuclip_hf.normalizers import InBatchNormalizer, build_normalizer
from neuclip_hf.objectives import NormalizerInputs

EPS = 1e-6


def brute_force(image, text, pool_image, pool_text, temperature, own=None):
    out_image, out_text = [], []
    for i in range(image.shape[0]):
        positive = float(image[i] @ text[i])
        neg_i, neg_t = [], []
        for j in range(pool_image.shape[0]):
            if own is not None and j == int(own[i]):
                continue
            neg_i.append(math.exp((float(image[i] @ pool_text[j]) - positive) / temperature))
            neg_t.append(math.exp((float(text[i] @ pool_image[j]) - positive) / temperature))
        out_image.append(math.log(EPS + sum(neg_i) / len(neg_i)))
        out_text.append(math.log(EPS + sum(neg_t) / len(neg_t)))
    return torch.tensor(out_image, dtype=torch.float64), torch.tensor(out_text, dtype=torch.float64)


def test_exact_log_normalizers_match_brute_force_loop():
    pool_image, pool_text = unit_vectors(30, 6, 0).double(), unit_vectors(30, 6, 1).double()
    probes = torch.tensor([0, 7, 29])
    got = exact_log_normalizers(pool_image[probes], pool_text[probes], pool_image, pool_text, 0.1, EPS, probes,
                                chunk_size=2)
    want = brute_force(pool_image[probes], pool_text[probes], pool_image, pool_text, 0.1, own=probes)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    # Anchors outside the pool: every pool pair is a negative.
    outside = unit_vectors(4, 6, 5).double(), unit_vectors(4, 6, 6).double()
    got = exact_log_normalizers(*outside, pool_image, pool_text, 0.2, EPS)
    want = brute_force(*outside, pool_image, pool_text, 0.2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_in_batch_estimate_of_whole_pool_equals_exact():
    """A training batch that IS the whole pool makes the in-batch estimate exact."""
    image, text = unit_vectors(16, 6, 0), unit_vectors(16, 6, 1)
    exact = exact_log_normalizers(image, text, image, text, 0.1, EPS, torch.arange(16))
    inputs = NormalizerInputs.from_embeddings(image, text, torch.tensor(0.1), EPS)
    torch.testing.assert_close(inputs.log_g_image, exact[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs.log_g_text, exact[1], atol=1e-5, rtol=1e-5)
    errors = estimate_errors(inputs.log_g_image, inputs.log_g_text, *exact)
    assert errors["mse"] < 1e-9 and abs(errors["bias"]) < 1e-5


def test_estimates_in_training_batches_places_anchors_with_pool_fill():
    normalizer = InBatchNormalizer(tiny_config("clip", projection_dim=6))
    anchors = unit_vectors(5, 6, 0), unit_vectors(5, 6, 1)
    pool = unit_vectors(40, 6, 2), unit_vectors(40, 6, 3)
    alpha_image, alpha_text = estimates_in_training_batches(
        normalizer, *anchors, torch.arange(5), *pool, torch.arange(100, 140), 0.1, batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    assert alpha_image.shape == alpha_text.shape == (5,)
    # Same batches by hand: 4 anchors per batch, completed with 4 random pool pairs.
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, 40, (4,), generator=generator)
    batch = NormalizerInputs.from_embeddings(torch.cat([anchors[0][:4], pool[0][picks]]),
                                             torch.cat([anchors[1][:4], pool[1][picks]]), torch.tensor(0.1), EPS)
    torch.testing.assert_close(alpha_image[:4], batch.log_g_image[:4])


def test_prototype_estimator_error_drops_below_in_batch_on_frozen_features():
    pool_image, pool_text = unit_vectors(200, 8, 0), unit_vectors(200, 8, 1)
    pool_text = torch.nn.functional.normalize(pool_image + 0.8 * pool_text, dim=-1)
    exact = exact_log_normalizers(pool_image[:40], pool_text[:40], pool_image, pool_text, 0.1, EPS,
                                  torch.arange(40))
    normalizer = build_normalizer(tiny_config(projection_dim=8, neuclip_num_prototypes=64,
                                              neuclip_learning_rate=0.02, neuclip_restart_period=10**6))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows = torch.randperm(200, generator=generator)[:16]
        normalizer.update(NormalizerInputs.from_embeddings(pool_image[rows], pool_text[rows], torch.tensor(0.1), EPS))
    ids = torch.arange(200)
    errors = {}
    for name, estimator in (("neuclip", normalizer), ("in_batch", InBatchNormalizer(tiny_config("clip")))):
        alpha = estimates_in_training_batches(estimator, pool_image[:40], pool_text[:40], ids[:40], pool_image[40:],
                                              pool_text[40:], ids[40:], 0.1, 16, torch.Generator().manual_seed(1))
        errors[name] = estimate_errors(*alpha, *exact)["mse"]
    assert errors["neuclip"] < 0.5 * errors["in_batch"]


def test_diagnostics_callback_logs_errors_during_training(tmp_path):
    pool = PairDataset(n=40, seed=3).rows
    trainer = make_trainer("neuclip", tmp_path, 4)
    callback = NormalizerDiagnosticsCallback(pool, every_steps=2, num_probes=8).attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "normalizer_mse" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for entry in logged:
        assert entry["normalizer_mse"] >= 0 and entry["normalizer_in_batch_mse"] >= 0
        assert math.isfinite(entry["normalizer_bias"])
    assert len(callback.history) == 2


def test_old_spellings_still_work_with_a_deprecation_warning():
    from neuclip_hf import diagnostics
    from neuclip_hf.arguments import EvalArguments

    with pytest.warns(FutureWarning, match="use NormalizerDiagnosticsCallback"):
        assert diagnostics.NormaliserDiagnosticsCallback is NormalizerDiagnosticsCallback
    with pytest.warns(FutureWarning, match="--normaliser_diagnostics_steps is deprecated"):
        args = EvalArguments(normaliser_diagnostics_steps=7, normaliser_diagnostics_pool=64)
    assert (args.normalizer_diagnostics_steps, args.normalizer_diagnostics_pool) == (7, 64)
