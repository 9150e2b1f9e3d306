"""Timing training steps: NeuCLIPTrainer (any objective) and a plain `Trainer` on `CLIPModel(return_loss=True)` (what
HF's contrastive example trains), on the same model geometry, batch and synthetic data.

Used by `step_cost.py` (CPU, side by side in one run) and `gpu.py` (ViT-B/32, bf16). Each measurement can run in a
fresh subprocess (`--worker`), so its peak memory is its own.
"""

from __future__ import annotations

import io
import json
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
from neuclip_hf import NeuCLIPModel  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments  # noqa: E402


class SyntheticPairs(Dataset):
    """Random images and captions (ending in end-of-text) of a model's geometry; sample ids included."""

    def __init__(self, config, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        vision, text = config.vision_config, config.text_config
        length = min(text.max_position_embeddings, 32)
        self.pixels = torch.randn(size, 3, vision.image_size, vision.image_size, generator=generator)
        self.ids = torch.randint(0, text.eos_token_id, (size, length), generator=generator)
        self.ids[:, -1] = text.eos_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "input_ids": self.ids[i], "sample_ids": torch.tensor(i)}


def _plain_collate(rows: list[dict]) -> dict:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": torch.stack([r["input_ids"] for r in rows]), "return_loss": True}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronising CUDA)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._start)


def measure(kind: str, preset: str, batch_size: int, steps: int, warmup: int, bf16: bool = False,
            overrides: dict | None = None, device: str = "auto") -> dict:
    """Time `steps` training steps after `warmup` ones; `kind` is `plain` or a NeuCLIP objective."""
    torch.manual_seed(0)
    config = model_config(preset, objective="clip" if kind == "plain" else kind,
                          fastclip_dataset_size=batch_size * (steps + warmup) * 4, **(overrides or {}))
    dataset = SyntheticPairs(config, batch_size * (steps + warmup) * 2)
    common = dict(output_dir=str(ROOT / "benchmarks" / ".cache" / "throughput"), max_steps=steps + warmup,
                  per_device_train_batch_size=batch_size, learning_rate=1e-4, save_strategy="no", report_to=[],
                  disable_tqdm=True, logging_steps=10**6, bf16=bf16, use_cpu=device == "cpu",
                  dataloader_num_workers=0, seed=0)
    timer = StepTimer()
    if kind == "plain":
        clip_config = CLIPConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                                 projection_dim=config.projection_dim)
        trainer = Trainer(model=CLIPModel(clip_config), args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=_plain_collate, callbacks=[timer])
    else:
        trainer = NeuCLIPTrainer(model=NeuCLIPModel(config), args=NeuCLIPTrainingArguments(**common),
                                 train_dataset=dataset, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with redirect_stdout(io.StringIO()):
        trainer.train()
    timed = timer.times[warmup:]
    seconds = statistics.median(timed)
    result = {
        "kind": kind, "preset": preset, "batch_size": batch_size, "steps": len(timed), "bf16": bf16,
        "seconds_per_step": seconds, "samples_per_second": batch_size / seconds,
        "step_time_spread": [min(timed), max(timed)],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
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
