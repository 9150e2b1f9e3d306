"""recipes/train.py end to end on the embedded default data: accuracy, saved outputs, exact resume through the
streaming loader and its workers, argument errors, and 2 processes under `accelerate launch`."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_launch_succeeded, launch_processes
from transformers import AutoProcessor

from neuclip_hf import NeuCLIPModel
from neuclip_hf.checkpointing import is_complete_checkpoint
from neuclip_hf.default_data import prepare_default_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import train as train_recipe  # noqa: E402

CONFIG = str(ROOT / "recipes" / "configs" / "default.yaml")
FAST = ["--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture(scope="module", autouse=True)
def default_data():
    prepare_default_data()  # the real cache (scripts/setup.sh prepares it; first use otherwise)


@pytest.mark.slow  # a recipe run
def test_short_default_run_learns_zero_shot_and_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    summary = train_recipe.main([CONFIG, "--output_dir", str(out), "--max_steps", "80", "--save_steps", "40",
                                 "--eval_max_samples", "2000", "--warmup_steps", "10", *FAST,
                                 "--normalizer_diagnostics_steps", "40", "--normalizer_diagnostics_pool", "512"])
    acc1 = summary["eval"]["acc1"]
    assert acc1 >= 3 * 0.1, f"held-out zero-shot acc1 {acc1:.3f} is below 3x chance (0.30)"
    assert summary["global_step"] == 80 and summary["eval"]["num_samples"] == 2000
    model = NeuCLIPModel.from_pretrained(out)
    assert model.config.objective == "neuclip" and int(model.normalizer.num_updates) == 80
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert json.loads((out / "eval_results.json").read_text())["eval"]["acc1"] == acc1
    assert is_complete_checkpoint(out / "checkpoint-40") and (out / "checkpoint-40" / "data_state_rank0.pt").exists()
    # The live normalizer diagnostic logged its error against the exact normalizer (here at step 40).
    history = json.loads((out / "checkpoint-40" / "trainer_state.json").read_text())["log_history"]
    diagnostics = [h for h in history if "normalizer_mse" in h]
    assert diagnostics and diagnostics[0]["step"] == 40
    # A 512-sample pool is only 4 batches, so the in-batch estimate is close there too: no ranking is asserted here
    # (benchmarks/normalizer_accuracy.py measures it on real pool sizes); the estimate must already be close to the
    # exact value (RMS error below 0.5 nats after 40 steps) and every field finite.
    first = diagnostics[0]
    assert all(math.isfinite(first[key]) for key in ("normalizer_mse", "normalizer_bias", "normalizer_in_batch_mse"))
    assert first["normalizer_mse"] < 0.25, first


@pytest.mark.slow  # recipe runs
@pytest.mark.parametrize("objective", ["neuclip", "fastclip"])
def test_recipe_resume_through_streaming_workers_is_exact(tmp_path, objective):
    common = [CONFIG, "--objective", objective, "--max_steps", "6", "--save_steps", "3",
              "--per_device_train_batch_size", "16", "--dataloader_num_workers", "2", "--eval_max_samples", "64",
              "--warmup_steps", "1", *FAST]
    train_recipe.main(common + ["--output_dir", str(tmp_path / "full")])
    train_recipe.main(common + ["--output_dir", str(tmp_path / "resumed"),
                                "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3")])
    full = NeuCLIPModel.from_pretrained(tmp_path / "full").state_dict()
    resumed = NeuCLIPModel.from_pretrained(tmp_path / "resumed").state_dict()
    for name, value in full.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "infonce"], "objective='infonce' is invalid"),
        (["--max_steps", "-1"], "--max_steps must be set"),
        (["--per_device_train_batch_size", "1"], "global batch of 1"),
        (["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps=4 is not supported"),
        (["--learning_rate", "-0.1"], "--learning_rate=-0.1 is invalid"),
        (["--no_such_flag", "3"], r"unknown argument\(s\): --no_such_flag"),
        (["--train_data", "/nonexistent/shards-*.tar"], "nonexistent"),
    ],
)
def test_bad_recipe_arguments_fail_before_training(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        train_recipe.main([CONFIG, "--output_dir", str(tmp_path / "run"), *FAST, *extra])
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.slow  # a 2-process run
def test_two_process_recipe_run(tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank streams its own shards; both ranks checkpoint their
    data position and end with the same weights."""
    out = tmp_path / "ddp"
    command = [ROOT / "recipes" / "train.py", CONFIG, "--output_dir", out, "--max_steps", "4", "--save_steps", "4",
               "--per_device_train_batch_size", "16", "--eval_max_samples", "64", "--dataloader_num_workers", "0",
               *FAST]
    done = launch_processes(command, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert_launch_succeeded(done)
    checkpoint = out / "checkpoint-4"
    marker = json.loads((checkpoint / "neuclip_checkpoint.json").read_text())
    assert marker["world_size"] == 2
    states = [torch.load(checkpoint / f"data_state_rank{r}.pt", weights_only=True) for r in range(2)]
    assert [s["layout"]["rank"] for s in states] == [0, 1]
    assert all(s["layout"]["world_size"] == 2 for s in states)
    assert "zero-shot top-1 accuracy" in done.stdout


RECIPE_EPOCHS = {"cc3m_vit_b32": 37, "cc12m_vit_b32": 33, "cc3m_vit_b32_fastclip": 37, "cc12m_vit_b32_fastclip": 33,
                 "cc3m_vit_b32_amorlip": 30, "cc12m_vit_b32_amorlip": 33}


@pytest.mark.parametrize("name", sorted(RECIPE_EPOCHS))
def test_paper_recipes_parse_into_a_valid_config_with_true_epochs(name):
    """Every flag of the recipe exists, its config overrides make a valid NeuCLIPConfig, and max_steps covers
    the stated number of epochs of train_num_samples (docs/baselines.md)."""
    from neuclip_hf.arguments import EvalArguments, LoraArguments, ModelArguments, parse_arguments, parse_overrides
    from neuclip_hf.data import DataArguments
    from neuclip_hf.presets import model_config
    from neuclip_hf.trainer import NeuCLIPTrainingArguments

    path = ROOT / "recipes" / "configs" / f"{name}.yaml"
    model_args, _, data_args, _, args = parse_arguments(
        (ModelArguments, LoraArguments, DataArguments, EvalArguments, NeuCLIPTrainingArguments),
        [str(path), "--bf16", "false", "--use_cpu", "true"])  # bf16 is for the GPUs the recipes are written for
    config = model_config(model_args.model_preset, objective=model_args.objective,
                          train_num_samples=data_args.train_num_samples, **parse_overrides(model_args.config_overrides))
    epochs = args.max_steps * args.per_device_train_batch_size * 8 / data_args.train_num_samples  # 8 GPUs
    assert RECIPE_EPOCHS[name] <= epochs < RECIPE_EPOCHS[name] + 0.001
    if config.objective == "fastclip":  # the release: eps 1e-14, no clipping, stepped gamma, mean, its T-gradient
        assert (config.eps, args.max_grad_norm, config.fastclip_gamma_schedule, config.fastclip_direction_reduction,
                config.fastclip_temperature_gradient) == (1e-14, 0, "stepped", "mean", "release")
    if name == "cc12m_vit_b32_amorlip":  # rho_A +8.5 in epochs 0-10, then -8.5 (AmorLIP's --rho_list)
        from neuclip_hf.trainer import scheduled_value

        batch = args.per_device_train_batch_size * 8
        per_epoch = {}
        for step in range(0, args.max_steps, 997):
            epoch = step * batch // data_args.train_num_samples
            per_epoch.setdefault(epoch, set()).add(scheduled_value(
                args.rho_schedule, args.rho_schedule_unit, step, args.max_steps, batch, data_args.train_num_samples))
        assert per_epoch == {e: {4.25 if e <= 10 else -4.25} for e in range(33)}
        assert (config.amorlip_hidden_factor, config.amorlip_positive_weight, config.amorlip_epoch_steps) == (
            1.0, 1e-3, None)
