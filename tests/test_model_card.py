"""Model cards rendered offline: metadata, model-index from real evaluator metrics, per-objective citations."""

import pytest
from huggingface_hub import ModelCard
from hub_helpers import CLASSES, PROMPTS, eval_rows, hub_model

from neuclip_hf.evaluation import ZeroShotEvaluator
from neuclip_hf.model_card import TrainingSummary, build_model_card, build_normalizer_card, describe_hardware


@pytest.fixture(scope="module")
def metrics(clip_model, clip_processor):
    """Real zero-shot metrics of the session's small model on ten labelled images."""
    return ZeroShotEvaluator(clip_processor, eval_rows(), class_names=CLASSES, templates=PROMPTS)(clip_model)


@pytest.mark.parametrize("objective, citation", [("fastclip", "2407.01445"), ("siglip", "2303.15343"),
                                                 ("amorlip", "2505.18983")])
def test_card_metadata_metrics_and_citations(metrics, tmp_path, objective, citation):
    model = hub_model(objective=objective)
    training = TrainingSummary(training_data="laion/some-pairs", steps=1000, per_device_batch_size=256,
                               num_processes=8, learning_rate=1e-3, precision="bf16", hardware="8 x GPU",
                               training_seconds=5400.0, finetuned_from=str(tmp_path))  # a local path
    card = build_model_card(model, repo_id="user/model", training=training, eval_results=metrics,
                            eval_dataset="held-out pairs", tags=["demo"])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")  # what the Hub parses
    data = loaded.data
    assert data.pipeline_tag == "zero-shot-image-classification" and data.library_name == "transformers"
    assert data.license == "apache-2.0" and data.datasets == ["laion/some-pairs"]
    assert data.base_model is None  # a local directory is not a Hub id: not in the metadata
    assert {"neuclip_hf", objective, "demo"} <= set(data.tags)
    values = {e.metric_type: e.metric_value for e in data.eval_results}
    assert values["accuracy"] == pytest.approx(metrics["acc1"]) and values["top_5_accuracy"] == pytest.approx(
        metrics["acc5"])
    assert all(e.dataset_name == "held-out pairs" for e in data.eval_results)
    for needle in (citation, "2511.08417", "2103.00020", "| global batch (pairs per step) | 2048 |",
                   "| training time | 1.50 h |", "| precision | bf16 |"):
        assert needle in loaded.text, needle


def test_card_without_evaluation_has_no_model_index():
    card = build_model_card(hub_model(), repo_id="user/model")
    assert card.data.eval_results is None and "No evaluation was recorded during training." in card.text
    assert "| training data | not recorded |" in card.text


def test_normalizer_card():
    card = build_normalizer_card(hub_model(objective="amorlip"), repo_id="user/norm", source_model="user/model")
    assert card.data.base_model == "user/model" and "AmortizedNormalizer" in card.text
    assert 'load_normalizer(model, "user/norm")' in card.text and "2505.18983" in card.text


def test_describe_hardware():
    assert describe_hardware("cpu", 1) == "1 x CPU process"
    assert describe_hardware("cpu", 2) == "2 x CPU processes"
