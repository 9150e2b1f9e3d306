#!/usr/bin/env python
"""Does data ever stall training? Input-pipeline throughput next to what the training step consumes.

Measures, in one run on this machine:

* the input pipeline alone (`build_train_dataloader`: stream + decode + preprocess + tokenize + collate in
  DataLoader workers) in samples/s, for 1 / 2 / 4 workers and several output image sizes, on two sources: the
  embedded default (Fashion-MNIST 28 px PNGs in parquet shards) and a webdataset of 320 x 240 JPEGs (web-photo
  decode cost);
* the samples/s one training step consumes: forward + backward + AdamW of the default CPU model
  (`model_config("tiny", objective="neuclip", neuclip_num_prototypes=1024)`) at the same batch size, built for each
  image size;

and writes `input_pipeline.json` and `input_pipeline.png` to `--out_dir`. The target is pipeline >= 3 x train.

    python benchmarks/input_pipeline.py            # full run (a few minutes on 2 cores)
    python benchmarks/input_pipeline.py --quick    # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's neuclip_hf, not an installed copy
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from neuclip_hf import DataArguments, NeuCLIPModel, build_train_dataloader  # noqa: E402
from neuclip_hf.default_data import default_data_files, prepare_default_data  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402
from neuclip_hf.tokenization import build_clip_processor  # noqa: E402

TARGET_RATIO = 3.0  # the pipeline must deliver at least this multiple of what training consumes
TEXT_LENGTH = 32  # the tiny preset's max text positions
SETTINGS = {
    # mode: image sizes, worker counts, batch size, measured pipeline batches, timed train steps per size, rounds
    "full": {"sizes": (32, 64, 224), "workers": (1, 2, 4), "batch_size": 128, "batches": 16, "steps": 4, "rounds": 2},
    "quick": {"sizes": (64, 224), "workers": (1, 2), "batch_size": 32, "batches": 6, "steps": 1, "rounds": 1},
}


def write_jpeg_webdataset(root: Path, shards: int, per_shard: int, size=(320, 240), seed: int = 0) -> str:
    """Webdataset shards of smooth random 'photos' (JPEG, quality 90) with short captions; returns their glob."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(root / f"photos-{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = shard * per_shard + index
                coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # upsampled: JPEG sizes like real photos
                image = Image.fromarray(coarse, "RGB").resize(size, Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                text = f"a photo of object {key} in {['red', 'green', 'blue', 'warm'][key % 4]} light".encode()
                for name, data in ((f"{key:09d}.jpg", buffer.getvalue()), (f"{key:09d}.txt", text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / "*.tar")


def pipeline_rate(spec: str, image_size: int, workers: int, batch_size: int, batches: int) -> dict:
    """Steady-state samples/s of the training loader over `batches` batches.

    Each worker prefetches 2 batches while the others start, so the first `2 * workers` batches arrive in a burst;
    they are consumed first and reported as start-up time, not counted in the rate.
    """
    processor = build_clip_processor(image_size, TEXT_LENGTH)
    loader = build_train_dataloader(DataArguments(train_data=spec), processor, batch_size, workers, 0, 1, seed=0)
    warm = 2 * workers
    start = time.perf_counter()
    arrivals = []
    for batch in loader:
        arrivals.append(time.perf_counter())
        assert batch["pixel_values"].shape == (batch_size, 3, image_size, image_size)
        if len(arrivals) == warm + batches:
            break
    if len(arrivals) < warm + batches:
        raise RuntimeError(f"{spec}: only {len(arrivals)} batches of {batch_size}; need {warm + batches}")
    steady = batches * batch_size / (arrivals[-1] - arrivals[warm - 1])
    return {"samples_per_s": steady, "startup_s": arrivals[warm - 1] - start, "samples": batches * batch_size}


def train_rate(image_size: int, batch_size: int, steps: int) -> dict:
    """Samples/s consumed by forward + backward + AdamW of the default model (median of `steps` timed steps)."""
    torch.manual_seed(0)
    config = model_config("tiny", objective="neuclip", neuclip_num_prototypes=1024,
                          vision_config={"image_size": image_size})
    model = NeuCLIPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(1, 49406, (batch_size, TEXT_LENGTH))
    input_ids[:, 0], input_ids[:, -1] = 49406, 49407  # start and end tokens, as the tokenizer makes them
    batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size), "input_ids": input_ids,
             "attention_mask": torch.ones_like(input_ids), "sample_ids": torch.arange(batch_size)}
    times = []
    for step in range(steps + 1):  # the first step (allocations, lazy inits) is not timed
        start = time.perf_counter()
        loss = model(**batch, return_loss=True, update_normalizer=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
        if step:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"samples_per_s": batch_size / step_s, "step_s": step_s, "steps": steps,
            "parameters": sum(p.numel() for p in model.parameters())}


def markdown_table(result: dict) -> str:
    """Pipeline samples/s per source / size / workers next to the training step's, as a markdown table."""
    train = {row["image_size"]: row["samples_per_s"] for row in result["train_step"]}
    workers = sorted({row["workers"] for row in result["pipeline"]})
    lines = ["| source | image px | train step (samples/s) | " + " | ".join(f"pipeline {w}w" for w in workers)
             + " | best / train |", "|---|---:|---:|" + "---:|" * len(workers) + "---:|"]
    for summary in result["summary"]:
        rates = {row["workers"]: row["samples_per_s"] for row in result["pipeline"]
                 if row["source"] == summary["source"] and row["image_size"] == summary["image_size"]}
        cells = " | ".join(f"{rates[w]:,.0f}" for w in workers)
        lines.append(f"| {summary['source']} | {summary['image_size']} | {train[summary['image_size']]:,.0f} | "
                     f"{cells} | {summary['ratio']:.1f}x {'✓' if summary['target_met'] else '✗'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars: pipeline samples/s per size and worker count, one panel per source; marks: train step and 3x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(row["source"] for row in result["pipeline"]))
    sizes = sorted({row["image_size"] for row in result["pipeline"]})
    workers = sorted({row["workers"] for row in result["pipeline"]})
    train = {row["image_size"]: row["samples_per_s"] for row in result["train_step"]}
    figure, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(workers)
    for axis, source in zip(axes[0], sources, strict=True):
        for i, w in enumerate(workers):
            rates = [next(r["samples_per_s"] for r in result["pipeline"] if r["source"] == source
                          and r["image_size"] == s and r["workers"] == w) for s in sizes]
            axis.bar(np.arange(len(sizes)) + (i - (len(workers) - 1) / 2) * width, rates, width,
                     label=f"pipeline, {w} worker{'s' if w > 1 else ''}")
        for j, s in enumerate(sizes):
            axis.hlines(train[s], j - 0.45, j + 0.45, colors="black", linewidth=2,
                        label="training step consumes" if j == 0 else None)
            axis.hlines(TARGET_RATIO * train[s], j - 0.45, j + 0.45, colors="red", linestyles="dashed",
                        label=f"{TARGET_RATIO:g}x target" if j == 0 else None)
        axis.set_xticks(range(len(sizes)), [f"{s} px" for s in sizes])
        axis.set_yscale("log")
        axis.set_title(source)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("samples / s")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    figure.suptitle(f"Input pipeline vs training step, batch {result['batch_size']}, "
                    f"{result['machine']['cpu_count']} CPU cores" + (" (quick)" if result["quick"] else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes, workers, batches and steps")
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    mode = SETTINGS["quick" if args.quick else "full"]
    batch_size, batches = mode["batch_size"], mode["batches"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="neuclip-bench-"))
    load_start = list(os.getloadavg())  # other work on the machine skews both measurements: record it
    started = time.perf_counter()
    # Workers deliver batches in turn, so each of the 8 shards must hold its share of the measured batches plus
    # one batch of slack (a worker's last partial batch is dropped).
    needed = batch_size * (batches + 2 * max(mode["workers"]))
    if args.quick:  # a small prepared copy: the shared cache keeps the full default data
        fashion = ",".join(prepare_default_data(scratch / "fm", limit=2 * needed + 8 * batch_size)["train"])
    else:
        fashion = ",".join(default_data_files("train"))
    photos = write_jpeg_webdataset(scratch / "photos", shards=8, per_shard=needed // 8 + batch_size)
    sources = {"fashion-mnist parquet (28 px PNG)": fashion, "webdataset (320x240 JPEG)": photos}

    # Rounds interleave the training-step and pipeline measurements of each size; each number is the best of the
    # rounds, since other work on the machine can only slow a measurement down.
    train_runs: dict[int, list[dict]] = {size: [] for size in mode["sizes"]}
    pipeline_runs: dict[tuple, list[dict]] = {}
    for round_index in range(mode["rounds"]):
        for size in mode["sizes"]:
            train_runs[size].append(train_rate(size, batch_size, mode["steps"]))
            print(f"[round {round_index + 1}] train step {size:>3} px: {train_runs[size][-1]['samples_per_s']:8.1f} "
                  "samples/s", flush=True)
            for source, spec in sources.items():
                for workers in mode["workers"]:
                    run = pipeline_rate(spec, size, workers, batch_size, batches)
                    pipeline_runs.setdefault((source, size, workers), []).append(run)
                    print(f"[round {round_index + 1}] pipeline {source:<34} {size:>3} px {workers} workers: "
                          f"{run['samples_per_s']:8.1f} samples/s", flush=True)
    train_step = []
    for size, runs in train_runs.items():
        best = max(runs, key=lambda r: r["samples_per_s"])
        train_step.append({"image_size": size, **best, "samples_per_s_runs": [r["samples_per_s"] for r in runs]})
    train = {row["image_size"]: row["samples_per_s"] for row in train_step}
    pipeline = []
    for (source, size, workers), runs in pipeline_runs.items():
        best = max(runs, key=lambda r: r["samples_per_s"])
        pipeline.append({"source": source, "image_size": size, "workers": workers, **best,
                         "samples_per_s_runs": [r["samples_per_s"] for r in runs],
                         "ratio_to_train": best["samples_per_s"] / train[size]})
    summary = []
    for source in sources:
        for size in mode["sizes"]:
            best = max((r for r in pipeline if r["source"] == source and r["image_size"] == size),
                       key=lambda r: r["samples_per_s"])
            summary.append({"source": source, "image_size": size, "best_workers": best["workers"],
                            "best_samples_per_s": best["samples_per_s"], "train_samples_per_s": train[size],
                            "ratio": best["ratio_to_train"], "target_met": best["ratio_to_train"] >= TARGET_RATIO})
    result = {
        "benchmark": "input_pipeline", "quick": args.quick, "target_ratio": TARGET_RATIO,
        "batch_size": batch_size, "text_length": TEXT_LENGTH, "model": "tiny, objective=neuclip, 1024 prototypes",
        "rounds": mode["rounds"], "statistic": "best of the rounds",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_start": load_start,
                    "load_average_end": list(os.getloadavg())},
        "train_step": train_step, "pipeline": pipeline, "summary": summary,
        "wall_s": time.perf_counter() - started,
    }
    (args.out_dir / "input_pipeline.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out_dir / "input_pipeline.png")
    print(markdown_table(result))
    print(f"wrote {args.out_dir / 'input_pipeline.json'} and input_pipeline.png in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
