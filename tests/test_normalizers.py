"""Each estimator on frozen features: exactness where it must be exact, convergence where it learns."""

import copy
import dataclasses
import math
import threading

import pytest
import torch
from helpers import tiny_config, unit_vectors

from neuclip_hf.normalizers import (
    AmortizedNormalizer,
    MovingAverageNormalizer,
    PrototypeNormalizer,
    build_normalizer,
)
from neuclip_hf import normalizer_amorlip, normalizer_neuclip
from neuclip_hf.distributed import row_blocks
from neuclip_hf.normalizer_amorlip import log_partition_sum
from neuclip_hf.objectives import NormalizerInputs

EPS = 1e-6


def clustered_pairs(n=256, dim=16, clusters=8, noise=0.5, seed=0):
    """Image/text embeddings scattered around shared cluster centres (like class-conditioned CLIP features)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=-1)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    image = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(n, dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(centres[labels] + noise * torch.randn(n, dim, generator=generator), dim=-1)
    return image, text


def inputs_for(image, text, temperature, ids=None):
    return NormalizerInputs.from_embeddings(image, text, torch.tensor(temperature), EPS, sample_ids=ids)


def exact_log_normalizers(image, text, temperature):
    full = inputs_for(image, text, temperature)
    return torch.stack([full.log_g_image, full.log_g_text])


def random_batches(n, batch_size, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randperm(n, generator=generator)[:batch_size]


# -- NeuCLIP ---------------------------------------------------------------------------------------------------
def test_restart_from_batch_reproduces_in_batch_normalizer_up_to_the_positive_term():
    """With W = the batch's other-modality embeddings (m = B), alpha_i = log(eps + ((B-1) ghat_i + 1) / B).

    The two terms that differ from the in-batch log(eps + ghat_i): the prototype of the positive itself adds
    exp(0) = 1, and the mean runs over B prototypes instead of B - 1 negatives.
    """
    batch_size = 16
    image, text = unit_vectors(batch_size, 8, 0), unit_vectors(batch_size, 8, 1)
    normalizer = build_normalizer(
        tiny_config(projection_dim=8, neuclip_num_prototypes=batch_size, neuclip_restart_source="batch")
    )
    inputs = inputs_for(image, text, 0.1)
    normalizer.restart(inputs)
    torch.testing.assert_close(normalizer.text_prototypes.data, text)
    torch.testing.assert_close(normalizer.image_prototypes.data, image)
    alpha_image, alpha_text = normalizer.estimate(inputs)
    for alpha, log_g in ((alpha_image, inputs.log_g_image), (alpha_text, inputs.log_g_text)):
        ghat = torch.exp(log_g) - EPS
        expected = torch.log(EPS + ((batch_size - 1) * ghat + 1) / batch_size)
        torch.testing.assert_close(alpha, expected, atol=1e-5, rtol=1e-5)
        # Removing the positive's term and renormalising recovers the in-batch estimate exactly.
        recovered = torch.log(EPS + (batch_size * (torch.exp(alpha) - EPS) - 1) / (batch_size - 1))
        torch.testing.assert_close(recovered, log_g, atol=1e-4, rtol=1e-4)


def test_restart_from_bank_uses_the_last_m_embeddings():
    normalizer = build_normalizer(tiny_config(projection_dim=8, neuclip_num_prototypes=12, neuclip_inner_steps=1))
    image, text = unit_vectors(40, 8, 0), unit_vectors(40, 8, 1)
    for start in range(0, 40, 8):  # five batches of 8 -> bank keeps rows 28..39 (in ring order)
        normalizer._push_bank(inputs_for(image[start:start + 8], text[start:start + 8], 0.1))
    assert int(normalizer.bank_count) == 12
    kept = {tuple(row.tolist()) for row in normalizer.text_bank}
    assert kept == {tuple(row.tolist()) for row in text[28:40]}
    normalizer.restart(inputs_for(image[:8], text[:8], 0.1))
    assert {tuple(r.tolist()) for r in normalizer.text_prototypes.data} == kept
    assert {tuple(r.tolist()) for r in normalizer.image_prototypes.data} == {tuple(r.tolist()) for r in image[28:40]}


def test_bank_smaller_than_m_is_cycled_at_the_first_restart():
    normalizer = build_normalizer(tiny_config(projection_dim=8, neuclip_num_prototypes=20, neuclip_inner_steps=1))
    image, text = unit_vectors(8, 8, 0), unit_vectors(8, 8, 1)
    normalizer._push_bank(inputs_for(image, text, 0.1))
    normalizer.restart(inputs_for(image, text, 0.1))
    torch.testing.assert_close(normalizer.text_prototypes.data, torch.cat([text, text, text[:4]]))


@pytest.mark.parametrize(
    "schedule, expected",
    [("constant", [0, 10, 20, 30, 40]), ("doubling", [0, 2, 6, 14, 24, 34])],
)
def test_restart_schedule_observed_through_updates(schedule, expected):
    normalizer = build_normalizer(
        tiny_config(
            projection_dim=8, neuclip_num_prototypes=8, neuclip_inner_steps=1, neuclip_restart_period=10,
            neuclip_restart_schedule=schedule, neuclip_restart_initial_period=2,
        )
    )
    image, text = unit_vectors(8, 8, 0), unit_vectors(8, 8, 1)
    observed = []
    for step in range(42):
        before = normalizer.text_prototypes.detach().clone()
        diagnostics = normalizer.update(inputs_for(image, text, 0.1))
        if diagnostics["restart"]:
            observed.append(step)
            assert int(normalizer.num_restarts) == len(observed)
        else:
            assert not torch.equal(before, torch.zeros_like(before))
    assert observed == [s for s in expected if s < 42]


def test_update_runs_inner_steps_and_resets_adagrad_on_restart():
    config = tiny_config(projection_dim=8, neuclip_num_prototypes=8, neuclip_inner_steps=3, neuclip_restart_period=4)
    normalizer = build_normalizer(config)
    image, text = unit_vectors(8, 8, 0), unit_vectors(8, 8, 1)
    inputs = inputs_for(image, text, 0.1)
    steps_seen = []
    for _ in range(6):
        normalizer.update(inputs)
        steps_seen.append(int(normalizer.optimizer.state[normalizer.text_prototypes]["step"]))
    # AdaGrad counts 3 inner steps per update and starts over at the restart of step 4.
    assert steps_seen == [3, 6, 9, 12, 3, 6]


def test_neuclip_estimate_approaches_exact_full_data_normalizer():
    """Frozen features, random batches of 32 out of 512: the prototype estimate converges towards the exact
    dataset-wide log(eps + g), far below the in-batch estimate's error."""
    n, batch_size, temperature = 512, 32, 0.1
    image, text = clustered_pairs(n)
    exact = exact_log_normalizers(image, text, temperature)
    normalizer = build_normalizer(
        tiny_config(neuclip_num_prototypes=128, neuclip_learning_rate=0.02, neuclip_restart_period=10**6)
    )
    everything = inputs_for(image, text, temperature)
    errors, in_batch_errors = [], []
    for step, idx in enumerate(random_batches(n, batch_size, 300)):
        batch = inputs_for(image[idx], text[idx], temperature)
        normalizer.update(batch)
        if step % 50 == 0 or step == 299:
            errors.append(float(((torch.stack(normalizer.estimate(everything)) - exact) ** 2).mean()))
            in_batch = torch.stack([batch.log_g_image, batch.log_g_text])
            in_batch_errors.append(float(((in_batch - exact[:, idx]) ** 2).mean()))
    assert errors[-1] < 0.3 * errors[0]
    assert all(later <= earlier * 1.1 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 0.4 * (sum(in_batch_errors) / len(in_batch_errors))


# -- FastCLIP ----------------------------------------------------------------------------------------------------
def test_fastclip_one_full_batch_pass_with_gamma_one_is_exact():
    n = 24
    image, text = unit_vectors(n, 8, 0), unit_vectors(n, 8, 1)
    normalizer = build_normalizer(
        tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=n, fastclip_gamma_min=1.0)
    )
    normalizer.update(inputs_for(image, text, 0.2, ids=torch.arange(n)))
    torch.testing.assert_close(normalizer.log_u, exact_log_normalizers(image, text, 0.2))


