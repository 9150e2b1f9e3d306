"""Continued pretraining from a CLIP checkpoint (`--init_from`): encoders, tokenizer and processor loaded, encoder
weights unchanged until the first encoder update, the normalizer warm-started before it by its method's rule.

The real OpenAI weights cannot be downloaded here: the path is tested on a locally saved CLIP checkpoint, and a test
that needs OpenAI's ViT-B/32 reads a local copy from $NEUCLIP_OPENAI_CLIP_DIR (skipped when it is unset).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hub_helpers import CaptionPairs
from transformers import CLIPConfig, CLIPModel
from zero_shot_helpers import SMALL_TOWER, small_processor

from neuclip_hf import NeuCLIPModel
from neuclip_hf.arguments import ModelArguments
from neuclip_hf.model_setup import build_model, build_processor
from neuclip_hf.normalizers import build_normalizer
from neuclip_hf.objectives import NormalizerInputs
from neuclip_hf.presets import CLIP_TOKEN_IDS
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments

OPENAI_DIR = os.environ.get("NEUCLIP_OPENAI_CLIP_DIR")
CHEAP_ESTIMATORS = "neuclip_num_prototypes=64,neuclip_inner_steps=3,fastclip_dataset_size=32,amorlip_epoch_steps=4"


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A plain `CLIPModel` (real CLIP vocabulary, T = 0.05) saved with its processor, as OpenAI's repository is."""
    torch.manual_seed(0)
    text = {**SMALL_TOWER, **CLIP_TOKEN_IDS, "max_position_embeddings": 32, "num_hidden_layers": 2}
    vision = {**SMALL_TOWER, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                        logit_scale_init_value=math.log(1 / 0.05))
    directory = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(directory)
    small_processor().save_pretrained(directory)
    return directory


def run_first_step(model, processor, tmp_path, objective):
    """Train one step; returns (the first batch, the encoder weights and a normalizer copy seen just before the
    first encoder update, the model's state after the step)."""
    seen = {}

    def capture_batch(module, args, kwargs):
        seen.setdefault("batch", {k: kwargs[k] for k in ("input_ids", "pixel_values", "sample_ids")})

    def capture_state(optimizer, args, kwargs):  # runs before the first AdamW step, after the estimator update
        if "encoders" not in seen:
            state = trainer.core_model.state_dict()
            seen["encoders"] = {k: v.clone() for k, v in state.items() if not k.startswith("normalizer.")}
            seen["normalizer"] = {k[len("normalizer."):]: v.clone() for k, v in state.items()
                                  if k.startswith("normalizer.")}

    args = NeuCLIPTrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                    report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                                    learning_rate=1e-3, warmup_steps=0, lr_scheduler_type="constant")
    trainer = NeuCLIPTrainer(model=model, args=args, train_dataset=CaptionPairs(processor, n=32),
                             processing_class=processor)
    model.register_forward_pre_hook(capture_batch, with_kwargs=True)
    trainer.create_optimizer()
    trainer.optimizer.register_step_pre_hook(capture_state)
    trainer.train()
    return seen, {k: v.clone() for k, v in trainer.core_model.state_dict().items()}


def reference_inputs(checkpoint, batch, eps) -> NormalizerInputs:
    """The first batch's statistics computed from the CLIP checkpoint itself (what the warm start must see)."""
    clip = CLIPModel.from_pretrained(checkpoint).train()  # training mode, as in the trainer (CLIP has no dropout)
    with torch.no_grad():
        image = F.normalize(clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        text = F.normalize(clip.get_text_features(input_ids=batch["input_ids"]).pooler_output, dim=-1)
    return NormalizerInputs.from_embeddings(image, text, torch.exp(-clip.logit_scale), eps,
                                            sample_ids=batch["sample_ids"])


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "fastclip", "siglip", "clip"])
def test_new_normalizer_starts_from_its_initial_state(clip_checkpoint, tmp_path, objective):
    """The checkpoint has no normalizer: its buffers must start at their initial values (loading materialises
    missing tensors uninitialised; a garbage step counter would skip NeuCLIP's step-0 restart, for example)."""
    # train_num_samples: the training-set size (FastCLIP's table, AmorLIP's epoch length)
    overrides = dict(neuclip_num_prototypes=64, train_num_samples=32, fastclip_id_mode="map")
    model = NeuCLIPModel.from_clip_pretrained(clip_checkpoint, objective=objective, **overrides)
    fresh = NeuCLIPModel(model.config)
    for name, value in fresh.normalizer.named_buffers():
        assert torch.equal(model.normalizer.get_buffer(name), value), name
    if objective == "siglip":
        assert model.normalizer.logit_bias.item() == -10.0
    # A full NeuCLIP checkpoint, in contrast, keeps its trained state (the reset only touches missing tensors).
    model(**CaptionPairs(small_processor(), n=4).rows, return_loss=True, update_normalizer=True)
    model.save_pretrained(tmp_path / "neuclip")
    reloaded = NeuCLIPModel.from_pretrained(tmp_path / "neuclip")
    for name, value in model.normalizer.state_dict().items():
        assert torch.equal(reloaded.normalizer.state_dict()[name], value), name


