"""Our metric functions vs CLIP_benchmark 1.6.2's on the same embeddings (not a test dependency).

Run with an interpreter that has `clip_benchmark` (and scikit-learn) installed besides this package, e.g. a throwaway
venv: `python -m venv /tmp/cb && /tmp/cb/bin/pip install clip_benchmark==1.6.2 --no-deps scikit-learn "numpy<2.4"`
(CLIP_benchmark 1.6.2's `accuracy` calls `float()` on a 1-element array, an error from numpy 2.4 on). The script
builds embeddings with ties and repeated captions, scores them with CLIP_benchmark's `accuracy`,
`balanced_accuracy_score` and `recall_at_k` and with `neuclip_hf.metrics` under both tie rules, and writes
`results/clip_benchmark_parity.json`.

    python benchmarks/clip_benchmark_parity.py
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from neuclip_hf.metrics import classification_metrics, retrieval_metrics


def main() -> dict:
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(0)
    results = {}
    # classification: random logits, and logits rounded to create ties
    for name, logits in (("no ties", torch.randn(2000, 20, generator=generator)),
                         ("ties (rounded logits)", torch.randn(2000, 20, generator=generator).round())):
        labels = torch.randint(0, 20, (2000,), generator=generator)
        acc1, acc5 = zsc.accuracy(logits, labels, topk=(1, 5))
        theirs = {"acc1": acc1, "acc5": acc5,
                  "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(dim=1))}
        results[f"classification, {name}"] = {"clip_benchmark": theirs,
                                              "ours_topk": classification_metrics(logits, labels, tie_break="topk"),
                                              "ours_expected": classification_metrics(logits, labels)}
    # retrieval: 300 images, 1,500 texts from 60 distinct captions (repeated captions share one embedding)
    images = F.normalize(torch.randn(300, 16, generator=generator), dim=-1)
    distinct = F.normalize(torch.randn(60, 16, generator=generator), dim=-1)
    groups = torch.randint(0, 60, (1500,), generator=generator)
    texts, text_to_image = distinct[groups], torch.arange(1500) % 300
    scores = texts @ images.T
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(1500), text_to_image] = True
    theirs = {}
    for k in (1, 5, 10):
        theirs[f"image_retrieval_recall@{k}"] = float((zsr.batchify(zsr.recall_at_k, scores, positives, 256, "cpu",
                                                                    k=k) > 0).float().mean())
        theirs[f"text_retrieval_recall@{k}"] = float((zsr.batchify(zsr.recall_at_k, scores.T, positives.T, 256, "cpu",
                                                                   k=k) > 0).float().mean())
    ours_topk = retrieval_metrics(images, texts, text_to_image, tie_break="topk")
    ours = retrieval_metrics(images, texts, text_to_image, text_groups=groups)
    results["retrieval, repeated captions"] = {"clip_benchmark": theirs, "ours_topk": ours_topk,
                                               "ours_expected": ours}
    for case, row in results.items():
        # CLIP_benchmark averages in float32, we in float64: equal up to 1e-7 relative
        same = all(abs(row["clip_benchmark"][k] - row["ours_topk"][k]) < 1e-7 for k in row["clip_benchmark"])
        row["topk_rule_equals_clip_benchmark"] = same
        print(f"{case}: topk rule identical to CLIP_benchmark: {same}")
        for key, value in row["clip_benchmark"].items():
            print(f"  {key:<28} clip_benchmark {value:.6f}  ours(topk) {row['ours_topk'][key]:.6f}  "
                  f"ours(expected) {row['ours_expected'][key]:.6f}")

    record = {"clip_benchmark_version": importlib.metadata.version("clip_benchmark"), "torch": torch.__version__,
              "results": results}
    out = Path(__file__).parent / "results" / "clip_benchmark_parity.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
    sys.exit(0)
