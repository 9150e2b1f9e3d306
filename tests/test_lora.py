"""LoRA through peft: adapters on both towers, the normalizer trained in full, save / reload / merge, exact resume."""

import gc
import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import tiny_batch, tiny_config
from peft import LoraConfig, get_peft_model
from hub_helpers import embeddings_and_logits as outputs
from trainer_helpers import assert_same_final_state, make_trainer
from zero_shot_helpers import small_processor

from neuclip_hf import NeuCLIPModel
from neuclip_hf.hub import NORMALIZER_CONFIG_NAME, NORMALIZER_WEIGHTS_NAME
from neuclip_hf.lora import apply_lora, load_lora, lora_summary, merge_lora, save_lora

LORA = dict(r=4, alpha=8.0)


def test_adapters_on_both_towers_and_normalizer_fully_trainable():
    model = apply_lora(NeuCLIPModel(tiny_config("amorlip")), r=4, alpha=8.0, target_modules="q_proj,v_proj")
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    # 2 layers x {q, v} in each tower, nothing in the normalizer.
    assert len(adapted) == 8 and all(("text_model" in n) != ("vision_model" in n) for n in adapted)
    assert sum("text_model" in n for n in adapted) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    online = {f"base_model.model.normalizer.{n}" for n, _ in model.get_base_model().normalizer.online.named_parameters(
        prefix="online")}
    assert trainable == online  # AmorLIP's EMA / previous-epoch networks stay frozen, the temperature too
    assert lora_summary(model) == {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "q_proj, v_proj"}


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "siglip"])
def test_lora_training_updates_adapters_and_normalizer_only(tmp_path, objective):
    trainer = make_trainer(objective, tmp_path, 3, lora=LORA)
    before = {k: v.clone() for k, v in trainer.core_model.state_dict().items()}
    trainer.train()
    after = trainer.core_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_B" in k for k in changed)
    assert any(k.startswith("normalizer.") for k in changed)
    frozen = [k for k in changed if "lora_" not in k and not k.startswith("normalizer.")]
    assert frozen == []  # base encoder weights and the temperature are untouched
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    optimized = {names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]}
    encoder_side = {n for n in optimized if "lora_" not in n}
    assert encoder_side == ({"base_model.model.normalizer.logit_bias"} if objective == "siglip" else set())
    if objective != "siglip":
        assert trainer.normalizer.optimizer is not None and trainer.normalizer.optimizer.state


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "siglip"])
def test_lora_resume_equals_uninterrupted_run(tmp_path, objective):
    """N steps, checkpoint (adapter + normalizer + its optimizer), resume in a fresh trainer, N more == 2N steps."""
    steps = 6
    full = make_trainer(objective, tmp_path / "full", steps, lora=LORA, save_steps=steps // 2)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{steps // 2}"
    saved = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", NORMALIZER_WEIGHTS_NAME, NORMALIZER_CONFIG_NAME} <= saved
    assert "model.safetensors" not in saved  # the frozen base is not duplicated into every checkpoint
    resumed = make_trainer(objective, tmp_path / "resumed", steps, lora=LORA, save_steps=steps // 2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert_same_final_state(full, resumed)


def test_train_save_reload_and_merge_give_equal_outputs(tmp_path):
    torch.manual_seed(0)
    base = NeuCLIPModel(tiny_config("neuclip"))
    base.save_pretrained(tmp_path / "base")
    trainer = make_trainer("neuclip", tmp_path / "run", 3, lora=LORA)
    # make_trainer seeds the same initialisation: its base weights are the saved ones.
    assert torch.equal(trainer.core_model.text_projection.weight, base.text_projection.weight)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", NORMALIZER_WEIGHTS_NAME} <= set(
        os.listdir(tmp_path / "adapter"))
    trained = trainer.model
    batch = tiny_batch(8, seed=3)
    expected = outputs(trained, batch)

    reloaded = load_lora(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    for name, value in outputs(reloaded, batch).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6, msg=name)
    normalizer = trained.get_base_model().normalizer.state_dict()
    for name, value in reloaded.get_base_model().normalizer.state_dict().items():
        assert torch.equal(value, normalizer[name]), name

    merged = merge_lora(reloaded)
    assert type(merged) is NeuCLIPModel and not any("lora_" in n for n, _ in merged.named_parameters())
    for name, value in outputs(merged, batch).items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    merged.save_pretrained(tmp_path / "merged")  # a plain checkpoint: loads without peft
    again = NeuCLIPModel.from_pretrained(tmp_path / "merged")
    for name, value in outputs(again, batch).items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(again.normalizer.text_prototypes, trained.get_base_model().normalizer.text_prototypes)

    # The same through the recipe, which also carries the processor saved next to the adapter.
    small_processor().save_pretrained(tmp_path / "adapter")
    recipe = load_recipe("merge_lora")
    recipe.main(["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
                 "--output", str(tmp_path / "recipe_merged")])
    from_recipe = NeuCLIPModel.from_pretrained(tmp_path / "recipe_merged")
    for name, value in outputs(from_recipe, batch).items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert (tmp_path / "recipe_merged" / "tokenizer.json").is_file()


def load_recipe(name: str):
    """A recipe script as a module (recipes/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_lora_then_continue_training(tmp_path):
    model = apply_lora(NeuCLIPModel(tiny_config("neuclip")), **LORA)
    model.get_base_model().save_pretrained(tmp_path / "base")  # adapters still zero: the base weights
    model(**tiny_batch(8), return_loss=True, update_normalizer=True)
    save_lora(model, tmp_path / "adapter")
    resumed = load_lora(tmp_path / "adapter", base_model=str(tmp_path / "base"), is_trainable=True)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for p in resumed.get_base_model().normalizer.parameters())
    assert int(resumed.get_base_model().normalizer.num_updates) == 1  # counters restored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ignores_the_normalizer_by_its_wrapped_names():
    """Under DDP the normalizer's state must be named as the PeftModel names it, or DDP waits for gradients that
    its own optimizer never produces (a reduction error on the second step)."""
    import torch.distributed as dist

    model = apply_lora(NeuCLIPModel(tiny_config("neuclip")), **LORA)
    names = set(model._ddp_params_and_buffers_to_ignore)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    assert names <= set(state) and "base_model.model.normalizer.text_prototypes" in names
    assert {n for n in state if ".normalizer." in n} == names
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ddp = None
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert names <= ddp.parameters_to_ignore
        for seed in range(2):  # the second forward fails if the previous reduction waited on normalizer gradients
            ddp(**tiny_batch(8, seed=seed), return_loss=True, update_normalizer=True).loss.backward()
    finally:
        # Free DDP's reducer while its process group is alive: destroying the group first can leave the reducer's
        # gloo destructor waiting forever on a thread of the torn-down group.
        del ddp
        gc.collect()
        dist.destroy_process_group()


def test_peft_wrappings_that_freeze_or_shadow_the_normalizer_are_refused(tmp_path):
    trainer = make_trainer("neuclip", tmp_path, 1)
    plain = get_peft_model(NeuCLIPModel(tiny_config("neuclip")), LoraConfig(r=4, target_modules=["q_proj"]))
    trainer.model = plain
    trainer.optimizer = None
    with pytest.raises(TypeError, match="froze the normalizer; wrap the model with neuclip_hf.lora.apply_lora"):
        trainer.create_optimizer()
    shadowed = get_peft_model(NeuCLIPModel(tiny_config("neuclip")),
                              LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["normalizer"]))
    trainer.model = shadowed
    with pytest.raises(TypeError, match="modules_to_save module, whose wrapper shadows the estimator's methods"):
        trainer.create_optimizer()
