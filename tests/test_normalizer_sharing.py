"""The normalizer on its own: save / load (safetensors + JSON), warm start from a normalizer or a full model, and
clear refusals of another objective or other shapes."""

import json

import pytest
import torch
from helpers import OBJECTIVES, tiny_batch, tiny_config
from safetensors import safe_open

from neuclip_hf import NeuCLIPModel
from neuclip_hf.arguments import ModelArguments
from neuclip_hf.hub import NORMALIZER_CONFIG_NAME, NORMALIZER_WEIGHTS_NAME, load_normalizer, save_normalizer
from neuclip_hf.model_setup import build_model


def trained(objective: str, steps: int = 2, **overrides) -> NeuCLIPModel:
    """A tiny model whose normalizer has been updated `steps` times (counters, tables, banks all non-trivial)."""
    torch.manual_seed(0)
    model = NeuCLIPModel(tiny_config(objective, **overrides))
    for seed in range(steps):
        model(**tiny_batch(8, seed=seed), return_loss=True, update_normalizer=True)
    return model


def assert_same_normalizer(a: NeuCLIPModel, b: NeuCLIPModel) -> None:
    expected = a.normalizer.state_dict()
    actual = b.normalizer.state_dict()
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_save_and_load_round_trip(tmp_path, objective):
    source = trained(objective)
    written = save_normalizer(source, tmp_path / "norm")
    assert {p.name for p in written} == {NORMALIZER_CONFIG_NAME, NORMALIZER_WEIGHTS_NAME}
    description = json.loads((tmp_path / "norm" / NORMALIZER_CONFIG_NAME).read_text())
    assert description["objective"] == objective and description["projection_dim"] == 16
    assert description["normalizer_class"] == type(source.normalizer).__name__
    with safe_open(str(tmp_path / "norm" / NORMALIZER_WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(source.normalizer.state_dict())  # keys relative to model.normalizer
        assert f.metadata()["objective"] == objective
    target = NeuCLIPModel(tiny_config(objective))
    report = load_normalizer(target, tmp_path / "norm")
    assert report["differences"] == {} and report["tensors"] == len(source.normalizer.state_dict())
    assert_same_normalizer(source, target)
    # The warm-started estimator gives the same estimate on a new batch as the one it was saved from.
    batch = tiny_batch(8, seed=9)
    target.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("normalizer.")},
                           strict=False)
    torch.testing.assert_close(target(**batch, return_loss=True).loss, source(**batch, return_loss=True).loss)


def test_load_from_a_full_model_directory(tmp_path):
    source = trained("amorlip", steps=5)  # past an AmorLIP epoch boundary: previous-epoch networks in use
    source.save_pretrained(tmp_path / "model")
    target = NeuCLIPModel(tiny_config("amorlip"))
    load_normalizer(target, tmp_path / "model")
    assert_same_normalizer(source, target)
    assert bool(target.normalizer.has_previous)
    # Sharded weights: only the index and the shards holding normalizer tensors are read.
    source.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = NeuCLIPModel(tiny_config("amorlip"))
    load_normalizer(sharded, tmp_path / "sharded")
    assert_same_normalizer(source, sharded)


def test_warm_start_through_model_arguments(tmp_path):
    source = trained("neuclip", steps=3)
    save_normalizer(source, tmp_path / "norm")
    args = ModelArguments(objective="neuclip", config_overrides=json.dumps(
        dict(text_config=tiny_config().text_config.to_dict(), vision_config=tiny_config().vision_config.to_dict(),
             projection_dim=16, neuclip_num_prototypes=32)), init_normalizer_from=str(tmp_path / "norm"))
    model = build_model(args)
    assert_same_normalizer(source, model)
    assert int(model.normalizer.num_updates) == 3  # the estimator continues from its saved counters


def test_other_objective_is_refused(tmp_path):
    save_normalizer(trained("amorlip"), tmp_path / "norm")
    with pytest.raises(ValueError, match=r"trained for objective='amorlip', but this model uses "
                                         r"objective='neuclip': a normalizer only carries over within one objective"):
        load_normalizer(NeuCLIPModel(tiny_config("neuclip")), tmp_path / "norm")


def test_other_shapes_are_refused_with_the_differing_fields(tmp_path):
    save_normalizer(trained("neuclip"), tmp_path / "norm")
    target = NeuCLIPModel(tiny_config("neuclip", neuclip_num_prototypes=64))
    before = target.normalizer.text_prototypes.clone()
    with pytest.raises(ValueError, match=r"text_prototypes: saved \(32, 16\), model \(64, 16\).*"
                                         r"'neuclip_num_prototypes': \(32, 64\)"):
        load_normalizer(target, tmp_path / "norm")
    assert torch.equal(target.normalizer.text_prototypes, before)  # nothing was half-loaded
    no_bank = NeuCLIPModel(tiny_config("neuclip", neuclip_restart_source="batch"))
    with pytest.raises(ValueError, match=r"unexpected bank_count.*'neuclip_restart_source': \('bank', 'batch'\)"):
        load_normalizer(no_bank, tmp_path / "norm")


def test_shape_compatible_hyperparameter_changes_are_reported(tmp_path):
    save_normalizer(trained("neuclip"), tmp_path / "norm")
    target = NeuCLIPModel(tiny_config("neuclip", neuclip_inner_steps=3))
    report = load_normalizer(target, tmp_path / "norm")
    assert report["differences"] == {"neuclip_inner_steps": (10, 3)}  # the model's value is kept
    assert target.normalizer.inner_steps == 3


def test_checkpoints_without_a_normalizer_are_refused(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(text_config=tiny_config().text_config.to_dict(),
                                vision_config=tiny_config().vision_config.to_dict(), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="is a clip checkpoint: it holds no normalizer"):
        load_normalizer(NeuCLIPModel(tiny_config("neuclip")), tmp_path / "clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither a normalizer_config.json nor a model config.json"):
        load_normalizer(NeuCLIPModel(tiny_config("neuclip")), tmp_path / "empty")