def test_fastclip_moving_average_update_in_log_space():
    n = 8
    image, text = unit_vectors(n, 8, 0), unit_vectors(n, 8, 1)
    normalizer = build_normalizer(
        tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=n, fastclip_gamma_min=0.3,
                    fastclip_gamma_decay_epochs=0)
    )
    first = inputs_for(image, text, 0.2, ids=torch.arange(n))
    normalizer.update(first)  # first visit: u = eps + ghat
    second = inputs_for(text, image, 0.2, ids=torch.arange(n))  # other statistics, same ids
    normalizer.update(second)
    expected_u = 0.7 * torch.exp(torch.stack([first.log_g_image, first.log_g_text])) + 0.3 * torch.exp(
        torch.stack([second.log_g_image, second.log_g_text])
    )
    torch.testing.assert_close(normalizer.log_u, torch.log(expected_u), atol=1e-5, rtol=1e-5)


def test_fastclip_gamma_schedule():
    normalizer = build_normalizer(
        tiny_config("fastclip", fastclip_dataset_size=100, fastclip_gamma_min=0.2, fastclip_gamma_decay_epochs=2)
    )
    assert normalizer.gamma(10) == 1.0
    normalizer.num_updates.fill_(10)  # one epoch of 10 steps of 10 samples
    assert normalizer.gamma(10) == pytest.approx(0.6)
    normalizer.num_updates.fill_(25)
    assert normalizer.gamma(10) == pytest.approx(0.2)


