"""Merge a LoRA adapter trained by recipes/train.py into its base model: a full NeuCLIPModel (normalizer included).

Examples:
    python recipes/merge_lora.py --adapter outputs/lora-run --output outputs/lora-merged
    python recipes/merge_lora.py --adapter user/neuclip-lora --output merged --push_to_hub user/neuclip-merged

The base model is the adapter's `base_model_name_or_path` unless `--base` names another; the processor is taken from
the adapter folder (the trainer saves it there) or else from the base.
"""

from __future__ import annotations

import argparse

from transformers import AutoProcessor

from neuclip_hf.hub import push_to_hub
from neuclip_hf.lora import load_lora, merge_lora


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory or Hub id (adapter + normalizer files)")
    parser.add_argument("--output", required=True, help="directory for the merged model and processor")
    parser.add_argument("--base", default=None, help="base model directory or Hub id (default: from the adapter)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also push the merged model there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    merged = merge_lora(load_lora(args.adapter, base_model=args.base))
    merged.save_pretrained(args.output)  # config, model.safetensors (encoders + normalizer), model code
    processor = None
    for source in (args.adapter, args.base or merged.config.name_or_path):
        try:
            processor = AutoProcessor.from_pretrained(source)
            break
        except (OSError, ValueError, TypeError):
            continue
    if processor is not None:
        processor.save_pretrained(args.output)
    else:
        print(f"no processor found in {args.adapter} or the base model: save one into {args.output} yourself")
    if args.push_to_hub:
        push_to_hub(merged, args.push_to_hub, processor)
    print(f"merged model saved to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
