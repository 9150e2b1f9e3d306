"""Zero-shot classification and retrieval metrics with CLIP_benchmark's names and definitions.

- `acc1`, `acc5` (only with at least 5 classes): the true class is among the k highest-scoring classes.
- `mean_per_class_recall`: top-1 recall of each class present in the labels, averaged over those classes
  (scikit-learn's `balanced_accuracy_score`, as CLIP_benchmark uses it).
- `image_retrieval_recall@k` (text query -> images) and `text_retrieval_recall@k` (image query -> texts): a query
  counts when ANY of its positives is among the k highest-scoring candidates (the CLIP-paper convention).

Ties (`tie_break`):
- `"expected"` (default): a tie is resolved by its expected value under uniformly random tie-breaking, so results
  never depend on the order of the candidates: a collapsed model whose scores are all equal gets chance accuracy
  (1 / classes), not the accuracy of whichever class happens to come first. Without ties this is exactly the top-k
  definition. NaN scores rank below everything.
- `"topk"`: CLIP_benchmark's rule, reproduced by calling the same torch functions it calls: `acc@k` and recall@k
  take `torch.topk(scores, k)` (the order among equal scores is whatever topk's selection algorithm leaves, which
  is neither stable nor by index and differs between CPU and CUDA; NaN ranks first), `mean_per_class_recall`
  takes `argmax` (the first maximal index). docs/evaluation.md shows where the two rules differ.

Duplicate captions (`text_groups`): texts with the same group are identical after tokenization, so every model
gives them the same embedding and no model can tell them apart. `retrieval_metrics` then also reports the
number of distinct texts, the best recall any model can reach (`..._ceiling`, under random tie-breaking) and the
caption-aware recall (`..._caption_aware`: a retrieved text identical to a true caption, or an image one of whose
captions is identical to the query, counts as a hit).

Scores are computed chunk by chunk (`chunk_size` queries at a time, on the device of the inputs), so retrieval
over N items never holds an N x N matrix. The same metrics are offered as `evaluate` modules that load by path
offline: `load_metric("zero_shot_classification")`, `load_metric("retrieval_recall")`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
TIE_RULES = ("expected", "topk")
METRICS_DIR = Path(__file__).parent  # the `evaluate` modules live in sub-folders of this package
METRIC_MODULES = {name: METRICS_DIR / name / f"{name}.py" for name in ("zero_shot_classification", "retrieval_recall")}


def _as_tensor(value, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
    return tensor if dtype is None else tensor.to(dtype)


def _check_tie_break(tie_break: str) -> None:
    if tie_break not in TIE_RULES:
        raise ValueError(f"tie_break={tie_break!r} is invalid: expected one of {TIE_RULES}")


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


def query_hits(
    scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...], tie_break: str = "expected",
    topk_per_k: bool = False,
) -> dict[int, torch.Tensor]:
    """Top-k hits of a chunk of queries: probabilities (`expected`) or 0 / 1 from `torch.topk` (`topk`).

    Args:
        scores: (Q, candidates) similarities.
        positives: (Q, candidates) boolean mask of each query's positives.
        ks: The cut-offs.
        tie_break: `expected` or `topk` (see the module docstring).
        topk_per_k: `topk` rule only: one `topk(k)` call per cut-off, as CLIP_benchmark's retrieval does (its
            classification slices one `topk(max k)`); which tied items topk keeps depends on k.
    """
    _check_tie_break(tie_break)
    if tie_break == "topk" and topk_per_k:
        return {k: positives.gather(1, scores.float().topk(min(k, scores.shape[1]), dim=1).indices).any(dim=1).double()
                for k in ks}
    if tie_break == "topk":
        depth = min(max(ks), scores.shape[1])  # CLIP_benchmark fails for k > candidates; all candidates are "in"
        top = scores.float().topk(depth, dim=1, largest=True, sorted=True).indices
        found = positives.gather(1, top)
        return {k: found[:, :k].any(dim=1).double() for k in ks}
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    at_best = scores == best
    greater = ((scores > best) & ~positives).sum(dim=1)
    equal = (at_best & ~positives).sum(dim=1)
    tied_positives = (at_best & positives).sum(dim=1)
    return hit_probability(greater, equal, tied_positives, ks)


def classification_metrics(logits, labels, chunk_size: int = 8192, tie_break: str = "expected") -> dict[str, float]:
    """`acc1`, `acc5` (with >= 5 classes) and `mean_per_class_recall` of class scores.

    Args:
        logits: (N, classes) scores (logits, probabilities or similarities: only the order matters).
        labels: (N,) true class indices.
        chunk_size: Rows scored at a time.
        tie_break: `expected` (default) or CLIP_benchmark's `topk` (see the module docstring).
    """
    _check_tie_break(tie_break)
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
        hits = query_hits(rows, positives, ks, tie_break)
        for k in ks:
            sums[k] += float(hits[k].sum())
        # CLIP_benchmark's balanced accuracy reads argmax (first maximal index), not topk: the two can disagree
        top1 = (rows.argmax(dim=1) == targets).double() if tie_break == "topk" else hits[1]
        per_class_hits.index_add_(0, targets, top1)
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0  # like balanced_accuracy_score: average over the classes that occur in the labels
    results = {f"acc{k}": sums[k] / len(labels) for k in ks}
    results["mean_per_class_recall"] = float((per_class_hits[present] / counts[present]).mean())
    return results


def _recall(
    queries: torch.Tensor, candidates: torch.Tensor, positives_of: Callable[[torch.Tensor], torch.Tensor],
    ks: tuple[int, ...], chunk_size: int, tie_break: str,
) -> dict[int, float]:
    """Mean top-k hit over the queries that have at least one positive (`positives_of(rows)` -> (Q, C) mask)."""
    sums, counted = {k: 0.0 for k in ks}, 0
    for start in range(0, len(queries), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(queries)), device=queries.device)
        positives = positives_of(rows)
        keep = positives.any(dim=1)  # e.g. an image without a caption is a candidate, not a query
        hits = query_hits(queries[rows[keep]] @ candidates.T, positives[keep], ks, tie_break, topk_per_k=True)
        counted += int(keep.sum())
        for k in ks:
            sums[k] += float(hits[k].sum())
    return {k: sums[k] / counted for k in ks}


def retrieval_metrics(
    image_embeds, text_embeds, text_to_image, ks: tuple[int, ...] = RECALL_KS, chunk_size: int = 1024,
    tie_break: str = "expected", text_groups=None,
) -> dict[str, float]:
    """Image retrieval (text query -> images) and text retrieval (image query -> texts) recall@k.

    Args:
        image_embeds: (I, dim) image embeddings (normalised: scores are dot products).
        text_embeds: (T, dim) text embeddings.
        text_to_image: (T,) the index of each text's image; an image may have several texts (each is a positive
            of that image's query). Images without a text are candidates but not queries.
        ks: The cut-offs.
        chunk_size: Queries scored at a time (memory is chunk_size x candidates).
        tie_break: `expected` (default) or CLIP_benchmark's `topk` (see the module docstring).
        text_groups: (T,) optional ids of identical texts (equal id: identical after tokenization); adds
            `num_texts`, `num_distinct_texts`, the `..._ceiling` and the `..._caption_aware` recalls.

    Returns:
        `image_retrieval_recall@k` and `text_retrieval_recall@k` for every k (plus the duplicate-aware entries).
    """
    _check_tie_break(tie_break)
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
    groups = None
    if text_groups is not None:
        groups = _as_tensor(text_groups, torch.long).to(image_embeds.device)
        if groups.shape != (num_texts,):
            raise ValueError(f"text_groups must have one id per text ({num_texts}), got shape {tuple(groups.shape)}")
        groups = torch.unique(groups, return_inverse=True)[1]  # ids 0 .. G-1

    def image_positives(rows: torch.Tensor) -> torch.Tensor:  # text query -> its image
        return torch.nn.functional.one_hot(text_to_image[rows], num_images).bool()

    def text_positives(rows: torch.Tensor) -> torch.Tensor:  # image query -> its texts
        return text_to_image[None, :] == rows[:, None]

    def image_positives_by_caption(rows: torch.Tensor) -> torch.Tensor:  # images with a caption equal to the query
        query, text = (groups[rows][:, None] == groups[None, :]).nonzero(as_tuple=True)
        mask = torch.zeros(len(rows), num_images, dtype=torch.bool, device=rows.device)
        mask[query, text_to_image[text]] = True
        return mask

    def text_positives_by_caption(rows: torch.Tensor) -> torch.Tensor:  # texts equal to one of the image's captions
        query, text = text_positives(rows).nonzero(as_tuple=True)
        present = torch.zeros(len(rows), int(groups.max()) + 1, dtype=torch.bool, device=rows.device)
        present[query, groups[text]] = True
        return present[:, groups]

    runs = {"image_retrieval_recall@{}": (text_embeds, image_embeds, image_positives),
            "text_retrieval_recall@{}": (image_embeds, text_embeds, text_positives)}
    if groups is not None:
        runs["image_retrieval_recall@{}_caption_aware"] = (text_embeds, image_embeds, image_positives_by_caption)
        runs["text_retrieval_recall@{}_caption_aware"] = (image_embeds, text_embeds, text_positives_by_caption)
    results: dict[str, float] = {}
    for name, (queries, candidates, positives_of) in runs.items():
        recall = _recall(queries, candidates, positives_of, ks, chunk_size, tie_break)
        results.update({name.format(k): value for k, value in recall.items()})
    if groups is not None:
        results.update(recall_ceilings(text_to_image, groups, ks))
        results["num_texts"], results["num_distinct_texts"] = num_texts, int(groups.max()) + 1
    return results


def recall_ceilings(text_to_image, text_groups, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """The best expected recall@k any model can reach when identical texts share one embedding.

    Image retrieval: the copies of one text rank the images identically, so of a group of identical texts at most
    the texts of the k images the group's copies point to most often can hit. Text retrieval: an image query
    whose caption has m identical copies among which p are its own sees them tied; the best a model can do is to
    rank that group first, which hits with the random-tie probability 1 - C(m-p, k) / C(m, k) (1 when m <= k).

    Args:
        text_to_image: (T,) each text's image.
        text_groups: (T,) ids of identical texts.
        ks: The cut-offs.
    """
    images = np.asarray(_as_tensor(text_to_image).cpu(), dtype=np.int64)
    groups = np.asarray(_as_tensor(text_groups).cpu(), dtype=np.int64)
    pairs, pair_counts = np.unique(np.stack([groups, images], axis=1), axis=0, return_counts=True)
    results = {}
    order = np.lexsort((-pair_counts, pairs[:, 0]))  # by group, then by how many of the group's texts point there
    sorted_groups, sorted_counts = pairs[order, 0], pair_counts[order]
    rank_in_group = np.arange(len(order)) - np.searchsorted(sorted_groups, sorted_groups)
    for k in ks:
        results[f"image_retrieval_recall@{k}_ceiling"] = float(sorted_counts[rank_in_group < k].sum() / len(images))
    group_sizes = np.bincount(groups)
    own = torch.as_tensor(pair_counts)  # p: the image's texts in the group
    hits = hit_probability(torch.zeros_like(own), torch.as_tensor(group_sizes[pairs[:, 0]]) - own, own, ks)
    image_index = torch.as_tensor(pairs[:, 1])
    for k in ks:
        best = torch.zeros(int(image_index.max()) + 1, dtype=torch.float64)
        best = best.scatter_reduce(0, image_index, hits[k], reduce="amax")  # the image's best group
        queries = torch.unique(image_index)
        results[f"text_retrieval_recall@{k}_ceiling"] = float(best[queries].mean())
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
    "recall_ceilings",
    "retrieval_metrics",
    "TIE_RULES",
]
