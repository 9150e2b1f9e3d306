"""NeuCLIPTrainer: exact resume, step order, optimizer bookkeeping, NaN policy, argument validation."""

import json
import logging
import math
import os
import shutil

import pytest
import torch
from transformers import TrainerCallback
from helpers import OBJECTIVES
from trainer_helpers import PairDataset, assert_same_final_state, make_trainer

from neuclip_hf.checkpointing import MARKER, is_complete_checkpoint
from neuclip_hf.trainer import NORMALIZER_STATE_NAME, NeuCLIPTrainingArguments, checkpoint_map_location


@pytest.mark.parametrize("streaming", [False, True], ids=["map_dataset", "stateful_stream"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_equals_uninterrupted_run(tmp_path, objective, streaming):
    """2N steps in one go == N steps, checkpoint, resume in a fresh trainer and model, N more steps."""
    steps = 6  # 5 batches per epoch: the resumed half crosses an epoch boundary
    full = make_trainer(objective, tmp_path / "full", steps, streaming, save_steps=steps // 2)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{steps // 2}"
    assert is_complete_checkpoint(checkpoint)
    if full.normalizer.optimizer is not None:
        assert (checkpoint / NORMALIZER_STATE_NAME).exists()
    if streaming:
        assert (checkpoint / "data_state_rank0.pt").exists()
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed = make_trainer(objective, tmp_path / "resumed", steps, streaming, save_steps=steps // 2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_final_state(full, resumed)


def test_half_written_checkpoint_is_not_used(tmp_path):
    trainer = make_trainer("neuclip", tmp_path / "run", 4, save_steps=2)
    trainer.train()
    newest = tmp_path / "run" / "checkpoint-4"
    (newest / MARKER).unlink()  # as if the process was killed while writing checkpoint-4
    (newest / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4 is incomplete .*newest complete one is .*checkpoint-2"):
        make_trainer("neuclip", tmp_path / "run", 8).train(resume_from_checkpoint=str(newest))
    resumed = make_trainer("neuclip", tmp_path / "run", 6, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed._resume_checkpoint.endswith("checkpoint-2")
    assert resumed.state.global_step == 6 and is_complete_checkpoint(newest)  # rewritten, complete this time


def test_no_complete_checkpoint_error(tmp_path):
    os.makedirs(tmp_path / "run" / "checkpoint-3")
    with pytest.raises(ValueError, match=r"no complete checkpoint in .* \(incomplete, ignored: checkpoint-3\)"):
        make_trainer("clip", tmp_path / "run", 2).train(resume_from_checkpoint=True)


def test_neuclip_update_order_observed_through_optimizer_hooks(tmp_path):
    """Per step: T_u AdaGrad steps of the normalizer, then exactly one AdamW step; restarts every T_r steps."""
    inner, period, steps = 3, 4, 9
    trainer = make_trainer("neuclip", tmp_path, steps, model_kwargs=dict(neuclip_inner_steps=inner,
                                                                          neuclip_restart_period=period))
    events = []
    restarts_seen = []
    normalizer = trainer.core_model.normalizer
    original_restart = normalizer.restart

    def recording_restart(inputs):
        restarts_seen.append(int(normalizer.num_updates))
        return original_restart(inputs)

    normalizer.restart = recording_restart
    trainer.create_optimizer()
    trainer.optimizer.register_step_post_hook(lambda *a: events.append("encoders"))
    normalizer.optimizer.register_step_post_hook(lambda *a: events.append("normalizer"))
    trainer.train()
    assert events == (["normalizer"] * inner + ["encoders"]) * steps
    assert restarts_seen == [0, 4, 8]
    # AdamW stepped once per optimizer step; AdaGrad's counter restarted at step 8 (state reset at restarts).
    adamw_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adamw_steps == {steps}
    assert int(normalizer.optimizer.state[normalizer.text_prototypes]["step"]) == inner * (steps - 8)


def test_parameter_groups_and_normalizer_excluded(tmp_path):
    trainer = make_trainer("neuclip", tmp_path, 2, temperature_learning_rate=2e-4)
    trainer.train()
    model = trainer.core_model
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group"]: [names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups}
    assert groups["temperature"] == ["logit_scale"]
    assert not any(n.startswith("normalizer.") for names_ in groups.values() for n in names_)
    assert all(model.get_parameter(n).ndim >= 2 for n in groups["decay"])
    assert any(n.endswith("bias") for n in groups["no_decay"]) and any("layer_norm" in n for n in groups["no_decay"])
    decay_wd = {g["group"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decay_wd == {"decay": 0.1, "no_decay": 0.0, "temperature": 0.0}
    # The temperature keeps its own constant learning rate (no warm-up / cosine).
    temperature_group = [g for g in trainer.optimizer.param_groups if g["group"] == "temperature"][0]
    assert temperature_group["lr"] == pytest.approx(2e-4)
    # The normalizer's parameters never hold a gradient (encoder clipping never sees them).
    assert all(p.grad is None for p in model.normalizer.parameters())


def test_temperature_learning_rate_threshold(tmp_path):
    """FastCLIP's rule: the temperature learning rate is divided by 3 once T <= 0.03."""
    trainer = make_trainer("fastclip", tmp_path, 3, temperature_learning_rate=1e-3,
                           model_kwargs=dict(temperature_init=0.029))
    trainer.train()
    temperature_group = [g for g in trainer.optimizer.param_groups if g["group"] == "temperature"][0]
    assert trainer.temperature_lr.crossed
    assert temperature_group["lr"] == pytest.approx(1e-3 / 3)


def test_logit_scale_is_clamped_after_each_step(tmp_path):
    trainer = make_trainer("clip", tmp_path, 2, model_kwargs=dict(temperature_init=0.01), learning_rate=0.5,
                           temperature_learning_rate=0.5)
    trainer.train()
    assert trainer.core_model.temperature >= 0.01 - 1e-7


def test_logs_carry_components_and_diagnostics(tmp_path):
    trainer = make_trainer("neuclip", tmp_path, 3, model_kwargs=dict(neuclip_restart_period=2))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ("loss_unified", "loss_global_in_batch", "loss_unified_gap", "normalizer_restart", "temperature",
                "samples_per_second", "rho"):
        assert key in logs[0], key
    assert [round(h["normalizer_restart"]) for h in logs] == [1, 0, 1]
    assert all(h["loss_unified_gap"] >= -1e-6 for h in logs)


def test_rho_schedule(tmp_path):
    trainer = make_trainer("amorlip", tmp_path, 4, rho_schedule=[6.5, -8.0])
    trainer.train()
    assert [h["rho"] for h in trainer.state.log_history if "loss" in h] == [6.5, 6.5, -8.0, -8.0]


@pytest.mark.parametrize("unit, expected", [("epoch", [4.25] * 5 + [-4.25] * 5 + [-1.0] * 2),
                                            ("fraction", [4.25] * 4 + [-4.25] * 4 + [-1.0] * 4)])
def test_rho_schedule_by_epoch(tmp_path, unit, expected):
    """40 samples at global batch 8: 5 steps per epoch, 12 steps = 2.4 epochs, i.e. 3 whole epochs; with K = 3
    values, epoch e uses value e K // 3 (AmorLIP's --rho_list); `fraction` splits the 12 steps in thirds."""
    trainer = make_trainer("neuclip", tmp_path, 12, rho_schedule=[4.25, -4.25, -1.0], rho_schedule_unit=unit)
    trainer.train()
    assert [h["rho"] for h in trainer.state.log_history if "loss" in h] == expected


@pytest.mark.parametrize("streaming", [False, True], ids=["map_dataset", "stateful_stream"])
def test_logged_epoch_is_samples_seen_over_training_set_size(tmp_path, streaming):
    """44 samples, batch 8: the Trainer alone would log step / 5 (whole batches per pass) or step / max_steps (a
    stream); the logged epoch is 8 * step / 44 (the stream's size comes from the config, as the recipe fills it)."""
    trainer = make_trainer("clip", tmp_path, 7, streaming=streaming, dataset=PairDataset(44),
                           model_kwargs=dict(train_num_samples=44))
    trainer.train()
    assert trainer.core_model.config.train_num_samples == 44
    epochs = [h["epoch"] for h in trainer.state.log_history if "loss" in h]
    assert epochs == pytest.approx([8 * step / 44 for step in range(1, 8)])


def test_map_dataset_length_defines_the_epoch(tmp_path):
    trainer = make_trainer("amorlip", tmp_path, 6, dataset=PairDataset(24), model_kwargs=dict(amorlip_epoch_steps=None))
    assert trainer.core_model.config.train_num_samples == 24 and trainer.normalizer.train_num_samples == 24
    trainer.train()  # epochs of 3 steps: boundaries at steps 3 (and the beta of epoch 1 in use)
    assert bool(trainer.normalizer.has_previous)


def test_epoch_schedules_without_training_set_size_fail_clearly(tmp_path):
    stream = make_trainer("amorlip", tmp_path / "a", 4, streaming=True, model_kwargs=dict(amorlip_epoch_steps=None))
    with pytest.raises(ValueError, match=r"objective='amorlip' .* set --train_num_samples"):
        stream.train()
    by_epoch = make_trainer("neuclip", tmp_path / "b", 4, streaming=True, rho_schedule=[1.0, 2.0],
                            rho_schedule_unit="epoch")
    with pytest.raises(ValueError, match=r"--rho_schedule_unit epoch counts epochs: set --train_num_samples"):
        by_epoch.train()


class NanAfter(PairDataset):
    """Returns NaN pixels for the fetches numbered in `poisoned_calls` (all of them when `always`)."""

    def __init__(self, poisoned_calls=(), always=False):
        super().__init__()
        self.poisoned_calls, self.always, self.calls = set(poisoned_calls), always, 0

    def __getitem__(self, i):
        item = super().__getitem__(i)
        if self.always or self.calls in self.poisoned_calls:
            item["pixel_values"] = item["pixel_values"] * float("nan")
        self.calls += 1
        return item


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    # The third batch (fetches 16..23 with batch size 8) is corrupt.
    trainer = make_trainer("neuclip", tmp_path, 4, dataset=NanAfter(range(16, 24)), max_consecutive_nonfinite=3)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            snapshots[state.global_step] = {k: v.clone() for k, v in trainer.core_model.state_dict().items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    assert trainer._nonfinite_total == 1
    # The skipped step (the third) changed nothing: encoder weights, temperature and estimator state.
    for name, value in snapshots[2].items():
        assert torch.equal(value, snapshots[3][name]), name
    assert not torch.equal(snapshots[1]["logit_scale"], snapshots[2]["logit_scale"])  # other steps do train
    assert [h["nonfinite_steps_skipped"] for h in trainer.state.log_history if "loss" in h][-1] == 1
    assert all(torch.isfinite(p).all() for p in trainer.core_model.parameters())


def test_repeated_nonfinite_steps_stop_training(tmp_path):
    trainer = make_trainer("fastclip", tmp_path, 10, dataset=NanAfter(always=True), max_consecutive_nonfinite=3)
    with pytest.raises(RuntimeError, match=r"training stopped at step 3: 3 consecutive steps with a non-finite "
                                           r"loss or estimate \(last non-finite components: .*image_embeds"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.core_model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps=2 is not supported"),
        (dict(learning_rate=-1e-3), "--learning_rate=-0.001 is invalid"),
        (dict(normalizer_learning_rate=-1.0), "--normalizer_learning_rate=-1.0 is invalid"),
        (dict(per_device_train_batch_size=1), "--per_device_train_batch_size=1 with 1 process.* global batch of 1"),
        (dict(max_consecutive_nonfinite=0), "--max_consecutive_nonfinite=0"),
        (dict(rho_schedule_unit="steps"), r"--rho_schedule_unit='steps' is invalid: expected one of \('fraction', "
                                          r"'epoch'\)"),
        (dict(resume_with_other_layout="rewind"), r"--resume_with_other_layout='rewind' is invalid: expected one of "
                                                  r"\('refuse', 'next_epoch'\)"),
    ],
)
def test_bad_training_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        NeuCLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_streaming_without_max_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--max_steps must be set"):
        make_trainer("neuclip", tmp_path, -1, streaming=True)


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"--output_dir=.*file/run' cannot be written"):
        make_trainer("neuclip", blocker / "run", 2)


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import neuclip_hf.trainer as trainer_module

    trainer = make_trainer("clip", tmp_path / "run", 2, save_steps=1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage._replace(free=2**19))  # 0.5 MiB
    needed = trainer.checkpoint_bytes()
    params = sum(p.numel() for p in trainer.model.parameters())
    assert needed >= 3 * 4 * params  # float32 weights and AdamW's two moments
    with pytest.raises(ValueError, match=rf"--output_dir='.*run' has 0.5 MiB free, but one save of this model needs "
                                         rf"about {needed / 2**20:.1f} MiB \(weights and optimizer state\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))


def test_checkpoint_rotation_keeps_complete_checkpoints(tmp_path):
    trainer = make_trainer("clip", tmp_path, 6, save_steps=2, save_total_limit=2)
    trainer.train()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    assert all(is_complete_checkpoint(tmp_path / k) for k in kept)
    marker = json.loads((tmp_path / "checkpoint-6" / MARKER).read_text())
    assert marker == {"complete": True, "global_step": 6, "world_size": 1}
    shutil.rmtree(tmp_path)


def test_lines_logged_by_callbacks_keep_the_last_training_line(tmp_path):
    """A zero-shot evaluation and the normalizer diagnostics log on the last step, which is also a logging step:
    the step's training line (its loss) stays in the history, first, and the callbacks' lines follow it."""
    from hub_helpers import build_trainer

    from neuclip_hf.diagnostics import NormalizerDiagnosticsCallback

    trainer, _ = build_trainer(tmp_path / "run", steps=4, logging_steps=2)  # evaluates on every step
    NormalizerDiagnosticsCallback(trainer.train_dataset.rows, every_steps=2, num_probes=8).attach(trainer)
    trainer.train()
    history = trainer.state.log_history
    assert [entry["step"] for entry in history if "loss" in entry] == [2, 4]
    assert [entry["step"] for entry in history if "eval_acc1" in entry] == [1, 2, 3, 4]
    assert [entry["step"] for entry in history if "normalizer_mse" in entry] == [2, 4]
    last = [entry for entry in history if entry["step"] == 4 and "train_runtime" not in entry]
    assert ["loss" in last[0], "eval_acc1" in last[1], "normalizer_mse" in last[2]] == [True, True, True]
    assert math.isfinite(last[0]["loss"]) and trainer.control.should_log is False


def test_resume_names_its_checkpoint_and_step(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # a relative --output_dir, as typed by a user, stays relative in the message
    make_trainer("clip", "run", 2, save_steps=1).train()
    with caplog.at_level(logging.WARNING, logger="neuclip_hf.trainer"):
        make_trainer("clip", "run", 3, save_steps=1).train(resume_from_checkpoint=True)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from")]
    assert messages == [f"Resuming from {os.path.join('run', 'checkpoint-2')} (step 2)"]


def test_checkpoint_map_location_never_names_an_indexed_cpu():
    # What Trainer does for its own optimizer: each GPU rank loads onto its device, everything else onto "cpu".
    assert checkpoint_map_location(torch.device("cpu", 0), 2) == "cpu"  # torch cannot restore onto "cpu:0"
    assert checkpoint_map_location(torch.device("cpu"), 1) == "cpu"
    assert checkpoint_map_location(torch.device("cuda", 1), 2) == torch.device("cuda", 1)
    assert checkpoint_map_location(torch.device("cuda", 0), 1) == "cpu"  # one GPU: via the CPU, as Trainer does


@pytest.fixture
def one_thread():
    """A tiny model trains faster on one thread, and a busy machine does not slow it down by 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batch_aware_rho_keeps_the_temperature_inside_its_range(tmp_path, one_thread):
    """300 steps of FastCLIP at global batch 16 on learnable pairs, rho 6.5 (tuned at B = 1024), eps ~ 0 (no eps
    floor to hold T up): dL/dT >= 2 rho - 2 log(15) > 0 drives T to the 0.01 clamp. With rho_reference_batch=1024
    (rho_eff = 6.5 - log(1023 / 15) = 2.28 < log 15) T has a balance point and stays inside its range."""
    finals = {}
    for name, extra in (("fixed rho", {}), ("batch-aware rho", {"rho_reference_batch": 1024})):
        trainer = make_trainer("fastclip", tmp_path / name, 300, dataset=PairDataset(256), save_strategy="no",
                               per_device_train_batch_size=16, temperature_learning_rate=0.05, logging_steps=25,
                               model_kwargs=dict(rho=6.5, eps=1e-30, fastclip_dataset_size=256, **extra))
        trainer.train()
        finals[name] = [h["temperature"] for h in trainer.state.log_history if "temperature" in h]
    assert finals["fixed rho"][-1] == pytest.approx(0.01, abs=2e-4)  # collapsed onto the clamp
    assert min(finals["batch-aware rho"]) > 0.012 and 0.03 < finals["batch-aware rho"][-1] < 0.5