def _cosine_gamma(epoch, decay, gamma_min):
    """FastCLIP's cosine: gamma_min + (1 - gamma_min) (1 + cos(pi epoch / E)) / 2, gamma_min once epoch >= E."""
    if epoch >= decay:
        return gamma_min
    return gamma_min + (1 - gamma_min) * 0.5 * (1 + math.cos(math.pi * epoch / decay))


@pytest.mark.parametrize("schedule", ["stepped", "continuous"])
def test_fastclip_gamma_in_true_epochs(schedule):
    """Epoch = samples seen / training-set size (100 here, though the table has 150 slots), global batch 16.

    stepped (the release): one value per integer epoch, 1.0 in epoch 0; continuous: the cosine at the fraction.
    """
    normalizer = build_normalizer(tiny_config(
        "fastclip", fastclip_dataset_size=150, train_num_samples=100, fastclip_gamma_min=0.2,
        fastclip_gamma_decay_epochs=4, fastclip_gamma_schedule=schedule))
    observed, expected = [], []
    for step in (0, 6, 7, 12, 13, 24, 25, 40):
        normalizer.num_updates.fill_(step)
        observed.append(normalizer.gamma(16))
        epoch = step * 16 / 100  # 0, 0.96, 1.12, 1.92, 2.08, 3.84, 4.0, 6.4
        if schedule == "stepped":
            expected.append(1.0 if int(epoch) == 0 else _cosine_gamma(int(epoch), 4, 0.2))
        else:
            expected.append(_cosine_gamma(epoch, 4, 0.2))
    assert observed == pytest.approx(expected, abs=1e-12)
    if schedule == "stepped":  # constant within an epoch, stepping at the boundaries
        epoch_one = 0.2 + 0.4 * (1 + math.cos(math.pi / 4))
        assert observed[1] == 1.0 and observed[2] == observed[3] == pytest.approx(epoch_one)
    else:
        assert observed[1] < 1.0 and observed[2] > observed[3]


def test_fastclip_stepped_gamma_without_decay_is_one_in_epoch_zero_only():
    normalizer = build_normalizer(tiny_config("fastclip", fastclip_dataset_size=32, fastclip_gamma_min=0.3,
                                              fastclip_gamma_decay_epochs=0))
    for step, gamma in ((0, 1.0), (3, 1.0), (4, 0.3)):  # 4 steps of 8 are one epoch of 32
        normalizer.num_updates.fill_(step)
        assert normalizer.gamma(8) == gamma
    continuous = build_normalizer(tiny_config("fastclip", fastclip_dataset_size=32, fastclip_gamma_min=0.3,
                                              fastclip_gamma_decay_epochs=0, fastclip_gamma_schedule="continuous"))
    assert continuous.gamma(8) == 0.3


