"""Mixed precision, activation (gradient) checkpointing and torch.compile: each trains like the plain fp32 step.

Speed and memory of these modes are measured in `benchmarks/training_modes.py`, never here.
"""

import copy
from contextlib import nullcontext

import pytest
import torch
from helpers import tiny_batch, tiny_config
from trainer_helpers import assert_same_final_state, make_trainer

from neuclip_hf import OBJECTIVES, NeuCLIPModel
from neuclip_hf.arguments import NeuCLIPTrainingArguments, parse_arguments
from neuclip_hf.objectives import NormalizerInputs

# bf16 keeps 8 significant bits (rounding error 2^-9 ~ 2e-3 per operation). Through the two-layer tiny encoders the
# unit embeddings move by ~5e-3, i.e. ~0.07 in a logit at T = 0.07. Measured on this batch: loss <= 3e-3 relative,
# gradient <= 3e-2 (norm of the difference / norm), estimates <= 0.07 in log space. The tolerances leave ~3x room.
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_RTOL = 1e-1
BF16_ESTIMATE_ATOL = 0.25


def _step(model: NeuCLIPModel, batch: dict, bf16: bool):
    """One training forward (estimator update included) and backward, optionally under CPU bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        out = model(**batch, return_loss=True, update_normalizer=True)
    out.loss.backward()
    return out


def _gradients(model: NeuCLIPModel) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _float_tensors(values: dict) -> dict:
    return {k: v for k, v in values.items() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_bf16_autocast_step_keeps_loss_and_estimator_in_fp32_and_matches_fp32_step(objective):
    torch.manual_seed(0)
    fp32 = NeuCLIPModel(tiny_config(objective))
    bf16 = copy.deepcopy(fp32)
    replay = copy.deepcopy(fp32)  # replays the bf16 step's loss in plain fp32 from the same embeddings
    batch = tiny_batch(16)
    reference = _step(fp32, batch, bf16=False)
    out = _step(bf16, batch, bf16=True)

    # The encoders ran in bf16 (autocast), everything from the embeddings on in fp32.
    assert out.image_embeds.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    for name, value in {**out.loss_components, **_float_tensors(out.normalizer_diagnostics or {})}.items():
        assert value.dtype == torch.float32, name
    for name, value in _float_tensors(bf16.normalizer.state_dict()).items():
        assert value.dtype == torch.float32, f"normalizer.{name}"
    if bf16.normalizer.optimizer is not None:
        for state in bf16.normalizer.optimizer.state.values():
            for name, value in _float_tensors(state).items():
                assert value.dtype == torch.float32, f"normalizer optimizer {name}"
    assert all(p.grad.dtype == torch.float32 for p in bf16.parameters() if p.grad is not None)

    # Exactly the fp32 math: the same embeddings through the objective and the estimator without autocast.
    loss, components, _ = replay.contrastive_loss(out.image_embeds.float(), out.text_embeds.float(),
                                                  batch["sample_ids"], update_normalizer=True)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-6, atol=1e-6)
    for name, value in components.items():
        torch.testing.assert_close(out.loss_components[name], value, rtol=1e-6, atol=1e-6, msg=name)
    for name, value in _float_tensors(replay.normalizer.state_dict()).items():
        torch.testing.assert_close(bf16.normalizer.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)

    # And close to the fp32 step, within what bf16 encoders explain (tolerances above).
    assert abs(float(out.loss) - float(reference.loss)) <= BF16_LOSS_RTOL * abs(float(reference.loss))
    difference = (_gradients(bf16) - _gradients(fp32)).norm() / _gradients(fp32).norm()
    assert difference <= BF16_GRAD_RTOL
    if hasattr(fp32.normalizer, "estimate"):
        inputs = NormalizerInputs.from_embeddings(reference.image_embeds, reference.text_embeds,
                                                  torch.tensor(fp32.temperature), fp32.config.eps,
                                                  sample_ids=batch["sample_ids"])
        for expected, actual in zip(fp32.normalizer.estimate(inputs), bf16.normalizer.estimate(inputs)):
            assert actual.dtype == torch.float32
            assert (actual - expected).abs().max() <= BF16_ESTIMATE_ATOL


def test_gradient_checkpointing_flag_reaches_the_training_arguments():
    (args,) = parse_arguments((NeuCLIPTrainingArguments,), ["--output_dir", "out", "--gradient_checkpointing",
                                                            "--use_cpu", "true"])
    assert args.activation_checkpointing is True  # transformers 5.25's name; the flag is its alias


def _count_layer_calls(trainer) -> list[int]:
    """How often the MLP of the first vision layer runs its `forward` (a checkpointed layer runs again in the
    backward; the recomputation fires no module hooks, so the instance's `forward` itself counts)."""
    calls = [0]
    mlp = trainer.core_model.vision_model.encoder.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


def test_gradient_checkpointing_trains_like_the_plain_step_and_resumes(tmp_path):
    """neuclip: the encoders, the estimator's state and its optimizer all go through the checkpointed step."""
    objective, steps = "neuclip", 4
    plain = make_trainer(objective, tmp_path / "plain", steps, save_steps=steps // 2)
    plain_calls = _count_layer_calls(plain)
    plain.train()
    checkpointed = make_trainer(objective, tmp_path / "checkpointed", steps, save_steps=steps // 2,
                                gradient_checkpointing=True)
    calls = _count_layer_calls(checkpointed)
    checkpointed.train()
    assert checkpointed.core_model.vision_model.encoder.gradient_checkpointing
    assert plain_calls[0] == steps and calls[0] == 2 * steps  # recomputed in every backward
    assert_same_final_state(plain, checkpointed)  # recomputation changes no number

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = make_trainer(objective, tmp_path / "resumed", steps, save_steps=steps // 2, gradient_checkpointing=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpointed" / f"checkpoint-{steps // 2}"))
    assert resumed.core_model.vision_model.encoder.gradient_checkpointing
    assert_same_final_state(checkpointed, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clip", "neuclip"])
def test_torch_compile_trains_like_eager(tmp_path, objective):
    """`--torch_compile` (dynamo graphs with their breaks, AOT autograd; `aot_eager` keeps the compile short on CPU)
    gives the eager run's weights and estimator state: clip compiles to one graph, neuclip breaks the most (its
    estimator's state updates). The inductor backend and every objective's graph breaks are in
    `benchmarks/training_modes.py` (its `--quick` mode runs in the slow tier)."""
    torch._dynamo.reset()
    eager = make_trainer(objective, tmp_path / "eager", 3)
    eager.train()
    compiled = make_trainer(objective, tmp_path / "compiled", 3, torch_compile=True, torch_compile_backend="aot_eager")
    compiled.train()
    wrapped = compiled.model_wrapped
    assert wrapped is not compiled.model and hasattr(wrapped, "_orig_mod")  # the step ran the compiled module
    assert_same_final_state(eager, compiled)
