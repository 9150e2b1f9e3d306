"""`evaluate` module: zero-shot classification metrics (acc1, acc5, mean_per_class_recall) as in CLIP_benchmark.

Load it by path, offline: `evaluate.load("<this directory>")` or `neuclip_hf.metrics.load_metric(
"zero_shot_classification")`. evaluate's import scanner reads one import per line.
"""

import datasets
import evaluate

from neuclip_hf.metrics import classification_metrics
from neuclip_hf.metrics import metric_info

_DESCRIPTION = """Top-1 / top-5 accuracy (top-5 only with at least 5 classes) and mean per-class recall of class
scores, with ties resolved by their expected value under random tie-breaking."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: One row of class scores (logits, probabilities or similarities) per sample.
    references: The true class index of each sample.
Returns:
    acc1, acc5 (when there are at least 5 classes), mean_per_class_recall.
Example:
    >>> metric = evaluate.load("neuclip_hf/metrics/zero_shot_classification")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 0])
    {'acc1': 0.5, 'mean_per_class_recall': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotClassification(evaluate.Metric):
    def _info(self):
        features = {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features)

    def _compute(self, predictions, references):
        return classification_metrics(predictions, references)