def test_fastclip_multi_epoch_average_beats_in_batch():
    n, batch_size, temperature = 256, 16, 0.1
    image, text = clustered_pairs(n)
    exact = exact_log_normalizers(image, text, temperature)
    normalizer = build_normalizer(
        tiny_config("fastclip", fastclip_dataset_size=n, fastclip_gamma_min=0.1, fastclip_gamma_decay_epochs=3)
    )
    in_batch_error = []
    for idx in random_batches(n, batch_size, 16 * 20):
        batch = inputs_for(image[idx], text[idx], temperature, ids=idx)
        normalizer.update(batch)
        in_batch_error.append(float(((torch.stack([batch.log_g_image, batch.log_g_text]) - exact[:, idx]) ** 2).mean()))
    table_error = float(((normalizer.log_u - exact) ** 2).mean())
    assert table_error < 0.5 * sum(in_batch_error) / len(in_batch_error)


def test_fastclip_id_errors_and_map_mode():
    normalizer = build_normalizer(tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=4))
    image, text = unit_vectors(4, 8, 0), unit_vectors(4, 8, 1)
    with pytest.raises(ValueError, match=r"sample id 7 is outside \[0, fastclip_dataset_size=4\)"):
        normalizer.update(inputs_for(image, text, 0.1, ids=torch.tensor([0, 1, 2, 7])))
    with pytest.raises(ValueError, match="needs `sample_ids`"):
        normalizer.update(inputs_for(image, text, 0.1))
    mapped = build_normalizer(
        tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=6, fastclip_id_mode="map")
    )
    ids = torch.tensor([10**12, -5, 77, 3])
    mapped.update(inputs_for(image, text, 0.1, ids=ids))
    assert mapped.slot_ids[:4].tolist() == ids.tolist() and int(mapped.num_slots) == 4
    # The map survives a state_dict round trip (it is rebuilt from the buffers).
    clone = build_normalizer(tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=6, fastclip_id_mode="map"))
    clone.load_state_dict(mapped.state_dict())
    assert clone._slots(torch.tensor([77, 10**12]), assign=False).tolist() == [2, 0]
    with pytest.raises(ValueError, match="more distinct sample ids than fastclip_dataset_size=6"):
        mapped.update(inputs_for(image, text, 0.1, ids=torch.tensor([1, 2, 4, 5])))


def test_fastclip_unseen_ids_fall_back_to_in_batch():
    normalizer = build_normalizer(tiny_config("fastclip", projection_dim=8, fastclip_dataset_size=10))
    image, text = unit_vectors(4, 8, 0), unit_vectors(4, 8, 1)
    inputs = inputs_for(image, text, 0.1, ids=torch.tensor([0, 1, 2, 3]))
    alpha_image, alpha_text = normalizer.estimate(inputs)
    torch.testing.assert_close(alpha_image, inputs.log_g_image)
    torch.testing.assert_close(alpha_text, inputs.log_g_text)


# -- AmorLIP -----------------------------------------------------------------------------------------------------
def test_amorlip_online_networks_converge_to_their_target_on_frozen_features():
    batch_size, temperature = 32, 0.1
    image, text = clustered_pairs(batch_size, seed=3)
    normalizer = build_normalizer(
        tiny_config("amorlip", amorlip_epoch_steps=10**6, amorlip_hidden_factor=2.0, amorlip_learning_rate=3e-3)
    )
    normalizer.reset_parameters()
    inputs = inputs_for(image, text, temperature)
    scale = 1 / temperature
    target_image = log_partition_sum(scale * image @ text.T, torch.arange(batch_size), 1.0)
    target_text = log_partition_sum(scale * text @ image.T, torch.arange(batch_size), 1.0)
    with torch.no_grad():
        start = float(((normalizer.online.image(image) - target_image) ** 2).mean())
    for _ in range(300):
        normalizer.update(inputs)
    with torch.no_grad():
        end_image = float(((normalizer.online.image(image) - target_image) ** 2).mean())
        end_text = float(((normalizer.online.text(text) - target_text) ** 2).mean())
    assert end_image < 1e-2 * start and end_image < 0.05 and end_text < 0.05
    # The EMA target follows the online network.
    with torch.no_grad():
        assert float(((normalizer.target.image(image) - target_image) ** 2).mean()) < 0.1


