"""FSDP2-sharded encoders against DDP, 2 gloo processes under `accelerate launch` (slow tier, hard timeouts).

The encoders are sharded with torch's `fully_shard` (each CLIP encoder layer one unit); the normalizer and the
scalar `logit_scale` stay whole (`fsdp_replicated_parameters`). After the same steps both give the same weights, and
a sharded torch.distributed.checkpoint saved mid-run and resumed in a new launch ends where the straight run ends.
"""

from pathlib import Path

import pytest
import torch
from helpers import launch_two_processes, tiny_config

from neuclip_hf import NeuCLIPModel
from neuclip_hf.distributed import average_replicated_gradients_, fsdp_replicated_parameters

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_vs_ddp.py"
TIMEOUT = 240  # seconds per launch; one takes ~20 s on 2 idle cores, so only a hang reaches it
STEPS, SAVE_AT = 4, 2


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
    assert "logit_scale" in FSDP_REFUSAL and "shard_encoders_fsdp2" in FSDP_REFUSAL
