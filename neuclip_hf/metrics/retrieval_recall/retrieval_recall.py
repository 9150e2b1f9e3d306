"""`evaluate` module: image and text retrieval recall@k as in CLIP_benchmark.

One example per (text, image) pair: the text's embedding, its image's embedding and an image id; pairs that share
an id share the image (an image with several captions has several positives when it is the query). Load it by
path, offline: `neuclip_hf.metrics.load_metric("retrieval_recall")`. One import per line for evaluate's scanner.
"""

import datasets
import evaluate

from neuclip_hf.metrics import RECALL_KS
from neuclip_hf.metrics import metric_info
from neuclip_hf.metrics import pairs_to_retrieval_inputs
from neuclip_hf.metrics import retrieval_metrics

_DESCRIPTION = """Recall@k for text -> image (image_retrieval_recall@k) and image -> text (text_retrieval_recall@k)
retrieval; a query counts when any of its positives is in the top k."""

_KWARGS_DESCRIPTION = """
Args:
    text_embeds: The embedding of each pair's text.
    image_embeds: The embedding of each pair's image (repeated for every caption of an image).
    image_ids: An id per image; pairs with equal ids share the image.
    ks: Cut-offs (default 1, 5, 10).
Returns:
    image_retrieval_recall@k and text_retrieval_recall@k for every k.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        vector = datasets.Sequence(datasets.Value("float32"))
        features = {"text_embeds": vector, "image_embeds": vector, "image_ids": datasets.Value("int64")}
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features)

    def _compute(self, text_embeds, image_embeds, image_ids, ks=RECALL_KS):
        images, text_to_image = pairs_to_retrieval_inputs(image_embeds, image_ids)
        return retrieval_metrics(images, text_embeds, text_to_image, ks=tuple(ks))