def test_amorlip_epoch_boundary_snapshots_target_and_reinitialises():
    normalizer = build_normalizer(tiny_config("amorlip", amorlip_epoch_steps=3, amorlip_beta_ramp_epochs=2))
    normalizer.reset_parameters()
    image, text = clustered_pairs(16)
    inputs = inputs_for(image, text, 0.1)
    for _ in range(3):
        normalizer.update(inputs)
    target_before = {k: v.clone() for k, v in normalizer.target.state_dict().items()}
    online_before = {k: v.clone() for k, v in normalizer.online.state_dict().items()}
    normalizer.update(inputs)  # step 3 starts epoch 1
    assert bool(normalizer.has_previous)
    for key, value in normalizer.previous.state_dict().items():
        torch.testing.assert_close(value, target_before[key])
    assert not torch.equal(normalizer.online.image.fc1.weight, online_before["image.fc1.weight"])
    assert float(normalizer.beta) == pytest.approx(0.8 * 0.5 * (1 - math.cos(math.pi / 2)))


@pytest.mark.parametrize("epoch_steps, expected", [(None, [4, 7, 10, 13]), (3, [3, 6, 9, 12])])
def test_amorlip_epoch_boundaries_at_the_true_epoch_length(epoch_steps, expected):
    """n = 50 samples, global batch 16: epoch of step s = 16 s // 50, so epochs start at steps 4, 7, 10, 13 (one pass
    over the data each); an explicit amorlip_epoch_steps wins. beta follows the integer epoch."""
    normalizer = build_normalizer(tiny_config("amorlip", train_num_samples=50, amorlip_epoch_steps=epoch_steps,
                                              amorlip_beta_ramp_epochs=4))
    normalizer.reset_parameters()
    image, text = clustered_pairs(16)
    inputs = inputs_for(image, text, 0.1)
    starts, betas = [], []
    original = normalizer._start_epoch

    def recording():
        starts.append(int(normalizer.num_updates))
        original()

    normalizer._start_epoch = recording
    for _ in range(15):
        normalizer.update(inputs)
        betas.append(float(normalizer.beta))
    assert starts == expected
    epochs = [sum(step >= start for start in expected) for step in range(15)]
    assert betas == pytest.approx([0.8 * 0.5 * (1 - math.cos(math.pi * min(e / 4, 1))) for e in epochs])


def test_amorlip_without_epoch_length_is_a_clear_error():
    normalizer = build_normalizer(tiny_config("amorlip", amorlip_epoch_steps=None))
    image, text = clustered_pairs(8)
    with pytest.raises(ValueError, match=r"objective='amorlip' re-initialises its networks every epoch .* set "
                                         r"--train_num_samples \(the training-set size"):
        normalizer.update(inputs_for(image, text, 0.1))
    normalizer.set_train_num_samples(80)  # what the trainer does from the data
    normalizer.update(inputs_for(image, text, 0.1))
    assert int(normalizer.num_updates) == 1


def test_amorlip_learning_rate_scaled_by_world_size(monkeypatch):
    """The release's lambda_lr x world_size, applied to the built optimizer and to a later requested rate."""
    monkeypatch.setattr(normalizer_amorlip, "rank_and_world_size", lambda: (0, 4))
    scaled = build_normalizer(tiny_config("amorlip", amorlip_scale_lr_by_world_size=True))
    assert [g["lr"] for g in scaled.optimizer.param_groups] == [pytest.approx(4e-3)]
    scaled.ensure_optimizer(2e-3)
    assert [g["lr"] for g in scaled.optimizer.param_groups] == [pytest.approx(8e-3)]
    plain = build_normalizer(tiny_config("amorlip"))
    assert [g["lr"] for g in plain.optimizer.param_groups] == [pytest.approx(1e-3)]


