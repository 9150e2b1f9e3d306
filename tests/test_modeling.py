"""NeuCLIPConfig validation, NeuCLIPModel outputs, save/load round trips and plain-CLIP interop."""

import json

import pytest
import torch
from helpers import OBJECTIVES, tiny_batch, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPModel,
)

from neuclip_hf import NeuCLIPConfig, NeuCLIPModel, NeuCLIPOutput
from neuclip_hf.presets import model_config


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("objective", "infonce", r"objective='infonce' is invalid: expected one of \('clip', 'siglip'"),
        ("eps", -1.0, "eps=-1.0 is invalid"),
        ("rho", -2.0, "rho=-2.0 is invalid: expected rho >= 0"),
        ("temperature_init", 5.0, r"temperature_init=5.0 is invalid: expected a value in \[0.01, 1.0\]"),
        ("temperature_min", 0.0, "temperature_min=0.0 is invalid"),
        ("neuclip_num_prototypes", 0, "neuclip_num_prototypes=0 is invalid: expected an integer >= 1"),
        ("neuclip_inner_steps", 0, "neuclip_inner_steps=0"),
        ("neuclip_restart_schedule", "cosine", "neuclip_restart_schedule='cosine' is invalid: expected one of"),
        ("neuclip_restart_source", "queue", "neuclip_restart_source='queue'"),
        ("neuclip_learning_rate", 0.0, "neuclip_learning_rate=0.0"),
        ("amorlip_ema_decay", 1.0, r"amorlip_ema_decay=1.0 is invalid: expected a value in \[0, 1\)"),
        ("amorlip_beta_max", 1.5, "amorlip_beta_max=1.5"),
        ("amorlip_estimate_source", "online", "amorlip_estimate_source='online'"),
        ("fastclip_gamma_min", 0.0, r"fastclip_gamma_min=0.0 is invalid: expected a value in \(0, 1\]"),
        ("fastclip_id_mode", "hash", "fastclip_id_mode='hash'"),
        ("fastclip_dataset_size", 1, "fastclip_dataset_size=1"),
        ("fastclip_gamma_schedule", "linear", r"fastclip_gamma_schedule='linear' is invalid: expected one of "
                                              r"\('stepped', 'continuous'\)"),
        ("fastclip_direction_reduction", "max", r"fastclip_direction_reduction='max' .* \('sum', 'mean'\)"),
        ("fastclip_temperature_gradient", "paper", r"fastclip_temperature_gradient='paper' .* \('objective', "
                                                   r"'release'\)"),
        ("rho_reference_batch", 1, "rho_reference_batch=1 is invalid: expected None or a global batch size >= 2"),
        ("train_num_samples", 0, "train_num_samples=0 is invalid: expected None or an integer >= 1"),
        ("amorlip_epoch_steps", 0, "amorlip_epoch_steps=0 is invalid: expected None or an integer >= 1"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        NeuCLIPConfig(**{field: value})


def test_fastclip_requires_dataset_size():
    with pytest.raises(ValueError, match="fastclip_dataset_size=None is invalid: expected the number of training"):
        NeuCLIPConfig(objective="fastclip")


def test_fastclip_table_sized_by_the_training_set_size():
    model = NeuCLIPModel(tiny_config("fastclip", fastclip_dataset_size=None, train_num_samples=48))
    assert model.normalizer.log_u.shape == (2, 48) and model.normalizer.epoch_samples == 48


def test_fixed_temperature_is_not_trained():
    model = NeuCLIPModel(tiny_config("neuclip", learn_temperature=False, temperature_init=0.05))
    assert not model.logit_scale.requires_grad
    out = model(**tiny_batch(8), return_loss=True, update_normalizer=True)
    out.loss.backward()
    assert model.logit_scale.grad is None and model.temperature == pytest.approx(0.05)


def test_temperature_init_defaults_and_sets_logit_scale():
    assert NeuCLIPConfig().temperature_init == 0.07
    assert NeuCLIPConfig(objective="siglip").temperature_init == 0.1
    config = NeuCLIPConfig(temperature_init=0.05)
    assert config.logit_scale_init_value == pytest.approx(torch.log(torch.tensor(20.0)).item())
    logit_scale = NeuCLIPModel(tiny_config(temperature_init=0.05)).logit_scale.detach()
    assert float(logit_scale) == pytest.approx(2.9957, abs=1e-4)  # log(1 / 0.05)


def test_config_json_round_trip(tmp_path):
    config = tiny_config("amorlip", amorlip_positive_weight=1e-3, rho=8.5)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "neuclip" and saved["objective"] == "amorlip"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NeuCLIPConfig)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(loaded) == without_path(config)


