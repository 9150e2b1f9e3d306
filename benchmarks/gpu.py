"""GPU throughput: ViT-B/32 at 224 px, bf16, batch 256 per device, synthetic data — samples/s and model FLOPs
utilisation (MFU) of every objective with NeuCLIPTrainer and of a plain `Trainer` on `CLIPModel(return_loss=True)`.

    python benchmarks/gpu.py                                    # one GPU
    accelerate launch --num_processes 8 benchmarks/gpu.py       # per-device numbers under DDP (rank 0 writes)
    python benchmarks/gpu.py --quick --allow_cpu                # a CPU dry run of the same code path (tests)

MFU = (encoder forward + backward FLOPs per sample, counted with torch's FlopCounterMode) x samples/s / peak bf16
FLOP/s of the device (known for common data-centre GPUs; `--peak_tflops` otherwise). The estimator's own FLOPs are
not counted as model FLOPs, so its overhead shows as lower MFU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, markdown_table, update_readme_section, write_json  # noqa: E402
from benchmarks.throughput import measure  # noqa: E402
from neuclip_hf import OBJECTIVES, NeuCLIPModel  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def encoder_flops_per_sample(preset: str, device: str) -> float:
    model = NeuCLIPModel(model_config(preset, objective="clip")).to(device)
    text = model.config.text_config
    ids = torch.randint(0, text.eos_token_id, (2, 32), device=device)
    ids[:, -1] = text.eos_token_id
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, return_loss=True).loss.backward()
    return counter.get_total_flops() / 2


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=256, help="per device")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s if the GPU is unknown")
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 4, 2 steps (a dry run)")
    parser.add_argument("--allow_cpu", action="store_true", help="run without a GPU (numbers are not GPU numbers)")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("no GPU found: run on a GPU machine, or pass --allow_cpu for a dry run of the code path")
    if args.quick:
        args.preset, args.batch_size, args.steps, args.warmup = "tiny", 4, 2, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda"  # CPU dry runs stay in fp32
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    flops = encoder_flops_per_sample(args.preset, device)
    rows, results = [], {}
    for kind in ("plain",) + OBJECTIVES:
        m = measure(kind, args.preset, args.batch_size, args.steps, args.warmup, bf16=bf16,
                    overrides={"neuclip_num_prototypes": 4096}, device="cpu" if device == "cpu" else "auto")
        m["mfu"] = flops * m["samples_per_second"] / (peak * 1e12) if peak else None
        results[kind] = m
    plain = results["plain"]["samples_per_second"]
    for kind, m in results.items():
        rows.append([kind, round(m["samples_per_second"], 1), f"{100 * (m['samples_per_second'] / plain - 1):+.1f}%",
                     f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a",
                     round(m.get("peak_gpu_bytes", m["peak_rss_bytes"]) / 2**30, 2)])
    payload = {"device": name, "preset": args.preset, "batch_size_per_device": args.batch_size, "bf16": bf16,
               "peak_tflops": peak, "encoder_flops_per_sample": flops, "results": results, "quick": args.quick}
    header = ["trainer / objective", "samples/s per device", "vs plain Trainer", "MFU", "peak memory GiB"]
    if int(os.environ.get("RANK", 0)) == 0:
        json_path = write_json("gpu", payload, args.out_dir)
        env = environment()
        body = f"""## gpu

`python benchmarks/gpu.py` on a GPU machine (`accelerate launch --num_processes N benchmarks/gpu.py` for N GPUs;
`--quick --allow_cpu` is a CPU dry run of the same code, used by the tests). ViT-B/32 geometry at 224 px, bf16,
batch {args.batch_size} per device, synthetic data, NeuCLIP m = 4096, T_u = 10. Device: {name}
(peak {peak or 'unknown'} TFLOP/s bf16); {flops / 1e9:.1f} GFLOP per sample forward + backward.
torch {env['torch']}.

{markdown_table(header, rows)}
"""
        update_readme_section("gpu", body, args.readme)
        print(markdown_table(header, rows))
        print(f"wrote {json_path}")
    return payload


if __name__ == "__main__":
    main()
