"""Zero-shot classification and retrieval metrics with CLIP_benchmark's names and definitions.

- `acc1`, `acc5` (only with at least 5 classes): the true class is among the k highest-scoring classes.
- `mean_per_class_recall`: top-1 recall of each class present in the labels, averaged over those classes
  (scikit-learn's `balanced_accuracy_score`, as CLIP_benchmark uses it).
- `image_retrieval_recall@k` (text query -> images) and `text_retrieval_recall@k` (image query -> texts): a query
  counts when ANY of its positives is among the k highest-scoring candidates (the CLIP-paper convention).

Ties are resolved by their expected value under uniformly random tie-breaking, so results never depend on the
order of the candidates: a collapsed model whose scores are all equal gets chance accuracy (1 / classes), not
the accuracy of whichever class happens to come first. Without ties this is exactly the top-k definition.

Scores are computed chunk by chunk (`chunk_size` queries at a time, on the device of the inputs), so retrieval
over N items never holds an N x N matrix. The same metrics are offered as `evaluate` modules that load by path
offline: `load_metric("zero_shot_classification")`, `load_metric("retrieval_recall")`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
METRICS_DIR = Path(__file__).parent  # the `evaluate` modules live in sub-folders of this package
METRIC_MODULES = {name: METRICS_DIR / name / f"{name}.py" for name in ("zero_shot_classification", "retrieval_recall")}


def _as_tensor(value, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    return tensor if dtype is None else tensor.to(dtype)


def hit_probability(
    greater: torch.Tensor, equal: torch.Tensor, tied_positives: torch.Tensor, ks: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """Per-query probability that a positive is in the top k, with ties broken uniformly at random.

    Args:
        greater: (Q,) negatives scoring strictly above the query's best positive.
        equal: (Q,) negatives scoring exactly as high as the best positive.
        tied_positives: (Q,) positives at the best score (at least 1 for a query with positives).
        ks: The cut-offs.

    Returns:
        {k: (Q,) float64 probabilities}; 0 or 1 when there are no ties.
    """
    max_k = max(ks)
    group = (equal + tied_positives).double()  # the tied items share ranks greater+1 ... greater+group
    steps = torch.arange(max_k, device=equal.device)
    # Drawing the r free top-k places one at a time from the tied group, step i misses all positives with
    # probability (equal - i) / (group - i); zero once the negatives are used up (and never 0 / 0).
    factors = torch.where(
        steps[None, :] < equal[:, None],
        (equal[:, None] - steps[None, :]).double() / (group[:, None] - steps[None, :]).clamp(min=1),
        torch.zeros((), dtype=torch.float64, device=equal.device),
    )
    miss = torch.cat([torch.ones_like(group)[:, None], factors.cumprod(dim=1)], dim=1)  # miss[:, r]: r places
    hits = {}
    for k in ks:
        free = (k - greater).clamp(min=0, max=max_k)  # top-k places left for the tied group
        hit = 1.0 - miss.gather(1, free[:, None]).squeeze(1)
        hits[k] = torch.where(tied_positives > 0, hit, torch.zeros_like(hit))
    return hits


def query_hits(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Top-k hit probabilities of a chunk of queries.

    Args:
        scores: (Q, candidates) similarities; NaN ranks below everything.
        positives: (Q, candidates) boolean mask of each query's positives.
        ks: The cut-offs.
    """
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    at_best = scores == best
    greater = ((scores > best) & ~positives).sum(dim=1)
    equal = (at_best & ~positives).sum(dim=1)
    tied_positives = (at_best & positives).sum(dim=1)
    return hit_probability(greater, equal, tied_positives, ks)


def classification_metrics(logits, labels, chunk_size: int = 8192) -> dict[str, float]:
    """`acc1`, `acc5` (with >= 5 classes) and `mean_per_class_recall` of class scores.

    Args:
        logits: (N, classes) scores (logits, probabilities or similarities: only the order matters).
        labels: (N,) true class indices.
        chunk_size: Rows scored at a time.
    """
    logits = _as_tensor(logits)
    labels = _as_tensor(labels, torch.long).to(logits.device)
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"expected logits (N, classes) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    ks = (1, 5) if num_classes >= 5 else (1,)  # top-5 of fewer than 5 classes is trivially 1 (CLIP_benchmark)
    sums = {k: 0.0 for k in ks}
    per_class_hits = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    for start in range(0, len(labels), chunk_size):
        rows, targets = logits[start:start + chunk_size], labels[start:start + chunk_size]
        positives = torch.nn.functional.one_hot(targets, num_classes).bool()
        hits = query_hits(rows, positives, ks)
        for k in ks:
            sums[k] += float(hits[k].sum())
        per_class_hits.index_add_(0, targets, hits[1])
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0  # like balanced_accuracy_score: average over the classes that occur in the labels
    results = {f"acc{k}": sums[k] / len(labels) for k in ks}
    results["mean_per_class_recall"] = float((per_class_hits[present] / counts[present]).mean())
    return results


