"""Zero-shot classification and retrieval metrics against hand-computed cases, and the offline evaluate modules."""

import pytest
import torch
import torch.nn.functional as F

from neuclip_hf.metrics import (
    classification_metrics,
    hit_probability,
    load_metric,
    pairs_to_retrieval_inputs,
    retrieval_metrics,
)


def test_classification_hand_computed_without_acc5_below_five_classes():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 0])
    results = classification_metrics(logits, labels)
    assert set(results) == {"acc1", "mean_per_class_recall"}  # acc5 only with >= 5 classes
    assert results["acc1"] == pytest.approx(2 / 4)
    # class 0: 1 of 2 right, class 1: 1 of 1, class 2: 0 of 1
    assert results["mean_per_class_recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_acc5_appears_with_five_classes():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    results = classification_metrics(logits, torch.tensor([4, 1]))
    assert results == pytest.approx({"acc1": 0.0, "acc5": 1.0, "mean_per_class_recall": 0.0})
    assert "acc5" not in classification_metrics(logits[:, :4], torch.tensor([3, 1]))


def test_mean_per_class_recall_with_imbalanced_classes_and_an_absent_class():
    # four class-0 samples all right, one class-1 sample wrong, class 2 never occurs in the labels
    logits = torch.tensor([[2.0, 0.0, 0.0]] * 4 + [[2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    results = classification_metrics(logits, labels)
    assert results["acc1"] == pytest.approx(0.8)
    assert results["mean_per_class_recall"] == pytest.approx(0.5)  # (1 + 0) / 2: absent classes are not averaged


def test_ties_count_by_their_expected_value():
    # a two-way tie at the top: the true class wins the random tie-break half of the time
    assert classification_metrics(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]))["acc1"] == pytest.approx(0.5)
    # a collapsed model (all scores equal) scores chance, whatever the label order
    flat = classification_metrics(torch.zeros(10, 10), torch.arange(10))
    assert flat == pytest.approx({"acc1": 0.1, "acc5": 0.5, "mean_per_class_recall": 0.1})
    # one class strictly above, the true class tied with three others just below: top-1 misses; top-5 has
    # 4 places for the 4-way tie (always in); top-3 has 2 places for the 4-way tie (2/4)
    row = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    assert classification_metrics(row, torch.tensor([1])) == pytest.approx(
        {"acc1": 0.0, "acc5": 1.0, "mean_per_class_recall": 0.0}
    )
    hits = hit_probability(torch.tensor([1]), torch.tensor([3]), torch.tensor([1]), ks=(1, 3, 5))
    assert [float(hits[k]) for k in (1, 3, 5)] == pytest.approx([0.0, 0.5, 1.0])


def test_tied_positives_share_the_top_places():
    # best positive tied with one other positive and one negative: a single top-1 place goes to a positive 2/3
    hits = hit_probability(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), ks=(1, 2))
    assert float(hits[1]) == pytest.approx(2 / 3)
    assert float(hits[2]) == pytest.approx(1.0)  # two places: at most one can go to the single negative
    # no positive at all never counts
    assert float(hit_probability(torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), ks=(5,))[5]) == 0.0


def test_nan_scores_rank_last():
    results = classification_metrics(torch.tensor([[float("nan"), 1.0, 0.0], [2.0, float("nan"), 0.0]]),
                                     torch.tensor([0, 0]))
    assert results["acc1"] == pytest.approx(0.5)


