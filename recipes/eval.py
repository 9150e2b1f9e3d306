"""Zero-shot classification and retrieval of a saved CLIP model (NeuCLIP or plain `CLIPModel`).

Examples:
    python recipes/eval.py --model out/tiny                       # embedded Fashion-MNIST test split
    python recipes/eval.py --model out/tiny --data /data/imagenet/val --templates openai
    python recipes/eval.py --model openai/clip-vit-base-patch32 --data "shards/*.tar"
    python recipes/eval.py --model out/tiny --max_samples 2000 --output_json results.json

`--data`: nothing (the embedded default's held-out split), an ImageFolder directory (class subfolders: zero-shot
classification), or parquet / webdataset files (captions: retrieval; labels with class names: classification).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import neuclip_hf  # noqa: F401  (registers NeuCLIP with the Auto classes)
from neuclip_hf.evaluation import evaluate_pretrained, format_metrics_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory or Hub id (with its processor)")
    parser.add_argument("--processor", default=None, help="processor directory or Hub id (default: --model)")
    parser.add_argument("--data", default=None, help="'default[:split]', an ImageFolder dir, parquet or .tar files")
    parser.add_argument("--templates", default="openai", help="'openai' (80), 'simple' (7), or a .json / .txt file")
    parser.add_argument("--class_names", default=None, help="comma-separated names, or a file with one per line")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate the first N readable samples")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    parser.add_argument("--output_json", default=None, help="write the results here")
    return parser.parse_args(argv)


def read_class_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if Path(value).is_file():
        return [line.strip() for line in Path(value).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = evaluate_pretrained(
        args.model, data=args.data, templates=args.templates, class_names=read_class_names(args.class_names),
        batch_size=args.batch_size, max_samples=args.max_samples, device=args.device,
        processor_name_or_path=args.processor,
    )
    print(f"{results['model']} ({results['model_class']}) on {results['data']}, "
          f"{results['num_templates']} templates ({results['templates']})")
    print(format_metrics_table(results["metrics"]))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
