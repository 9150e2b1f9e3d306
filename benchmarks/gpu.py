"""GPU throughput in one command: ViT-B/32 at 224 px, bf16, batch 256 per device, synthetic data, no downloads.

For a plain `Trainer` on `CLIPModel(return_loss=True)` and for `NeuCLIPTrainer` with every objective: samples/s,
model FLOPs utilisation (MFU), peak GPU memory and the estimator's share of the step; for every objective, a check
that the bf16-autocast loss matches the fp32 loss on the same batch and weights (and stays fp32). With two or more
GPUs it also runs the 2-GPU DDP path (`torch.distributed.run`, NCCL) at the same per-device batch, with NeuCLIP
under both its prototype (default) and anchor update splits. It writes
`results/gpu.json` and the README's `gpu` section. Sized for under 5 minutes on one H100-class GPU (6 runs of 5 + 20
steps at batch 256, plus the DDP runs with two GPUs); never run on a GPU yet, so that time is an estimate.

    python benchmarks/gpu.py                            # one command: 1 GPU, and 2-GPU DDP when two are present
    python benchmarks/gpu.py --quick --allow_cpu        # a CPU dry run of the same code path (tests)
    python benchmarks/gpu.py --quick --allow_cpu --ddp  # ... with the DDP path in 2 gloo processes

MFU = (encoder forward + backward FLOPs per sample, counted with torch's FlopCounterMode at the measured geometry)
x samples/s per device / peak dense bf16 FLOP/s of the device (known for common data-centre GPUs; `--peak_tflops`
otherwise). The estimator's own FLOPs are not model FLOPs, so its cost shows as lower MFU and as its share of the
step (its update timed inside the step, between device synchronisations).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, markdown_table, update_readme_section, write_json  # noqa: E402
from benchmarks.throughput import SyntheticPairs, measure  # noqa: E402
from neuclip_hf import OBJECTIVES, NeuCLIPModel  # noqa: E402
from neuclip_hf.distributed import end_process_group  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.0}
NEUCLIP_OVERRIDES = {"neuclip_num_prototypes": 4096, "neuclip_inner_steps": 10}  # the paper's m and T_u
TEXT_LENGTH = 77  # tokens per caption, as the recipes pad them
# bf16 rounds to 8 significant bits (2^-9 ~ 2e-3 per operation); a randomly initialised ViT-B/32 loss moves by
# well under 1% (tests/test_training_modes.py states the same bound on CPU).
BF16_LOSS_RTOL = 1e-2


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _batch(config, size: int, device: str) -> dict:
    data = SyntheticPairs(config, size, text_length=min(TEXT_LENGTH, config.text_config.max_position_embeddings))
    return {"pixel_values": data.pixels.to(device), "input_ids": data.ids.to(device),
            "sample_ids": torch.arange(size, device=device)}


def encoder_flops_per_sample(preset: str, device: str) -> float:
    """Forward + backward FLOPs of both encoders per sample (clip objective, whose loss FLOPs are negligible)."""
    model = NeuCLIPModel(model_config(preset, objective="clip")).to(device)
    batch = _batch(model.config, 2, device)
    batch.pop("sample_ids")
    with FlopCounterMode(display=False) as counter:
        model(**batch, return_loss=True).loss.backward()
    return counter.get_total_flops() / 2


def precision_check(objective: str, preset: str, batch_size: int, device: str) -> dict:
    """The training loss (estimator update included) in fp32 and under bf16 autocast, same weights and batch."""
    torch.manual_seed(0)
    config = model_config(preset, objective=objective, fastclip_dataset_size=4 * batch_size,
                          train_num_samples=4 * batch_size, **NEUCLIP_OVERRIDES)
    model = NeuCLIPModel(config).to(device).train()
    twin = copy.deepcopy(model)
    batch = _batch(config, batch_size, device)
    fp32 = model(**batch, return_loss=True, update_normalizer=True).loss.detach()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        bf16 = twin(**batch, return_loss=True, update_normalizer=True)
    loss = bf16.loss.detach()
    state_fp32 = all(t.dtype == torch.float32 for t in twin.normalizer.state_dict().values() if t.is_floating_point())
    relative = float((loss - fp32).abs() / fp32.abs().clamp_min(1e-12))
    return {"objective": objective, "loss_fp32": float(fp32), "loss_bf16": float(loss),
            "relative_difference": relative, "loss_dtype": str(loss.dtype).removeprefix("torch."),
            "estimator_state_fp32": state_fp32,
            "passed": relative <= BF16_LOSS_RTOL and loss.dtype == torch.float32 and state_fp32}


def measure_kind(kind: str, args, device: str, bf16: bool, **overrides) -> dict:
    """One throughput row: `kind` (`plain` or an objective) at the run's geometry, with extra config `overrides`."""
    return measure(kind, args.preset, args.batch_size, args.steps, args.warmup, bf16=bf16,
                   overrides={**NEUCLIP_OVERRIDES, **overrides}, device="cpu" if device == "cpu" else "auto",
                   text_length=TEXT_LENGTH if args.preset != "tiny" else None, time_estimator=kind != "plain")