# Retrieval: image embeddings are the identity, so text_embeds[t] is directly the row of scores of text t.
SCORES = torch.tensor([
    [0.1, 0.9, 0.0],  # text 0 (image 0): image 1 ranks above -> miss @1, hit @2
    [0.8, 0.2, 0.1],  # text 1 (image 0): hit @1
    [0.3, 0.3, 0.5],  # text 2 (image 1): image 2 above, tied with image 0 -> @2 is 1/2, @3 hit
    [0.0, 0.1, 0.7],  # text 3 (image 2): hit @1
    [0.6, 0.0, 0.2],  # text 4 (image 2): image 0 above -> hit @2
])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def test_retrieval_hand_computed_with_multiple_positives():
    results = retrieval_metrics(torch.eye(3), SCORES, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert results["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert results["image_retrieval_recall@2"] == pytest.approx((1 + 1 + 0.5 + 1 + 1) / 5)
    assert results["image_retrieval_recall@3"] == pytest.approx(1.0)
    # image queries (columns): image 0's texts 0 and 1 -> text 1 (0.8) is the top text, a hit although text 0
    # ranks 4th; image 1's only text (0.3) is below text 0 (0.9); image 2's texts 3 (0.7) and 4 -> top
    assert results["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert results["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert list(results)[:3] == [f"image_retrieval_recall@{k}" for k in (1, 2, 3)]


def test_images_without_texts_are_candidates_but_not_queries():
    image_embeds = torch.eye(4)  # image 3 has no caption
    scores = torch.cat([SCORES, torch.zeros(5, 1)], dim=1)
    scores[0, 3] = 0.95  # image 3 is now the top image for text 0
    results = retrieval_metrics(image_embeds, scores, TEXT_TO_IMAGE, ks=(1, 2))
    assert results["image_retrieval_recall@2"] == pytest.approx((0 + 1 + 0.5 + 1 + 1) / 5)
    assert results["text_retrieval_recall@1"] == pytest.approx(2 / 3)  # still 3 image queries


def _topk_reference(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's definition on tie-free scores: any positive among the top-k indices."""
    top = scores.topk(k, dim=1).indices
    return float(positives.gather(1, top).any(dim=1).float().mean())


def test_chunked_equals_unchunked_and_matches_topk_reference():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    text_to_image = torch.randint(0, 40, (120,), generator=generator)
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(120, 8, generator=generator), dim=-1)
    full = retrieval_metrics(images, texts, text_to_image, chunk_size=100_000)
    assert retrieval_metrics(images, texts, text_to_image, chunk_size=7) == pytest.approx(full, abs=1e-12)

    scores = texts @ images.T
    positives = F.one_hot(text_to_image, 40).bool()
    has_text = positives.any(dim=0)
    for k in (1, 5, 10):
        assert full[f"image_retrieval_recall@{k}"] == pytest.approx(_topk_reference(scores, positives, k))
        reference = _topk_reference(scores.T[has_text], positives.T[has_text], k)
        assert full[f"text_retrieval_recall@{k}"] == pytest.approx(reference)

    logits = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 7, (50,), generator=generator)
    assert classification_metrics(logits, labels, chunk_size=3) == pytest.approx(classification_metrics(logits, labels))
    onehot = F.one_hot(labels, 7).bool()
    assert classification_metrics(logits, labels)["acc5"] == pytest.approx(_topk_reference(logits, onehot, 5))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected logits"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_metrics(torch.eye(3), SCORES, TEXT_TO_IMAGE[:4])
    with pytest.raises(ValueError, match="must index"):
        retrieval_metrics(torch.eye(2), SCORES[:, :2], TEXT_TO_IMAGE)


def test_evaluate_modules_load_offline_by_path_and_match_the_functions(tmp_hf_home):
    accuracy = load_metric("zero_shot_classification")
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.5, 0.2], [0.0, 2.0, 1.0, 0.1, 0.3], [1.0, 0.0, 5.0, 0.0, 0.0]])
    labels = [0, 2, 0]
    for row, label in zip(logits.tolist(), labels):  # streaming, like an eval loop
        accuracy.add(predictions=row, references=label)
    assert accuracy.compute() == pytest.approx(classification_metrics(logits, labels))

    recall = load_metric("retrieval_recall")
    pair_images = torch.eye(3)[TEXT_TO_IMAGE]  # one row per (text, image) pair, images repeated per caption
    recall.add_batch(text_embeds=SCORES[:2], image_embeds=pair_images[:2], image_ids=TEXT_TO_IMAGE[:2])
    recall.add_batch(text_embeds=SCORES[2:], image_embeds=pair_images[2:], image_ids=TEXT_TO_IMAGE[2:])
    expected = retrieval_metrics(torch.eye(3), SCORES, TEXT_TO_IMAGE, ks=(1, 2))
    assert recall.compute(ks=[1, 2]) == pytest.approx(expected)


def test_pairs_to_retrieval_inputs_deduplicates_images():
    embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    images, text_to_image = pairs_to_retrieval_inputs(embeds, [7, 3, 7])
    assert images.tolist() == [[0.0, 1.0], [1.0, 0.0]]  # ids sorted: 3, 7
    assert text_to_image.tolist() == [1, 0, 1]