def test_model_preset_geometry():
    config = model_config("vit-b-32", objective="clip")
    assert config.vision_config.patch_size == 32 and config.vision_config.image_size == 224
    assert config.projection_dim == 512 and config.text_config.eos_token_id == 49407
    with pytest.raises(ValueError, match="unknown model preset 'vit-h'"):
        model_config("vit-h")


# -- model ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_forward_returns_loss_components_and_embeddings(objective):
    model = NeuCLIPModel(tiny_config(objective))
    out = model(**tiny_batch(8), return_loss=True, update_normalizer=True)
    assert isinstance(out, NeuCLIPOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.image_embeds.shape == out.text_embeds.shape == (8, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(8))
    assert out.logits_per_image.shape == (8, 8)
    assert all(v.ndim == 0 and not v.requires_grad for v in out.loss_components.values())
    assert isinstance(out.normalizer_diagnostics, dict)
    # Without return_loss no objective is computed and the estimator is untouched.
    plain = model(**tiny_batch(8))
    assert plain.loss is None and plain.loss_components is None


def test_parameter_names_are_clip_plus_normalizer():
    model = NeuCLIPModel(tiny_config("neuclip"))
    clip_names = set(CLIPModel(CLIPConfig(**{k: v for k, v in model.config.to_dict().items()
                                              if k in ("text_config", "vision_config", "projection_dim")}))
                     .state_dict())
    names = set(model.state_dict())
    assert clip_names <= names
    assert all(n.startswith("normalizer.") for n in names - clip_names)


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "siglip"])
def test_normalizer_gets_its_own_initialisation(objective):
    model = NeuCLIPModel(tiny_config(objective))
    if objective == "neuclip":
        # N(0, 1) prototypes (only their direction matters: they enter through a cosine).
        assert 0.8 < float(model.normalizer.text_prototypes.detach().std()) < 1.2
    elif objective == "amorlip":
        # PyTorch's default Linear init, not the CLIP default std 1.0.
        assert float(model.normalizer.online.image.fc1.weight.detach().std()) < 0.3
        torch.testing.assert_close(model.normalizer.online.image.fc1.weight, model.normalizer.target.image.fc1.weight)
    else:
        assert float(model.normalizer.logit_bias.detach()) == -10.0


def test_update_normalizer_flag_controls_state():
    model = NeuCLIPModel(tiny_config("neuclip"))
    batch = tiny_batch(8)
    model(**batch, return_loss=True)
    assert int(model.normalizer.num_updates) == 0
    model(**batch, return_loss=True, update_normalizer=True)
    assert int(model.normalizer.num_updates) == 1


def test_fastclip_without_sample_ids_raises():
    model = NeuCLIPModel(tiny_config("fastclip"))
    batch = tiny_batch(8)
    del batch["sample_ids"]
    with pytest.raises(ValueError, match="objective='fastclip' keeps per-sample state and needs `sample_ids`"):
        model(**batch, return_loss=True)


def test_nonfinite_embeddings_never_reach_the_estimator():
    model = NeuCLIPModel(tiny_config("neuclip"))
    state = {k: v.clone() for k, v in model.normalizer.state_dict().items()}
    image = torch.full((8, 16), float("nan"))
    text = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    loss, _, diagnostics = model.contrastive_loss(image, text, update_normalizer=True)
    assert not torch.isfinite(loss)
    assert diagnostics == {"skipped_nonfinite_batch": torch.tensor(1.0)}
    for name, value in model.normalizer.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_clamp_logit_scale():
    model = NeuCLIPModel(tiny_config())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.temperature == pytest.approx(0.01, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale_()
    assert model.temperature == pytest.approx(1.0)


def test_encode_methods_match_forward():
    model = NeuCLIPModel(tiny_config()).eval()
    batch = tiny_batch(4)
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    torch.testing.assert_close(model.encode_image(batch["pixel_values"]), out.image_embeds)
    torch.testing.assert_close(model.encode_text(batch["input_ids"]), out.text_embeds)


def test_wrong_config_type_is_refused():
    with pytest.raises(TypeError, match="NeuCLIPModel needs a NeuCLIPConfig"):
        NeuCLIPModel(CLIPConfig())


# -- save / load and interop -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_save_load_round_trip_is_bit_exact(tmp_path, objective):
    model = NeuCLIPModel(tiny_config(objective))
    model(**tiny_batch(8), return_loss=True, update_normalizer=True)  # non-trivial estimator state
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is NeuCLIPModel
    original, restored = model.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for name, value in original.items():
        assert torch.equal(value, restored[name]), name
    zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)
    assert type(zero_shot) is NeuCLIPModel