@pytest.mark.parametrize("objective", ["neuclip", "amorlip", "fastclip"])
def test_init_from_a_saved_clip_keeps_encoders_and_warm_starts_the_normalizer(clip_checkpoint, tmp_path, objective):
    args = ModelArguments(objective=objective, init_from=str(clip_checkpoint), config_overrides=CHEAP_ESTIMATORS)
    model = build_model(args)
    processor = build_processor(args, model)
    # Tokenizer and image processor come from the checkpoint; the temperature is the checkpoint's.
    saved = small_processor()
    assert processor.tokenizer("a photo of a cat").input_ids == saved.tokenizer("a photo of a cat").input_ids
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert model.temperature == pytest.approx(0.05) and model.config.temperature_init == pytest.approx(0.05)
    clip_state = CLIPModel.from_pretrained(clip_checkpoint).state_dict()

    seen, after = run_first_step(model, processor, tmp_path, objective)
    # Step 0, after the estimator's update and before the first encoder update: the checkpoint's encoders exactly.
    assert set(seen["encoders"]) == set(clip_state)
    for name, value in clip_state.items():
        assert torch.equal(seen["encoders"][name], value), name
    assert any(not torch.equal(after[name], value) for name, value in clip_state.items())  # then they train

    inputs = reference_inputs(clip_checkpoint, seen["batch"], model.config.eps)
    normalizer = build_normalizer(model.config)
    normalizer.load_state_dict(seen["normalizer"])
    assert int(normalizer.num_updates) == 1  # exactly one estimator update happened before the encoder update
    if objective == "neuclip":
        # Restart at step 0 (prototypes from the first batch's embeddings), then T_u AdaGrad steps.
        assert int(normalizer.num_restarts) == 1
        expected = build_normalizer(model.config)
        expected.update(inputs)
        torch.testing.assert_close(normalizer.text_prototypes, expected.text_prototypes, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(normalizer.image_prototypes, expected.image_prototypes, atol=1e-5, rtol=1e-4)
    elif objective == "amorlip":
        # Epoch 0: beta = 0, so the encoders divide by the in-batch partition sum (no untrained network in the loss).
        assert float(normalizer.beta) == 0.0
        estimate = normalizer.estimate(inputs)
        torch.testing.assert_close(estimate[0], inputs.log_g_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(estimate[1], inputs.log_g_text, atol=1e-4, rtol=1e-4)
    else:
        # FastCLIP: u = ghat at a sample's first visit; untouched rows stay unseen.
        ids = seen["batch"]["sample_ids"]
        torch.testing.assert_close(normalizer.log_u[0, ids], inputs.log_g_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normalizer.log_u[1, ids], inputs.log_g_text, atol=1e-5, rtol=1e-5)
        assert int(normalizer.seen.sum()) == len(ids) and bool(normalizer.seen[ids].all())


@pytest.mark.skipif(not OPENAI_DIR, reason="set NEUCLIP_OPENAI_CLIP_DIR to a local openai/clip-vit-base-patch32")
def test_openai_clip_vit_b32(tmp_path):
    """OpenAI's ViT-B/32 from a local directory: its tokenizer, encoders unchanged at step 0, normalizer warm start."""
    args = ModelArguments(objective="neuclip", init_from=OPENAI_DIR,
                          config_overrides="neuclip_num_prototypes=256,neuclip_inner_steps=2")
    model = build_model(args)
    processor = build_processor(args, model)
    assert model.config.projection_dim == 512 and model.config.vision_config.patch_size == 32
    assert processor("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert model.temperature == pytest.approx(0.01, abs=1e-3)  # OpenAI's learned 1/T = 100
    clip_state = CLIPModel.from_pretrained(OPENAI_DIR).state_dict()
    seen, _ = run_first_step(model, processor, tmp_path, "neuclip")
    for name, value in clip_state.items():
        if name in seen["encoders"]:  # position_ids buffers may differ in presence across versions
            assert torch.equal(seen["encoders"][name], value), name
    assert int(seen["normalizer"]["num_restarts"]) == 1 and int(seen["normalizer"]["num_updates"]) == 1