def test_amorlip_blend_estimate_is_in_batch_in_epoch_zero_and_converts_to_mean_form():
    """In epoch 0 (beta = 0) the blended estimate is the exact batch partition sum; converted to the mean form
    it equals log(eps + ghat) (the positive weight is subtracted and the sum divided by B - 1)."""
    normalizer = build_normalizer(tiny_config("amorlip"))
    image, text = clustered_pairs(16)
    inputs = inputs_for(image, text, 0.1)
    normalizer.update(inputs)
    alpha_image, alpha_text = normalizer.estimate(inputs)
    torch.testing.assert_close(alpha_image, inputs.log_g_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alpha_text, inputs.log_g_text, atol=1e-4, rtol=1e-4)


# -- shared contract ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PrototypeNormalizer, AmortizedNormalizer, MovingAverageNormalizer])
def test_state_round_trip_continues_identically(cls):
    config = tiny_config(cls.objective)
    normalizer = build_normalizer(config)
    normalizer.reset_parameters()
    image, text = clustered_pairs(16)
    ids = torch.arange(16)
    normalizer.update(inputs_for(image, text, 0.1, ids))
    clone = build_normalizer(config)
    clone.load_state_dict(normalizer.state_dict())
    if normalizer.optimizer is not None:
        # deepcopy: an in-memory optimizer state_dict shares its tensors with the source optimizer
        clone.optimizer.load_state_dict(copy.deepcopy(normalizer.optimizer.state_dict()))
    # The same next update on both gives bit-identical state: nothing lives outside state_dict / optimizer.
    next_inputs = inputs_for(text, image, 0.1, ids)
    normalizer.update(next_inputs)
    clone.update(next_inputs)
    for (name, a), b in zip(normalizer.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), name
    assert not inputs_for(image * float("nan"), text, 0.1, ids).is_finite()


def test_closed_form_prototype_gradient_equals_autograd():
    normalizer = build_normalizer(tiny_config(projection_dim=8, neuclip_num_prototypes=24))
    normalizer.reset_parameters()
    image, text = clustered_pairs(20, dim=8)
    inputs = inputs_for(image, text, 0.07)
    params = [normalizer.text_prototypes, normalizer.image_prototypes]
    expected_value = normalizer.objective_value(inputs)
    expected = torch.autograd.grad(expected_value, params)
    value, gradients = normalizer.objective_and_gradients(inputs)
    torch.testing.assert_close(value, expected_value.detach())
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


class SimulatedRanks:
    """Collectives for `world_size` threads that each play one rank (sum and max all-reduces, in place)."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.deposits = {}

    def _all_reduce(self, tensor, reduce):
        self.deposits[threading.get_ident()] = tensor.clone()
        self.barrier.wait()
        result = reduce(torch.stack(list(self.deposits.values())))
        self.barrier.wait()
        tensor.copy_(result)
        return tensor

    def all_reduce_sum_(self, tensor):
        return self._all_reduce(tensor, lambda stacked: stacked.sum(0))

    def all_reduce_max_(self, tensor):
        return self._all_reduce(tensor, lambda stacked: stacked.amax(0))

    def run(self, work):
        """`work(rank)` in one thread per rank; their results in rank order."""
        results = [None] * self.world_size
        threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, work(r))) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(result is not None for result in results), "a simulated rank failed"
        return results


@pytest.mark.parametrize("temperature", (0.07, 0.002))  # 0.002: below the fixed shift's range, the ranks' max shifts
def test_prototype_split_gradient_equals_float64_autograd(monkeypatch, temperature):
    """Three simulated ranks own 9 + 8 + 8 of m = 25 prototypes: the value each computes and the gradient rows of its
    own block, put together, are the whole objective's value and gradient (float64 autograd on the formula)."""
    normalizer = build_normalizer(tiny_config(projection_dim=8, neuclip_num_prototypes=25,
                                              neuclip_restart_source="batch"))
    image, text = clustered_pairs(20, dim=8)
    inputs = inputs_for(image, text, temperature)
    # Prototypes near the data (a restart, then noise), so the objective stays finite in fp32 even at T = 0.002.
    normalizer.restart(inputs)
    with torch.no_grad():
        for prototypes in (normalizer.text_prototypes, normalizer.image_prototypes):
            prototypes.add_(0.1 * torch.randn(prototypes.shape, generator=torch.Generator().manual_seed(0)))
    ranks = SimulatedRanks(3)
    monkeypatch.setattr(normalizer_neuclip, "all_reduce_sum_", ranks.all_reduce_sum_)
    monkeypatch.setattr(normalizer_neuclip, "all_reduce_max_", ranks.all_reduce_max_)
    blocks = row_blocks(25, 3)
    assert [(block.start, block.stop) for block in blocks] == [(0, 9), (9, 17), (17, 25)]
    results = ranks.run(lambda rank: normalizer.objective_and_gradients(inputs, blocks[rank]))

    reference = copy.deepcopy(normalizer).double()
    inputs64 = dataclasses.replace(inputs, **{name: getattr(inputs, name).double() for name in
                                              ("image", "text", "temperature", "positive", "log_g_image", "log_g_text")})
    params = [reference.text_prototypes, reference.image_prototypes]
    expected_value = reference.objective_value(inputs64)
    expected = torch.autograd.grad(expected_value, params)
    # fp32 cosines carry ~6e-8 of error, i.e. ~3e-5 in z = cos / T at T = 0.002, which the softmax weights amplify:
    # against float64 and against each other, the fp32 computations (split or not) agree to rtol 1e-4 at T = 0.07
    # and 1e-3 at 0.002.
    rtol = 1e-4 if temperature > 0.01 else 1e-3
    whole_value, whole_gradients = normalizer.objective_and_gradients(inputs)  # one rank, all prototypes
    for value, _ in results:
        torch.testing.assert_close(value.double(), expected_value.detach(), atol=1e-6, rtol=rtol)
        torch.testing.assert_close(value, whole_value, atol=1e-6, rtol=rtol)
    for direction, want in enumerate(expected):
        got = torch.cat([gradients[direction] for _, gradients in results])
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=rtol)
        torch.testing.assert_close(got, whole_gradients[direction], atol=1e-6, rtol=rtol)