def retrieval_metrics(
    image_embeds, text_embeds, text_to_image, ks: tuple[int, ...] = RECALL_KS, chunk_size: int = 1024
) -> dict[str, float]:
    """Image retrieval (text query -> images) and text retrieval (image query -> texts) recall@k.

    Args:
        image_embeds: (I, dim) image embeddings (normalised: scores are dot products).
        text_embeds: (T, dim) text embeddings.
        text_to_image: (T,) the index of each text's image; an image may have several texts (each is a positive
            of that image's query). Images without a text are candidates but not queries.
        ks: The cut-offs.
        chunk_size: Queries scored at a time (memory is chunk_size x candidates).

    Returns:
        `image_retrieval_recall@k` and `text_retrieval_recall@k` for every k.
    """
    image_embeds, text_embeds = _as_tensor(image_embeds), _as_tensor(text_embeds)
    text_to_image = _as_tensor(text_to_image, torch.long).to(text_embeds.device)
    num_images, num_texts = len(image_embeds), len(text_embeds)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected (images, dim) and (texts, dim) embeddings, got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have one image index per text ({num_texts}), "
                         f"got shape {tuple(text_to_image.shape)}")
    if num_texts == 0 or num_images == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must index the {num_images} images")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float().to(image_embeds.device)
    text_to_image = text_to_image.to(image_embeds.device)
    results = {}

    image_hits = {k: 0.0 for k in ks}  # text queries: the single positive is the text's image
    for start in range(0, num_texts, chunk_size):
        targets = text_to_image[start:start + chunk_size]
        positives = torch.nn.functional.one_hot(targets, num_images).bool()
        hits = query_hits(text_embeds[start:start + chunk_size] @ image_embeds.T, positives, ks)
        for k in ks:
            image_hits[k] += float(hits[k].sum())

    text_hits = {k: 0.0 for k in ks}  # image queries: every text of the image is a positive
    queries = 0
    for start in range(0, num_images, chunk_size):
        indices = torch.arange(start, min(start + chunk_size, num_images), device=image_embeds.device)
        positives = text_to_image[None, :] == indices[:, None]
        has_text = positives.any(dim=1)
        hits = query_hits(image_embeds[indices][has_text] @ text_embeds.T, positives[has_text], ks)
        queries += int(has_text.sum())
        for k in ks:
            text_hits[k] += float(hits[k].sum())

    for k in ks:
        results[f"image_retrieval_recall@{k}"] = image_hits[k] / num_texts
    for k in ks:
        results[f"text_retrieval_recall@{k}"] = text_hits[k] / queries
    return results


def pairs_to_retrieval_inputs(image_embeds, image_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicate images given one row per (text, image) pair.

    Args:
        image_embeds: (pairs, dim) the image embedding of each pair (repeated for an image's every caption).
        image_ids: (pairs,) an id per image; pairs with equal ids share the image.

    Returns:
        (images, dim) embeddings, the first occurrence of each id, and (pairs,) `text_to_image` indices.
    """
    ids = np.asarray(image_ids)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    embeds = _as_tensor(image_embeds)
    return embeds[torch.as_tensor(first)], torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


def metric_info(description: str, inputs_description: str, features: dict):
    """The `evaluate.MetricInfo` of a shipped metric module with the given `datasets` feature types."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=description, citation="", inputs_description=inputs_description,
                               features=datasets.Features(features))


def load_metric(name: str, **kwargs):
    """An `evaluate` module shipped with the package, loaded by path (no Hub access).

    Args:
        name: `zero_shot_classification` or `retrieval_recall`.
        **kwargs: Passed to `evaluate.load` (e.g. `experiment_id`).
    """
    import evaluate

    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric {name!r}; choose one of {sorted(METRIC_MODULES)}")
    return evaluate.load(str(METRIC_MODULES[name].parent), **kwargs)


__all__ = [
    "METRIC_MODULES",
    "RECALL_KS",
    "classification_metrics",
    "hit_probability",
    "load_metric",
    "metric_info",
    "pairs_to_retrieval_inputs",
    "query_hits",
    "retrieval_metrics",
]
