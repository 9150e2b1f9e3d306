"""Zero-shot inference: templates, prompt-ensemble classifier, ecosystem interop (pipeline, CLIPModel), bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, CLIPModel, pipeline
from zero_shot_helpers import random_images, save_model

from neuclip_hf.images import BadSampleError
from neuclip_hf.zero_shot import (
    ZeroShotClassifier,
    encode_images,
    encode_texts,
    load_templates,
    logit_scale,
    zero_shot_classifier,
    zero_shot_classify,
    zero_shot_retrieval,
)

PIPELINE_TEMPLATE = ["This is a photo of {}."]  # the pipeline's default hypothesis_template
CLASSES = ["t-shirt", "trouser", "ankle boot"]


def test_shipped_templates_load_by_name():
    openai, simple = load_templates("openai"), load_templates("simple")
    assert len(openai) == 80 and len(simple) == 7
    assert openai[0] == "a bad photo of a {}." and "itap of a {}." in simple
    assert load_templates(None) == openai
    assert all(template.count("{}") == 1 for template in openai + simple)


def test_templates_from_files_and_lists(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["a {}.", "the {}!"]}))
    (tmp_path / "t.txt").write_text("a {}.\n\nthe {}!\n")
    assert load_templates(tmp_path / "t.json") == load_templates(str(tmp_path / "t.txt")) == ["a {}.", "the {}!"]
    assert load_templates(("x {} y",)) == ["x {} y"]


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        (["a photo of a cat"], "no '{}' placeholder"),
        ([], "templates is empty"),
        ("imagenet-fancy", "unknown templates"),
        ("a photo of a {}.", "templates must be a list"),
    ],
)
def test_bad_templates_are_rejected(templates, message):
    with pytest.raises(ValueError, match=message):
        load_templates(templates)


def test_encoders_work_for_plain_clip_and_neuclip(tmp_path, clip_model):
    clip_model.save_pretrained(tmp_path)
    plain = CLIPModel.from_pretrained(tmp_path)
    pixels = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    assert torch.allclose(encode_images(clip_model, pixels), clip_model.encode_image(pixels), atol=1e-6)
    assert torch.allclose(encode_texts(clip_model, ids), clip_model.encode_text(ids), atol=1e-6)
    assert torch.allclose(encode_images(plain.eval(), pixels), encode_images(clip_model, pixels), atol=1e-6)
    assert torch.allclose(encode_images(clip_model, pixels).norm(dim=-1), torch.ones(3))


def test_template_averaging_equals_a_manual_computation(clip_model, clip_processor):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{} in a video game"]
    weights = zero_shot_classifier(clip_model, clip_processor, CLASSES, templates)
    assert weights.shape == (16, len(CLASSES))
    manual = []
    for name in CLASSES:
        rows = []
        for template in templates:
            tokens = clip_processor.tokenizer([template.replace("{}", name)], return_tensors="pt")
            with torch.no_grad():
                feature = clip_model.get_text_features(**tokens).pooler_output[0]
            rows.append(feature / feature.norm())  # normalise each prompt embedding
        mean = torch.stack(rows).mean(dim=0)
        manual.append(mean / mean.norm())  # average per class, renormalise
    assert torch.allclose(weights, torch.stack(manual, dim=1), atol=1e-6)


def test_zero_shot_classify_returns_probabilities(clip_model, clip_processor):
    images = random_images(5)
    probs = zero_shot_classify(clip_model, clip_processor, images, CLASSES, templates="simple")
    assert probs.shape == (5, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(5), atol=1e-6)
    classifier = ZeroShotClassifier(clip_model, clip_processor, CLASSES, templates="simple")
    weights = zero_shot_classifier(clip_model, clip_processor, CLASSES, "simple")
    pixels = clip_processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    expected = (logit_scale(clip_model) * encode_images(clip_model, pixels) @ weights).softmax(dim=-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    ranked = classifier(images, top_k=2)
    assert len(ranked) == 5 and [len(r) for r in ranked] == [2] * 5
    assert ranked[0][0]["score"] == pytest.approx(float(probs[0].max()), abs=1e-6)


def test_eval_mode_is_used_and_training_mode_restored(clip_model, clip_processor):
    clip_model.train()
    zero_shot_classifier(clip_model, clip_processor, CLASSES, PIPELINE_TEMPLATE)
    assert clip_model.training
    clip_model.eval()


def _pipeline_scores(directory, images, classes) -> torch.Tensor:
    classify = pipeline("zero-shot-image-classification", model=str(directory))
    outputs = classify(images, candidate_labels=classes)  # hypothesis_template defaults to PIPELINE_TEMPLATE
    return torch.tensor([[{o["label"]: o["score"] for o in out}[name] for name in classes] for out in outputs])


@pytest.mark.parametrize("kind", ["neuclip", "clip"])
def test_pipeline_clipmodel_and_our_api_agree(tmp_path, clip_model, clip_processor, kind):
    if kind == "clip":  # a plain CLIPModel directory, as transformers writes it
        plain = CLIPModel.from_pretrained(save_model(tmp_path / "src", clip_model, clip_processor))
        plain.save_pretrained(tmp_path / "model")
        clip_processor.save_pretrained(tmp_path / "model")
    else:
        save_model(tmp_path / "model", clip_model, clip_processor)
    directory = tmp_path / "model"
    images = random_images(4, seed=1)

    loaded = AutoModel.from_pretrained(directory)
    assert type(loaded).__name__ == ("NeuCLIPModel" if kind == "neuclip" else "CLIPModel")
    ours = ZeroShotClassifier(loaded, clip_processor, CLASSES, templates=PIPELINE_TEMPLATE).predict_proba(images)
    as_clip = CLIPModel.from_pretrained(directory)
    via_clip = zero_shot_classify(as_clip, clip_processor, images, CLASSES, templates=PIPELINE_TEMPLATE)
    via_pipeline = _pipeline_scores(directory, images, CLASSES)
    assert torch.allclose(ours, via_pipeline, atol=1e-5)
    assert torch.allclose(ours, via_clip, atol=1e-5)
    with torch.no_grad():  # and the scores are those of the in-memory clip_model
        original = zero_shot_classify(clip_model, clip_processor, images, CLASSES, templates=PIPELINE_TEMPLATE)
    assert torch.allclose(ours, original, atol=1e-6)


def test_zero_shot_retrieval_and_count_mismatch(clip_model, clip_processor):
    images = random_images(3, seed=2)
    captions = ["a photo of a cat.", "a dark trouser.", "an ankle boot.", "a sneaker."]
    metrics = zero_shot_retrieval(clip_model, clip_processor, images, captions, text_to_image=[0, 1, 2, 2])
    assert set(metrics) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert metrics["image_retrieval_recall@5"] == 1.0  # 3 candidates: always within the top 5
    with pytest.raises(ValueError, match="3 images but 4 captions"):
        zero_shot_retrieval(clip_model, clip_processor, images, captions)
    with pytest.raises(ValueError, match="text_to_image has 3 entries for 4 captions"):
        zero_shot_retrieval(clip_model, clip_processor, images, captions, text_to_image=[0, 1, 2])


def test_bad_input_errors(clip_model, clip_processor):
    with pytest.raises(ValueError, match="class_names is empty"):
        zero_shot_classifier(clip_model, clip_processor, [], "simple")
    with pytest.raises(ValueError, match="duplicates"):
        zero_shot_classifier(clip_model, clip_processor, ["cat", "cat"], "simple")
    with pytest.raises(ValueError, match="no '{}' placeholder"):
        ZeroShotClassifier(clip_model, clip_processor, CLASSES, templates=["a photo"])
    with pytest.raises(BadSampleError, match="image 1: image_undecodable"):
        images = [random_images(1)[0], b"not an image"]
        zero_shot_classify(clip_model, clip_processor, images, CLASSES, PIPELINE_TEMPLATE)


def test_classifier_weights_are_unit_columns(clip_model, clip_processor):
    weights = zero_shot_classifier(clip_model, clip_processor, CLASSES, "openai")
    assert torch.allclose(weights.norm(dim=0), torch.ones(len(CLASSES)), atol=1e-6)
    assert torch.allclose(weights, F.normalize(weights, dim=0))
