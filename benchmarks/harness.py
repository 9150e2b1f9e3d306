"""Shared experiment harness of the quality and accuracy benchmarks.

Data are decoded and preprocessed once through the package's own pipeline (`build_eval_dataloader`) and kept as
tensors (cached under `benchmarks/.cache`), so the experiments measure the objectives, not PNG decoding. Training
runs go through `NeuCLIPTrainer` on an in-memory dataset with the tiny model preset.

Two datasets:
- `default`: the embedded Fashion-MNIST captions (10 classes, templated captions): zero-shot acc1 on the test split.
- `mosaic`: 32 x 32 mosaics of 2-4 Fashion-MNIST items (16 x 16 each) in a 2 x 2 grid, captioned by position
  ("a bag at the top left and a sandal at the bottom right."): about 14.6k possible captions, far more than a
  batch, so the in-batch normalizer is a poor estimate of the dataset-wide one. Held-out image-text retrieval.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from neuclip_hf import NeuCLIPModel
from neuclip_hf.data import DataArguments, build_eval_dataloader
from neuclip_hf.default_data import FASHION_MNIST_CLASSES, default_data_files, load_fashion_mnist
from neuclip_hf.metrics import RECALL_KS, classification_metrics, query_hits, retrieval_metrics
from neuclip_hf.presets import model_config
from neuclip_hf.tokenization import build_clip_processor
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments
from neuclip_hf.diagnostics import embed_pairs
from neuclip_hf.zero_shot import evaluation_mode, load_templates, zero_shot_classifier

CACHE = Path(os.environ.get("NEUCLIP_BENCH_CACHE", Path(__file__).parent / ".cache"))
IMAGE_SIZE, TEXT_LENGTH = 32, 32
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
MOSAIC_SPLITS = {"train": ("train", 0, 50_000), "val": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}


def _save(data: dict, path: Path) -> None:
    """Atomic write: parallel workers never read a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(data, tmp)
    os.replace(tmp, path)


def processor():
    return build_clip_processor(image_size=IMAGE_SIZE, model_max_length=TEXT_LENGTH)