def test_clip_model_loads_neuclip_checkpoint_encoders(tmp_path):
    model = NeuCLIPModel(tiny_config("neuclip"))
    model.save_pretrained(tmp_path)
    clip = CLIPModel.from_pretrained(tmp_path)
    assert type(clip) is CLIPModel
    ours = model.state_dict()
    for name, value in clip.state_dict().items():
        assert torch.equal(value, ours[name]), name
    batch = tiny_batch(4)
    inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    torch.testing.assert_close(clip(**inputs).logits_per_image, model(**inputs).logits_per_image)


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "fastclip"])
def test_from_clip_pretrained_keeps_encoders_and_adds_normalizer(tmp_path, objective):
    clip_config = CLIPConfig(**{k: v for k, v in tiny_config().to_dict().items()
                                if k in ("text_config", "vision_config", "projection_dim")})
    torch.manual_seed(1)
    clip = CLIPModel(clip_config)
    with torch.no_grad():
        clip.logit_scale.fill_(4.0)
    clip.save_pretrained(tmp_path)
    model = NeuCLIPModel.from_clip_pretrained(  # train_num_samples: FastCLIP's table, AmorLIP's epoch length
        tmp_path, objective=objective, train_num_samples=100, neuclip_num_prototypes=8
    )
    assert model.config.objective == objective and model.config.model_type == "neuclip"
    assert model.normalizer.objective == objective
    for name, value in clip.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    model(**tiny_batch(8), return_loss=True, update_normalizer=True)  # trains out of the box


def test_from_clip_pretrained_refuses_unknown_overrides(tmp_path):
    NeuCLIPModel(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="objective='fast' is invalid"):
        NeuCLIPModel.from_clip_pretrained(tmp_path, objective="fast")


def test_saved_directory_loads_without_the_package(tmp_path):
    """trust_remote_code: the saved code files + auto_map load the model in a process that cannot import us."""
    import subprocess
    import sys

    model = NeuCLIPModel(tiny_config("neuclip"))
    model(**tiny_batch(8), return_loss=True, update_normalizer=True)
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert saved == {"AutoConfig": "configuration_neuclip.NeuCLIPConfig", "AutoModel": "modeling_neuclip.NeuCLIPModel",
                     "AutoModelForZeroShotImageClassification": "modeling_neuclip.NeuCLIPModel"}
    torch.save(model.state_dict(), tmp_path / "reference.pt")
    script = f"""
import sys
sys.modules["neuclip_hf"] = None  # the package must not be importable
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
reference = torch.load({str(tmp_path / 'reference.pt')!r})
assert type(model).__name__ == "NeuCLIPModel" and "transformers_modules" in type(model).__module__
assert set(reference) == set(model.state_dict())
assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
print("ok")
"""
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize(("old", "new"), ((True, "anchors"), (False, "replicated")))
def test_config_saved_with_the_renamed_shard_update_field_loads_with_its_split(tmp_path, old, new):
    """A config.json from before `neuclip_update_sharding` (bool `neuclip_shard_update`) loads, with the split its run
    had; a value the old field never took is an error naming both fields."""
    model = NeuCLIPModel(tiny_config("neuclip", neuclip_num_prototypes=8))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["neuclip_update_sharding"]
    saved["neuclip_shard_update"] = old
    config_file.write_text(json.dumps(saved))
    loaded = NeuCLIPModel.from_pretrained(tmp_path)
    assert loaded.config.neuclip_update_sharding == new and loaded.normalizer.update_sharding == new
    assert not hasattr(loaded.config, "neuclip_shard_update")
    torch.testing.assert_close(loaded.normalizer.text_prototypes, model.normalizer.text_prototypes)
    with pytest.raises(ValueError, match=r"NeuCLIPConfig.neuclip_shard_update='yes' \(renamed to "
                                         r"`neuclip_update_sharding`\) is invalid"):
        NeuCLIPConfig(neuclip_shard_update="yes")
