"""Zero-shot classification throughput (images/s): our evaluator path vs transformers' zero-shot pipeline.

Same saved model (the `tiny` preset, randomly initialised, with its processor), same images (the first N of the
embedded Fashion-MNIST test split), same 10 class names and, for the like-for-like rows, the pipeline's own
single prompt "This is a photo of {}.". Rows:

- `pipeline (batch_size=1)`: `pipeline("zero-shot-image-classification")` as documented (one image per call of
  the model; it re-encodes every class prompt for every image).
- `pipeline (batch_size=B)`: the same pipeline with its `batch_size` argument.
- `ZeroShotClassifier.predict_proba`: our API; classifier built once (timed), images encoded in batches.
- `ZeroShotEvaluator`: the training-time evaluator, same images and prompt, returning acc1 / acc5 / recall.
- `run_suite (--suite runner)`: `neuclip_hf.suite.run_suite` on a one-entry suite of the same shards, class names
  and prompt, classification only: what `recipes/eval.py --suite` does per set (read parquet, decode PNGs, encode,
  score), so it is the like-for-like figure for the suite runner against the pipeline.
- `recipes/eval.py path`: `evaluate_pretrained` end to end: load the directory, read parquet, decode PNGs,
  80 OpenAI templates, classification + retrieval on the captions (everything the recipe does but printing).

The pipeline and our classifier get the same decoded PIL images; probabilities are compared (max |diff|) so the
speed-up is between equal answers. Writes `<out_dir>/zero_shot_throughput.json` and `.png`.

    python benchmarks/zero_shot_throughput.py            # 1,000 images, 5 interleaved rounds
    python benchmarks/zero_shot_throughput.py --quick    # 200 images, 1 repeat (< 30 s)
    python benchmarks/zero_shot_throughput.py --threads 0  # torch's default thread count
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import neuclip_hf
from neuclip_hf import NeuCLIPModel
from neuclip_hf.default_data import FASHION_MNIST_CLASSES, default_data_files
from neuclip_hf.data import open_eval_data
from neuclip_hf.evaluation import ZeroShotEvaluator, evaluate_pretrained
from neuclip_hf.images import load_image
from neuclip_hf.presets import model_config
from neuclip_hf.suite import SuiteEntry, run_suite
from neuclip_hf.tokenization import build_clip_processor
from neuclip_hf.zero_shot import ZeroShotClassifier

PIPELINE_TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis_template
TARGET_SPEEDUP = 2.0
RECIPE = "recipes/eval.py path (80 templates + retrieval)"
SUITE = "run_suite (--suite runner)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timed rounds per method (the median and the range are reported)")
    parser.add_argument("--batch_size", type=int, default=256, help="our batch size")
    parser.add_argument("--pipeline_batch_size", type=int, default=64)
    parser.add_argument("--data", default=None, help="parquet shards with image/label/caption (default: test split)")
    parser.add_argument("--out_dir", default=str(Path(__file__).parent / "results"))
    # One thread by default: on a shared 2-core machine OpenMP's spinning barrier makes the pipeline's many small
    # per-image calls up to 8x slower whenever another process holds a core; one thread gives repeatable numbers.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="200 images, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.repeats = min(args.num_images, 200), 1
    return args


def interleaved_timings(methods: dict, repeats: int) -> dict[str, tuple[list[float], object]]:
    """Wall time of every timed round per method, and its last result.

    Each method runs once untimed (warm-up), then the methods take turns `repeats` times, so a burst of load from
    another process on a shared machine slows every method alike instead of one.
    """
    results = {name: function() for name, function in methods.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, function in methods.items():
            start = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in methods}


def pipeline_probabilities(outputs: list[list[dict]], class_names: list[str]) -> torch.Tensor:
    return torch.tensor([[{o["label"]: o["score"] for o in out}[name] for name in class_names] for out in outputs])


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoProcessor, pipeline

    class_names = list(FASHION_MNIST_CLASSES)
    files = args.data or default_data_files("test")
    rows = []
    for row in open_eval_data(files):
        rows.append(row)
        if len(rows) == args.num_images:
            break
    images = [load_image(row["image"]) for row in rows]  # decoded once: both sides get the same PIL images
    labelled = [{"image": image, "label": row["label"]} for image, row in zip(images, rows)]

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        NeuCLIPModel(model_config("tiny")).save_pretrained(directory)
        build_clip_processor(image_size=32, model_max_length=32).save_pretrained(directory)
        classify = pipeline("zero-shot-image-classification", model=directory)
        model, processor = classify.model, AutoProcessor.from_pretrained(directory)  # the same saved files
        model.eval()

        evaluator = ZeroShotEvaluator(processor, labelled, class_names, [PIPELINE_TEMPLATE], args.batch_size)
        suite_entry = SuiteEntry("fashion-mnist", data=",".join(map(str, files)) if isinstance(files, list) else files,
                                 task="zeroshot_classification", class_names=class_names,
                                 templates=[PIPELINE_TEMPLATE])
        batched = f"pipeline (batch_size={args.pipeline_batch_size})"
        methods = {
            "pipeline (batch_size=1)": lambda: classify(images, candidate_labels=class_names, batch_size=1),
            batched: lambda: classify(images, candidate_labels=class_names, batch_size=args.pipeline_batch_size),
            "ZeroShotClassifier.predict_proba": lambda: ZeroShotClassifier(
                model, processor, class_names, [PIPELINE_TEMPLATE], args.batch_size
            ).predict_proba(images),  # the classifier is rebuilt (and timed) on every call
            "ZeroShotEvaluator": lambda: evaluator(model),
            SUITE: lambda: run_suite(model, processor, [suite_entry], batch_size=args.batch_size,
                                     max_samples=args.num_images, log=None)[0].metrics,
            RECIPE: lambda: evaluate_pretrained(directory, data=files, templates="openai", batch_size=args.batch_size,
                                                max_samples=args.num_images),
        }
        load_before = os.getloadavg()[0]
        timings = interleaved_timings(methods, args.repeats)
        load_after = os.getloadavg()[0]

    reference = pipeline_probabilities(timings[batched][1], class_names)
    labels = torch.tensor([row["label"] for row in rows])
    ours = timings["ZeroShotClassifier.predict_proba"][1]
    extra = {
        "ZeroShotClassifier.predict_proba": {"max_abs_prob_diff_vs_pipeline": float((ours - reference).abs().max())},
        "ZeroShotEvaluator": {
            "acc1": timings["ZeroShotEvaluator"][1]["acc1"],
            "pipeline_acc1": float((reference.argmax(dim=1) == labels).float().mean()),
        },
        SUITE: {"acc1": timings[SUITE][1]["acc1"]},
        RECIPE: {"metrics": {k: v for k, v in timings[RECIPE][1]["metrics"].items() if "recall" in k or "acc" in k}},
    }
    measurements = {}
    for name, (rounds, _) in timings.items():
        seconds = statistics.median(rounds)
        spread = [len(images) / max(rounds), len(images) / min(rounds)]  # slowest and fastest round
        measurements[name] = {"seconds": seconds, "seconds_per_round": rounds, "images": len(images),
                              "images_per_second": len(images) / seconds, "images_per_second_min_max": spread,
                              **extra.get(name, {})}
        print(f"{name:<50} {len(images) / seconds:10.1f} images/s  ({seconds:.3f} s; rounds "
              f"{spread[0]:.0f}-{spread[1]:.0f} images/s)", flush=True)

    baseline = measurements["pipeline (batch_size=1)"]["images_per_second"]
    batched_speed = measurements[batched]["images_per_second"]
    evaluator_speed = measurements["ZeroShotEvaluator"]["images_per_second"]
    suite_speed = measurements[SUITE]["images_per_second"]
    return {
        "benchmark": "zero_shot_throughput",
        "config": {
            "model": "tiny preset (random init), 32 px, real 49,408-token vocabulary",
            "images": len(images), "classes": len(class_names), "repeats": args.repeats,
            "batch_size": args.batch_size, "pipeline_batch_size": args.pipeline_batch_size, "quick": args.quick,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_average_before_after": [load_before, load_after],  # other processes on a shared machine
            "neuclip_hf": neuclip_hf.__version__, "python": platform.python_version(), "machine": platform.machine(),
        },
        "results": measurements,
        "speedup_evaluator_vs_pipeline": evaluator_speed / baseline,
        "speedup_evaluator_vs_batched_pipeline": evaluator_speed / batched_speed,
        "speedup_suite_vs_pipeline": suite_speed / baseline,
        "speedup_suite_vs_batched_pipeline": suite_speed / batched_speed,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": evaluator_speed / baseline >= TARGET_SPEEDUP,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["results"])
    speeds = [results["results"][name]["images_per_second"] for name in names]
    colors = ["#999999" if name.startswith("pipeline") else "#1f77b4" for name in names]
    figure, axis = plt.subplots(figsize=(9.5, 3.6))
    bars = axis.barh(names[::-1], speeds[::-1], color=colors[::-1])
    axis.bar_label(bars, labels=[f"{s:,.0f}" for s in speeds[::-1]], padding=3)
    axis.set_xlabel("images / second (higher is better)")
    config = results["config"]
    axis.set_title(f"Zero-shot classification: {config['images']} images, {config['classes']} classes, "
                   f"{config['torch_threads']} CPU thread(s)", fontsize=10)
    axis.set_xlim(0, max(speeds) * 1.18)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (the test runs this in-process)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "zero_shot_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "zero_shot_throughput.png")
    print(f"evaluator vs pipeline: {results['speedup_evaluator_vs_pipeline']:.1f}x "
          f"(batched pipeline: {results['speedup_evaluator_vs_batched_pipeline']:.1f}x); wrote {out_dir}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