def _encode(rows, proc) -> dict:
    """Preprocessed tensors of (image, caption) pairs, through the package's decoding and processor."""
    pixel = proc.image_processor(images=[r[0] for r in rows], return_tensors="pt")["pixel_values"]
    text = proc.tokenizer([r[1] for r in rows], padding="max_length", truncation=True, max_length=TEXT_LENGTH,
                          return_tensors="pt")
    return {"pixel_values": pixel.half(), "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def default_pairs(split: str, limit: int | None = None) -> dict:
    """The embedded dataset's split as tensors (plus `labels`), decoded once by the streaming pipeline."""
    path = CACHE / f"default-{split}-{limit}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    proc = processor()
    args = DataArguments(eval_data=",".join(default_data_files(split)), max_text_length=TEXT_LENGTH)
    loader = build_eval_dataloader(args, proc, batch_size=1024, keep_columns=("label",))
    parts: dict[str, list] = {}
    for batch in loader:
        for key in ("pixel_values", "input_ids", "attention_mask", "sample_ids", "label"):
            value = batch[key]
            parts.setdefault(key, []).append(value.half() if key == "pixel_values" else value)
        if limit is not None and sum(len(p) for p in parts["label"]) >= limit:
            break
    data = {k: torch.cat(v)[:limit] for k, v in parts.items()}
    data["labels"] = data.pop("label")
    data["sample_ids"] = torch.arange(len(data["labels"]))  # dense ids for FastCLIP's table
    _save(data, path)
    return data


def _mosaic(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, variant: str = "positions"):
    """One mosaic and its caption. `positions`: 2-4 items, about 14.6k possible captions (2-item captions repeat
    often: those repeats are false negatives). `tones`: 4 items, each shown dark or light, 20^4 = 160k captions."""
    from PIL import Image

    count = rng.integers(2, 5) if variant == "positions" else 4
    cells = sorted(rng.choice(4, size=count, replace=False))
    canvas = Image.new("L", (32, 32))
    phrases = []
    for cell in cells:
        index = rng.integers(len(images))
        item = Image.fromarray(images[index]).resize((16, 16), Image.LANCZOS)
        name = FASHION_MNIST_CLASSES[labels[index]]
        if variant == "tones":
            dark = bool(rng.integers(2))
            item = item.point(lambda v: v * 0.4) if dark else item  # dark items at 40% intensity
            name = ("dark " if dark else "light ") + name
        canvas.paste(item, ((cell % 2) * 16, (cell // 2) * 16))
        article = "an" if name[0] in "aeiou" else "a"
        phrases.append(f"{article} {name} at the {POSITIONS[cell]}")
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return canvas.convert("RGB"), caption + "."


def mosaic_pairs(split: str, count: int, seed: int = 0, variant: str = "positions") -> dict:
    """`count` mosaics built from a disjoint part of Fashion-MNIST (`train` / `val` / `test`), as tensors."""
    path = CACHE / f"mosaic-{variant}-{split}-{count}-{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    source, start, stop = MOSAIC_SPLITS[split]
    images, labels = load_fashion_mnist(source)
    images, labels = images[start:stop], labels[start:stop]
    rng = np.random.default_rng(seed + {"train": 0, "val": 1000, "test": 2000}[split])
    proc = processor()
    rows = [_mosaic(images, labels, rng, variant) for _ in range(count)]
    data = {}
    for chunk in range(0, count, 2048):
        for key, value in _encode(rows[chunk:chunk + 2048], proc).items():
            data.setdefault(key, []).append(value)
    data = {k: torch.cat(v) for k, v in data.items()}
    data["sample_ids"] = torch.arange(count)
    data["captions"] = [r[1] for r in rows]
    _save(data, path)
    return data


class TensorPairs(Dataset):
    """Map-style dataset over preprocessed tensors (what `NeuCLIPTrainer` trains on here)."""

    KEYS = ("pixel_values", "input_ids", "attention_mask", "sample_ids")

    def __init__(self, data: dict):
        self.data = {k: data[k] for k in self.KEYS}

    def __len__(self) -> int:
        return len(self.data["sample_ids"])

    def __getitem__(self, index: int) -> dict:
        item = {k: v[index] for k, v in self.data.items()}
        item["pixel_values"] = item["pixel_values"].float()
        return item


def build_trainer(objective: str, data: dict, steps: int, batch_size: int, seed: int = 0, learning_rate: float = 1e-3,
                  output_dir: str | Path | None = None, callbacks=(), training_args: dict | None = None,
                  **overrides) -> NeuCLIPTrainer:
    """A NeuCLIPTrainer for the tiny preset on in-memory pairs (no checkpoints, no console logging).

    The training set's length is the epoch (the trainer writes it into `config.train_num_samples`), so FastCLIP's
    gamma, AmorLIP's epochs and epoch-based rho schedules run in true epochs. `training_args` override the
    `NeuCLIPTrainingArguments` (e.g. `temperature_learning_rate`, `rho_schedule`); `overrides` the config.
    """
    torch.manual_seed(seed)
    config_overrides = {"fastclip_dataset_size": len(data["sample_ids"]), "neuclip_num_prototypes": 1024,
                        **overrides}
    model = NeuCLIPModel(model_config("tiny", objective=objective, **config_overrides))
    arguments = dict(
        output_dir=str(output_dir or CACHE / "runs"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, warmup_steps=max(1, steps // 20), temperature_learning_rate=2e-4,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], disable_tqdm=True, seed=seed,
        data_seed=seed, use_cpu=True, dataloader_num_workers=0,
    )
    arguments.update(training_args or {})
    args = NeuCLIPTrainingArguments(**arguments)
    return NeuCLIPTrainer(model=model, args=args, train_dataset=TensorPairs(data), callbacks=list(callbacks))


def unique_captions(data: dict) -> dict:
    """The pairs whose caption is the first occurrence of that caption (deduplicated training data), with dense
    sample ids."""
    first = {}
    for index, caption in enumerate(data["captions"]):
        first.setdefault(caption, index)
    keep = torch.tensor(sorted(first.values()))
    out = {k: v[keep] for k, v in data.items() if torch.is_tensor(v)}
    out["captions"] = [data["captions"][i] for i in keep.tolist()]
    out["sample_ids"] = torch.arange(len(keep))
    return out


def embed(model, data: dict, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings of preprocessed pairs, in eval mode (the model's mode is restored afterwards)."""
    with evaluation_mode(model):
        return embed_pairs(model, data["pixel_values"], data["input_ids"], data["attention_mask"], batch_size)


def zero_shot_accuracy(model, test: dict, templates: str = "openai") -> dict:
    """acc1 / mean per-class recall of class-name prompts on labelled pairs."""
    with evaluation_mode(model):
        weights = zero_shot_classifier(model, processor(), list(FASHION_MNIST_CLASSES), load_templates(templates))
    images, _ = embed(model, test)
    metrics = classification_metrics(images @ weights, test["labels"])
    return {"acc1": metrics["acc1"], "mean_per_class_recall": metrics["mean_per_class_recall"]}


def retrieval(model, test: dict, caption_aware: bool = False) -> dict:
    """Image->text and text->image recall@{1,5,10} on paired data (each query's positive is its own pair).

    `caption_aware`: also `caption_*` recalls, where any pair whose caption is identical to the query pair's counts
    as a hit (on data with repeated captions a copy of the true caption is not a retrieval error).
    """
    images, texts = embed(model, test)
    metrics = retrieval_metrics(images, texts, torch.arange(len(texts)))
    if caption_aware:
        codes = {}
        groups = torch.tensor([codes.setdefault(c, len(codes)) for c in test["captions"]])
        same = groups[:, None] == groups[None, :]  # (pairs, pairs): identical captions
        scores = images.float() @ texts.float().T
        for name, query_scores in (("text_retrieval", scores), ("image_retrieval", scores.T)):
            hits = query_hits(query_scores, same, RECALL_KS)
            metrics.update({f"caption_{name}_recall@{k}": float(hits[k].mean()) for k in RECALL_KS})
    return metrics


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return mean, std
