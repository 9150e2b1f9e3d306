"""Timing training steps: NeuCLIPTrainer (any objective) and a plain `Trainer` on `CLIPModel(return_loss=True)` (what
HF's contrastive example trains), on the same model geometry, batch and synthetic data.

Used by `step_cost.py` (CPU, side by side in one run) and `gpu.py` (ViT-B/32, bf16). Each measurement can run in a
fresh subprocess (`--worker`), so its peak memory is its own.
"""

from __future__ import annotations

import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import CLIPConfig, CLIPModel, Trainer, TrainerCallback, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import summarise_profile  # noqa: E402
from neuclip_hf import NeuCLIPModel  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments  # noqa: E402


class SyntheticPairs(Dataset):
    """Random images and captions (ending in end-of-text) of a model's geometry; sample ids included.

    Args:
        config: The model config (image size, vocabulary, context length).
        size: Number of samples (and distinct sample ids).
        seed: Seed of the random data.
        text_length: Tokens per caption (default: min(context length, 32)).
        pool: Distinct image-caption pairs stored, cycled over the `size` samples (default: `size`); a step's cost
            does not depend on the values, and ViT-B/32 batches of 256 would otherwise take gigabytes.
        device: Where the data lives (on a GPU, the step is timed without the host-to-device copy of an input
            pipeline, which a real loader overlaps with the step).
    """

    def __init__(self, config, size: int, seed: int = 0, text_length: int | None = None, pool: int | None = None,
                 device: str | torch.device = "cpu"):
        generator = torch.Generator().manual_seed(seed)
        vision, text = config.vision_config, config.text_config
        length = text_length or min(text.max_position_embeddings, 32)
        stored = min(size, pool or size)
        self.size = size
        self.pixels = torch.randn(stored, 3, vision.image_size, vision.image_size, generator=generator).to(device)
        self.ids = torch.randint(0, text.eos_token_id, (stored, length), generator=generator)
        self.ids[:, -1] = text.eos_token_id
        self.ids = self.ids.to(device)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.ids)
        return {"pixel_values": self.pixels[j], "input_ids": self.ids[j],
                "sample_ids": torch.tensor(i, device=self.ids.device)}


