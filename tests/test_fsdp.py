"""FSDP2-sharded encoders against DDP, 2 gloo processes under `accelerate launch` (slow tier, hard timeouts).

The encoders are sharded with torch's `fully_shard` (each CLIP encoder layer one unit); the normalizer and the
scalar `logit_scale` stay whole (`fsdp_replicated_parameters`). After the same steps both give the same weights, and
a sharded torch.distributed.checkpoint saved mid-run and resumed in a new launch ends where the straight run ends;
in a custom loop (tests/scripts/fsdp_vs_ddp.py) and through recipes/train.py --fsdp_encoders true
(tests/scripts/fsdp_recipe_runs.py: DDP, FSDP and FSDP resumed, in one launch).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import launch_two_processes, tiny_config

from neuclip_hf import NeuCLIPModel
from neuclip_hf.distributed import average_replicated_gradients_, fsdp_replicated_parameters

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "scripts" / "fsdp_vs_ddp.py"
RECIPE_RUNS = Path(__file__).parent / "scripts" / "fsdp_recipe_runs.py"
TIMEOUT = 240  # seconds per launch; one takes ~20 s on 2 idle cores, so only a hang reaches it
RECIPE_TIMEOUT = 480  # the three recipe runs take ~30 s on 2 idle cores
STEPS, SAVE_AT = 4, 2
MAX_GRAD_NORM = 0.05  # below every step's gradient norm (1.0-1.8 here): clipping acts at every step
RECIPE_FLAGS = ["--per_device_train_batch_size", "16", "--eval_max_samples", "64", "--dataloader_num_workers", "0",
                "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--warmup_steps", "1",
                "--max_grad_norm", str(MAX_GRAD_NORM)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    for extra in ([], ["--resume"]):
        done = launch_two_processes([SCRIPT, out, STEPS, SAVE_AT, *extra], timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-6000:]
        assert "world size 2" in done.stdout
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in ("ddp", "fsdp", "resumed")}


@pytest.mark.slow
def test_fsdp_equals_ddp_after_the_same_steps(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert set(ddp) == set(fsdp)
    torch.manual_seed(0)
    initial = NeuCLIPModel(tiny_config("neuclip", neuclip_num_prototypes=16)).state_dict()
    assert not torch.equal(ddp["vision_model.encoder.layers.0.mlp.fc1.weight"],
                           initial["vision_model.encoder.layers.0.mlp.fc1.weight"])  # training moved the weights
    assert not torch.equal(ddp["logit_scale"], initial["logit_scale"])
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly(runs):
    for name, value in runs["fsdp"].items():
        torch.testing.assert_close(runs["resumed"][name], value, atol=0, rtol=0, msg=name)


def test_replicated_parameters_are_the_normalizer_and_the_scalars():
    for objective, expected in (("neuclip", {"logit_scale", "normalizer.text_prototypes",
                                             "normalizer.image_prototypes"}),
                                ("siglip", {"logit_scale", "normalizer.logit_bias"}),
                                ("clip", {"logit_scale"})):
        assert set(fsdp_replicated_parameters(NeuCLIPModel(tiny_config(objective)))) == expected, objective


def test_averaging_replicated_gradients_is_a_no_op_without_sharding():
    model = NeuCLIPModel(tiny_config("clip"))
    model.logit_scale.grad = torch.tensor(3.0)
    average_replicated_gradients_(model)
    assert model.logit_scale.grad.item() == 3.0


@pytest.mark.parametrize("how", ["argument", "accelerate_env"])
def test_trainer_refuses_fsdp_with_a_clear_message(tmp_path, monkeypatch, how):
    from neuclip_hf.trainer import FSDP_REFUSAL, NeuCLIPTrainer, NeuCLIPTrainingArguments

    values = dict(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[])
    if how == "argument":
        values["fsdp"] = True
    else:  # what `accelerate launch --use_fsdp` exports
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError) as error:
        NeuCLIPTrainer(model=NeuCLIPModel(tiny_config("neuclip")), args=NeuCLIPTrainingArguments(**values))
    assert str(error.value) == FSDP_REFUSAL
    assert "logit_scale" in FSDP_REFUSAL and "--fsdp_encoders true" in FSDP_REFUSAL


def test_trainer_fsdp_encoders_needs_a_distributed_launch(tmp_path):
    from neuclip_hf.trainer import FSDP_NEEDS_PROCESSES, NeuCLIPTrainer, NeuCLIPTrainingArguments

    args = NeuCLIPTrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[],
                                    fsdp_encoders=True)
    with pytest.raises(ValueError) as error:
        NeuCLIPTrainer(model=NeuCLIPModel(tiny_config("neuclip")), args=args)
    assert str(error.value) == FSDP_NEEDS_PROCESSES


# -- through NeuCLIPTrainer and recipes/train.py -------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    from neuclip_hf.default_data import prepare_default_data

    prepare_default_data()  # the embedded data's cache, before two ranks would race to build it
    out = tmp_path_factory.mktemp("fsdp_recipe")
    done = launch_two_processes([RECIPE_RUNS, out, STEPS, SAVE_AT, *RECIPE_FLAGS], timeout=RECIPE_TIMEOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    assert "three runs done, world size 2" in done.stdout
    return out


def _logged_grad_norms(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [line["grad_norm"] for line in history if "grad_norm" in line]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:  # the normalizer's counters
            assert torch.equal(b[name], value), name


@pytest.mark.slow
def test_recipe_fsdp_encoders_equals_ddp(recipe_runs):
    ddp = NeuCLIPModel.from_pretrained(recipe_runs / "ddp")  # one process: the saved full weights load as they are
    fsdp = NeuCLIPModel.from_pretrained(recipe_runs / "fsdp")
    assert int(fsdp.normalizer.num_updates) == STEPS
    _assert_same_weights(ddp.state_dict(), fsdp.state_dict())
    # The same clipped steps: the norm over sharded and whole gradients equals DDP's, above the clipping threshold.
    ddp_norms, fsdp_norms = _logged_grad_norms(recipe_runs / "ddp"), _logged_grad_norms(recipe_runs / "fsdp")
    assert len(ddp_norms) == STEPS and min(ddp_norms) > MAX_GRAD_NORM
    torch.testing.assert_close(torch.tensor(fsdp_norms), torch.tensor(ddp_norms), atol=1e-5, rtol=1e-5)
    # Every rank evaluated the sharded model; the metrics are the DDP run's.
    ddp_eval, fsdp_eval = (json.loads((recipe_runs / run / "eval_results.json").read_text())["eval"]
                           for run in ("ddp", "fsdp"))
    assert fsdp_eval["acc1"] == pytest.approx(ddp_eval["acc1"]) and fsdp_eval["num_samples"] == 64
    # Saved as a NeuCLIPModel (not torch's FSDPNeuCLIPModel), with this package's code, not torch's.
    config = json.loads((recipe_runs / "fsdp" / "config.json").read_text())
    assert config["architectures"] == ["NeuCLIPModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_neuclip.NeuCLIPModel"
    assert not list((recipe_runs / "fsdp").glob("_fsdp*.py"))
    # The checkpoint holds the encoder optimizer as shards (one file per rank), not a rank-0 optimizer.pt.
    checkpoint = recipe_runs / "fsdp" / f"checkpoint-{SAVE_AT}"
    assert sorted(p.name for p in (checkpoint / "optimizer_fsdp").glob("*.distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    assert not (checkpoint / "optimizer.pt").exists() and (checkpoint / "model.safetensors").exists()


@pytest.mark.slow
def test_recipe_fsdp_encoders_resume_equals_straight_run(recipe_runs):
    straight, resumed = recipe_runs / "fsdp", recipe_runs / "resumed"
    _assert_same_weights(NeuCLIPModel.from_pretrained(straight).state_dict(),
                         NeuCLIPModel.from_pretrained(resumed).state_dict())
    norms = _logged_grad_norms(straight)
    torch.testing.assert_close(torch.tensor(_logged_grad_norms(resumed)), torch.tensor(norms), atol=1e-5, rtol=1e-5)
    final = f"checkpoint-{STEPS}/normalizer_optimizer.pt"
    a, b = (torch.load(run / final, weights_only=True)["optimizer"]["state"] for run in (straight, resumed))
    assert a.keys() == b.keys() and a
    for index in a:
        for key, value in a[index].items():
            torch.testing.assert_close(b[index][key], value, atol=1e-5, rtol=1e-5, msg=f"{index}.{key}")