def throughput(kinds, args, device: str, bf16: bool) -> dict:
    return {kind: measure_kind(kind, args, device, bf16) for kind in kinds}


ANCHOR_SPLIT = "neuclip (anchor split)"  # the DDP rows' extra run: `neuclip_update_sharding=anchors`


def run_ddp(args, processes: int) -> dict:
    """The throughput rows again, in `processes` ranks (`torch.distributed.run`; NCCL on GPUs, gloo on CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "ddp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, "--ddp_worker", str(result_file), "--preset", args.preset,
                   "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.allow_cpu:
            command.append("--allow_cpu")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.ddp_timeout)
        if done.returncode != 0:
            raise RuntimeError(f"the {processes}-process DDP run failed:\n{done.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def ddp_worker(args, device: str) -> None:
    """One rank of `run_ddp`: every rank measures (DDP needs them all); rank 0 writes the results."""
    import gc

    results = throughput(("plain",) + OBJECTIVES, args, device, bf16=args.bf16)
    # NeuCLIP's other update split beside the default prototype split, measured where it differs (docs/scale.md).
    results[ANCHOR_SPLIT] = measure_kind("neuclip", args, device, args.bf16, neuclip_update_sharding="anchors")
    if int(os.environ.get("RANK", 0)) == 0:
        payload = {"world_size": int(os.environ["WORLD_SIZE"]), "results": results}
        Path(args.ddp_worker).write_text(json.dumps(payload))
    # Tear down in order, as tests/test_lora.py does: free the DDP-wrapped models (their reducers) while the process
    # group is alive, then destroy the group on every rank together (`end_process_group`).
    gc.collect()
    end_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=256, help="per device")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s if the GPU is unknown")
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 4, 2 steps (a dry run)")
    parser.add_argument("--allow_cpu", action="store_true", help="run without a GPU (numbers are not GPU numbers)")
    parser.add_argument("--ddp", action="store_true",
                        help="also run the 2-process DDP path (automatic with two or more GPUs; gloo on CPU)")
    parser.add_argument("--no_ddp", action="store_true", help="skip the DDP path even with two GPUs")
    parser.add_argument("--ddp_timeout", type=float, default=900, help="seconds before the DDP run counts as failed")
    parser.add_argument("--ddp_worker", default=None, help=argparse.SUPPRESS)  # internal: rank of the DDP run
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("no GPU found: run on a GPU machine, or pass --allow_cpu for a dry run of the code path")
    if args.quick:
        args.preset, args.batch_size, args.steps, args.warmup = "tiny", 4, 2, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.bf16 = True  # bf16 autocast on the GPU, and on the CPU for the dry run (CPU autocast supports bf16)
    if args.ddp_worker:
        ddp_worker(args, device)
        return {}
    started = time.perf_counter()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    flops = encoder_flops_per_sample(args.preset, device)
    results = throughput(("plain",) + OBJECTIVES, args, device, bf16=args.bf16)
    _add_derived(results, flops, peak)
    precision = {objective: precision_check(objective, args.preset, min(args.batch_size, 64), device)
                 for objective in OBJECTIVES}
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ddp = None
    if (args.ddp or gpus >= 2) and not args.no_ddp:
        ddp = run_ddp(args, 2)
        _add_derived(ddp["results"], flops, peak)
    payload = {"device": name, "gpus": gpus, "preset": args.preset, "batch_size_per_device": args.batch_size,
               "text_length": TEXT_LENGTH if args.preset != "tiny" else None, "bf16": args.bf16,
               "peak_tflops": peak, "encoder_flops_per_sample": flops, "results": results, "precision": precision,
               "ddp": ddp, "quick": args.quick, "seconds": time.perf_counter() - started}
    json_path = write_json("gpu", payload, args.out_dir)
    update_readme_section("gpu", _readme(payload), args.readme)
    print(f"wrote {json_path} in {payload['seconds']:.0f} s")
    return payload


def _add_derived(results: dict, flops: float, peak: float | None) -> None:
    for m in results.values():
        m["mfu"] = flops * m["samples_per_second"] / (peak * 1e12) if peak else None
        if "estimator_seconds_per_step" in m:
            m["estimator_share"] = m["estimator_seconds_per_step"] / m["seconds_per_step"]


def _rows(results: dict, label: str) -> list[list]:
    plain = results["plain"]["samples_per_second"]
    rows = []
    for kind, m in results.items():
        memory = m.get("peak_gpu_bytes", m["peak_rss_bytes"]) / 2**30
        share = f"{100 * m['estimator_share']:.2f}%" if "estimator_share" in m else ""
        rows.append([label, kind, round(m["samples_per_second"], 1),
                     f"{100 * (m['samples_per_second'] / plain - 1):+.1f}%",
                     f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a", round(memory, 2), share])
    return rows


def _readme(payload: dict) -> str:
    env = environment()
    rows = _rows(payload["results"], "1 device")
    if payload["ddp"]:
        rows += _rows(payload["ddp"]["results"], f"DDP x {payload['ddp']['world_size']}")
    header = ["run", "trainer / objective", "samples/s per device", "vs plain Trainer", "MFU",
              "peak memory GiB", "estimator share"]
    checks = [[c["objective"], f"{c['loss_fp32']:.4f}", f"{c['loss_bf16']:.4f}", f"{c['relative_difference']:.1e}",
               c["loss_dtype"], "yes" if c["passed"] else "NO"] for c in payload["precision"].values()]
    dry_run = ("\n**CPU dry run** (`--quick --allow_cpu`): the code path works; these are not GPU numbers, and no GPU "
               "result is recorded in this section yet.\n" if payload["device"] == "cpu" else "")
    memory = "peak GPU memory" if payload["device"] != "cpu" else "peak RSS of the process"
    return f"""## gpu

`python benchmarks/gpu.py` (one command, no downloads; with two or more GPUs it adds the 2-GPU DDP rows;
`--quick --allow_cpu [--ddp]` is a CPU dry run of the same code, used by the tests). {payload['preset']} geometry,
bf16 autocast, batch {payload['batch_size_per_device']} per device, synthetic data, NeuCLIP m = 4096, T_u = 10.
Device: {payload['device']} x {max(payload['gpus'], 1)} (peak {payload['peak_tflops'] or 'unknown'} TFLOP/s bf16);
{payload['encoder_flops_per_sample'] / 1e9:.1f} GFLOP per sample forward + backward (FlopCounterMode). Memory:
{memory}. Estimator share: the normalizer update's time inside the step. torch {env['torch']}, transformers
{env.get('transformers')}; {payload['seconds']:.0f} s in all.
{dry_run}
{markdown_table(header, rows)}

bf16 autocast against fp32, one training forward (estimator update included) on the same weights and batch
(pass: relative difference <= {BF16_LOSS_RTOL:g}, loss and estimator state in fp32):

{markdown_table(['objective', 'loss fp32', 'loss bf16', 'relative difference', 'bf16 loss dtype', 'pass'], checks)}
"""


if __name__ == "__main__":
    main()