def _plain_collate(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": torch.stack([r["input_ids"] for r in rows]), "return_loss": True}


class StepTimer(TrainerCallback):
    """Wall time (synchronising CUDA) and process CPU time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._start = self._cpu_start = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = self._now(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


class StepProfiler(TrainerCallback):
    """Profiles the last optimizer step of a run (CPU operators); `summary` holds `summarise_profile`'s result."""

    def __init__(self, last_step: int):
        self.last_step = last_step
        self.summary: dict | None = None
        self._profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.last_step:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.summary = summarise_profile(self._profiler)
            self._profiler = None


class EstimatorTimer:
    """Wall time of every `normalizer.update` call (synchronising CUDA), installed on the normalizer instance."""

    def __init__(self, normalizer):
        self.times: list[float] = []
        self._update = normalizer.update
        normalizer.update = self

    def __call__(self, inputs):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.profiler.record_function("normalizer_update"):
            diagnostics = self._update(inputs)
        sync()
        self.times.append(time.perf_counter() - start)
        return diagnostics


def measure(kind: str, preset: str, batch_size: int, steps: int, warmup: int, bf16: bool = False,
            overrides: dict | None = None, device: str = "auto", text_length: int | None = None,
            threads: int | None = None, optim: str | None = None, time_estimator: bool = False,
            profile: bool = False, **training_overrides) -> dict:
    """Time `steps` training steps after `warmup` ones; `kind` is `plain` or a NeuCLIP objective.

    Args:
        kind: `plain` (a `Trainer` on `CLIPModel(return_loss=True)`) or an objective of `NeuCLIPTrainer`.
        preset: Model geometry (`neuclip_hf.presets`).
        batch_size: Per-device batch.
        steps, warmup: Timed steps, and untimed ones before them.
        bf16: Train under bf16 autocast.
        overrides: `NeuCLIPConfig` fields (`text_config` / `vision_config` dicts are merged into the preset's,
            e.g. `{"vision_config": {"hidden_act": "quick_gelu"}}`; `attn_implementation` sets the attention kernel).
        device: `cpu` forces the CPU; `auto` uses the accelerator when there is one.
        text_length: Tokens per caption (default: min(context length, 32)).
        threads: torch threads for this measurement (default: as configured).
        optim: `TrainingArguments.optim` (default: the Trainer's, fused AdamW).
        time_estimator: Also time the normalizer's update inside each step (`estimator_seconds_per_step`).
        profile: Profile one more step after the timed ones (`profile`: top operators, optimizer and estimator).
        **training_overrides: Other `TrainingArguments` fields (e.g. `gradient_checkpointing=True`).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides = dict(overrides or {})
    attn_implementation = overrides.pop("attn_implementation", None)
    config = model_config(preset, objective="clip" if kind == "plain" else kind,
                          fastclip_dataset_size=batch_size * (steps + warmup) * 4, **overrides)
    gpu = device != "cpu" and torch.cuda.is_available()
    data_device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if gpu else "cpu"
    dataset = SyntheticPairs(config, batch_size * (steps + warmup + 1) * 2, text_length=text_length,
                             pool=2 * batch_size, device=data_device)
    total_steps = steps + warmup + int(profile)
    common = dict(output_dir=str(ROOT / "benchmarks" / ".cache" / "throughput"), max_steps=total_steps,
                  per_device_train_batch_size=batch_size, learning_rate=1e-4, save_strategy="no", report_to=[],
                  disable_tqdm=True, logging_steps=10**6, bf16=bf16, use_cpu=device == "cpu",
                  dataloader_num_workers=0, dataloader_pin_memory=not gpu, seed=0,
                  **({"optim": optim} if optim else {}), **training_overrides)
    timer = StepTimer()
    callbacks = [timer] + ([StepProfiler(total_steps)] if profile else [])
    if kind == "plain":
        clip_config = CLIPConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                                 projection_dim=config.projection_dim)
        model = CLIPModel(clip_config) if attn_implementation is None else \
            CLIPModel._from_config(clip_config, attn_implementation=attn_implementation)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=_plain_collate, callbacks=callbacks)
    else:
        model = NeuCLIPModel(config) if attn_implementation is None else \
            NeuCLIPModel._from_config(config, attn_implementation=attn_implementation)
        trainer = NeuCLIPTrainer(model=model, args=NeuCLIPTrainingArguments(**common),
                                 train_dataset=dataset, callbacks=callbacks)
    estimator = EstimatorTimer(trainer.core_model.normalizer) if time_estimator and kind != "plain" else None
    if torch.cuda.is_available():
        gc.collect()  # earlier measurements' trainers hold reference cycles: free their GPU memory first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with redirect_stdout(io.StringIO()):
        trainer.train()
    timed = timer.times[warmup:warmup + steps]
    seconds = statistics.median(timed)
    result = {
        "kind": kind, "preset": preset, "batch_size": batch_size, "steps": len(timed), "bf16": bf16,
        "seconds_per_step": seconds, "samples_per_second": batch_size / seconds,
        "step_time_spread": [min(timed), max(timed)], "step_seconds": timed, "first_step_seconds": timer.times[0],
        "step_cpu_seconds": timer.cpu_times[warmup:warmup + steps],
        "threads": torch.get_num_threads(), "optim": str(trainer.args.optim.value),
        "world_size": trainer.accelerator.num_processes,
        "attn_implementation": model.config._attn_implementation,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if estimator is not None:
        result["estimator_seconds_per_step"] = statistics.median(estimator.times[warmup:warmup + steps])
    if profile:
        result["profile"] = callbacks[-1].summary
    if torch.cuda.is_available():
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def measure_in_subprocess(**kwargs) -> dict:
    """`measure` in a fresh Python process, so its peak memory is its own."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {kwargs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure(**json.loads(sys.argv[2]))))
