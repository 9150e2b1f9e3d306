"""Zero-shot classification and retrieval of a saved CLIP model (NeuCLIP or plain `CLIPModel`), on one set or a suite.

Examples:
    python recipes/eval.py --model out/tiny                       # embedded Fashion-MNIST test split
    python recipes/eval.py --model out/tiny --data /data/imagenet/val --class_names imagenet_classnames.txt
    python recipes/eval.py --model out/tiny --data /data/datacomp/wds_cifar10_test      # CLIP_benchmark layout
    python recipes/eval.py --model out/tiny --data coco/captions_val2017.json            # COCO captions
    python recipes/eval.py --model out/tiny --suite /data/datacomp --output_json suite.json --output_markdown suite.md
    python recipes/eval.py --model out/tiny --suite suite.yaml --clip_benchmark_json results/

`--data`: nothing (the embedded default's held-out split), an image folder (class sub-folders: zero-shot
classification), a CLIP_benchmark webdataset folder (classnames.txt, templates, shards), parquet / webdataset files,
captions files, COCO / Karpathy caption JSON. `--suite`: a YAML file or a folder of such sets (neuclip_hf.suite).
docs/evaluation.md lists the formats and the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import neuclip_hf  # noqa: F401  (registers NeuCLIP with the Auto classes)
from neuclip_hf.data.eval_data import class_name_mapping_lines, open_eval_data
from neuclip_hf.evaluation import TASKS, evaluate_pretrained, format_metrics_table, load_model_and_processor
from neuclip_hf.metrics import TIE_RULES
from neuclip_hf.suite import (
    read_class_names,
    read_suite,
    run_suite,
    suite_json,
    suite_table_markdown,
    write_clip_benchmark_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory or Hub id (with its processor)")
    parser.add_argument("--processor", default=None, help="processor directory or Hub id (default: --model)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data", default=None, help="one evaluation set (see above); default: the embedded test split")
    where.add_argument("--suite", default=None, help="a suite YAML file or a folder of evaluation sets")
    parser.add_argument("--split", default=None, help="split of a dataset folder / Hub dataset / Karpathy file")
    parser.add_argument("--image_column", default=None, help="image column / webdataset field (default: detected)")
    parser.add_argument("--caption_column", default=None, help="caption column; `json.<key>` for a JSON field")
    parser.add_argument("--label_column", default=None, help="class-label column (default: label, labels, cls)")
    parser.add_argument("--templates", default=None,
                        help="openai (80), simple (7), or a .json / .txt file ({} or {c}); default: the data's "
                             "zeroshot_classification_templates.txt, else openai")
    parser.add_argument("--class_names", default=None,
                        help="names per label: a file with one per line in label order, a file of `label: name` "
                             "lines (label index or the data's class name, e.g. a folder name), or a comma list")
    parser.add_argument("--task", default="auto", choices=["auto", *TASKS], help="what to run on --data")
    parser.add_argument("--tie_break", default="expected", choices=TIE_RULES,
                        help="expected: ties count by their expected value (order-independent); topk: "
                             "CLIP_benchmark's torch.topk / argmax order")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate the first N readable samples")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    parser.add_argument("--output_json", default=None, help="write the results here")
    parser.add_argument("--output_markdown", default=None, help="write the results table here (markdown)")
    parser.add_argument("--clip_benchmark_json", default=None,
                        help="also write CLIP_benchmark's per-run JSON files into this folder (its `build` reads them)")
    return parser.parse_args(argv)


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")


def _model_name(location: str) -> str:
    """The model as results name it: a Hub id as given, a local directory by its folder name (no local paths)."""
    path = Path(location)
    return path.name if path.exists() else location


def evaluate_one(args: argparse.Namespace, model, processor) -> dict:
    data = open_eval_data(args.data, read_class_names(args.class_names), args.split,
                          image_column=args.image_column, caption_column=args.caption_column,
                          label_column=args.label_column)
    if data.class_names_source == "given":
        print("class names (label -> prompt name):\n" + "\n".join(
            f"  {line}" for line in class_name_mapping_lines(data.class_names, data.data_class_names)))
    tasks = TASKS if args.task == "auto" else (args.task,)
    results = evaluate_pretrained(args.model, data, args.templates, batch_size=args.batch_size,
                                  max_samples=args.max_samples, tie_break=args.tie_break, tasks=tasks,
                                  model=model, processor=processor)
    results["model"] = _model_name(args.model)
    metrics = results["metrics"]
    print(f"{results['model']} ({results['model_class']}) on {results['data']}")
    if "acc1" in metrics:
        print(f"zero-shot classification with {results['templates']}")
    elif tasks != ("zeroshot_retrieval",):
        print("no zero-shot classification: it needs class labels (a label / cls column or class sub-folders) with "
              "class names; ran retrieval on the captions")
    if "num_distinct_texts" in metrics and metrics["num_distinct_texts"] < metrics["num_texts"]:
        print(f"{int(metrics['num_distinct_texts'])} distinct texts among {int(metrics['num_texts'])}: plain "
              f"recall@1 cannot exceed {metrics['image_retrieval_recall@1_ceiling']:.2%} (image) / "
              f"{metrics['text_retrieval_recall@1_ceiling']:.2%} (text); see the _caption_aware recalls")
    print(format_metrics_table(metrics))
    _write(args.output_json, json.dumps(results, indent=2) + "\n")
    return results


def evaluate_suite(args: argparse.Namespace, model, processor) -> dict:
    results = run_suite(model, processor, read_suite(args.suite), args.batch_size, args.max_samples, args.tie_break,
                        args.templates)
    name = _model_name(args.model)
    table = suite_table_markdown(results, name)
    print(table)
    record = suite_json(results, name, type(model).__name__, args.tie_break)
    _write(args.output_json, json.dumps(record, indent=2) + "\n")
    _write(args.output_markdown, table)
    if args.clip_benchmark_json:
        written = write_clip_benchmark_json(results, args.clip_benchmark_json, type(model).__name__, name)
        print(f"wrote {len(written)} CLIP_benchmark result file(s) to {args.clip_benchmark_json}")
    return record


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, processor = load_model_and_processor(args.model, args.processor, args.device)
    results = evaluate_suite(args, model, processor) if args.suite else evaluate_one(args, model, processor)
    if args.clip_benchmark_json and not args.suite:
        from neuclip_hf.suite import SuiteResult

        single = SuiteResult(Path(str(args.data or "default")).name, results["tasks"], None, results["metrics"])
        write_clip_benchmark_json([single], args.clip_benchmark_json, results["model_class"], results["model"])
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, OSError, ValueError) as error:  # bad input: one line, no traceback
        sys.exit(f"error: {error}")