def test_row_blocks_cover_the_rows_in_rank_order():
    assert row_blocks(7, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)]
    assert row_blocks(8, 2) == [slice(0, 4), slice(4, 8)]
    assert row_blocks(2, 3) == [slice(0, 1), slice(1, 2), slice(2, 2)]  # more ranks than rows: an empty block
    assert row_blocks(5, 1) == [slice(0, 5)]


def test_row_block_adagrad_steps_only_its_rows_as_torch_adagrad_would():
    """With `rows` set, RowBlockAdagrad changes only those rows of the parameter and its accumulator, exactly as
    torch's AdaGrad steps a parameter made of those rows; step hooks fire and a closure's loss is returned."""
    start = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    gradient = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(start.clone())
    optimizer = normalizer_neuclip.RowBlockAdagrad([param], lr=0.1)
    reference = torch.nn.Parameter(start[1:3].clone())
    reference_optimizer = torch.optim.Adagrad([reference], lr=0.1)
    hooks = []
    optimizer.register_step_post_hook(lambda *args: hooks.append(1))
    optimizer.rows = slice(1, 3)
    for _ in range(2):  # torch's AdaGrad class stepped first: its `step` is then hook-wrapped too (no double hooks)
        param.grad, reference.grad = gradient.clone(), gradient[1:3].clone()
        reference_optimizer.step()
        assert optimizer.step(lambda: torch.tensor(7.0)) == 7.0
    assert hooks == [1, 1]
    torch.testing.assert_close(param.data[1:3], reference.data, rtol=0, atol=0)
    assert torch.equal(param.data[[0, 3, 4]], start[[0, 3, 4]])
    torch.testing.assert_close(optimizer.state[param]["sum"][1:3], reference_optimizer.state[reference]["sum"],
                               rtol=0, atol=0)
    assert not optimizer.state[param]["sum"][[0, 3, 4]].any()
    # Without rows: the whole tensor, as torch's AdaGrad (one hook call per step).
    optimizer.rows = None
    whole = torch.nn.Parameter(param.data.clone())
    whole_optimizer = torch.optim.Adagrad([whole], lr=0.1)
    whole_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing the accumulators
    param.grad, whole.grad = gradient.clone(), gradient.clone()
    whole_optimizer.step()
    optimizer.step()
    assert hooks == [1, 1, 1]
    torch.testing.assert_close(param.data, whole.data, rtol=0, atol=0)
