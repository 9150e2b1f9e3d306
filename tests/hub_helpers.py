"""A small real-vocabulary model trained for a few steps with an in-training zero-shot evaluation, for the Hub and
model-card tests (used in the pytest process and in the Hub subprocesses)."""

import io

import torch
from torch.utils.data import Dataset
from zero_shot_helpers import SMALL_TOWER, random_images, small_processor

from neuclip_hf import NeuCLIPModel
from neuclip_hf.data.eval_data import EvalData, normalize_row
from neuclip_hf.evaluation import ZeroShotEvalCallback, ZeroShotEvaluator
from neuclip_hf.presets import model_config
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments

CLASSES = ["cat", "dog", "car", "tree", "boat"]
PROMPTS = ["a photo of a {}."]


class CaptionPairs(Dataset):
    """`n` random images with captions naming one of `CLASSES`, preprocessed by the model's processor."""

    def __init__(self, processor, n: int = 32, seed: int = 0):
        captions = [f"a photo of a {CLASSES[i % len(CLASSES)]} number {i}" for i in range(n)]
        encoded = processor(text=captions, images=random_images(n, seed=seed), padding="max_length", max_length=32,
                            truncation=True, return_tensors="pt")
        self.rows = {"input_ids": encoded["input_ids"], "pixel_values": encoded["pixel_values"],
                     "sample_ids": torch.arange(n)}
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def eval_rows(n: int = 10, seed: int = 7) -> list[dict]:
    """Held-out labelled rows (PNG bytes, label, caption) for `ZeroShotEvaluator`."""
    rows = []
    for i, image in enumerate(random_images(n, seed=seed)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        label = i % len(CLASSES)
        rows.append({"image": buffer.getvalue(), "label": label, "caption": f"a photo of a {CLASSES[label]}"})
    return rows


def embeddings_and_logits(model, batch) -> dict:
    """`image_embeds`, `text_embeds` and `logits` (per image) of `model` in eval mode (LoRA dropout off)."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    logits = out.logits_per_image.contiguous()  # a transposed view: safetensors stores contiguous tensors
    return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logits": logits}


def hub_model(seed: int = 0, objective: str = "neuclip") -> NeuCLIPModel:
    """The small real-vocabulary model of `zero_shot_helpers` with a cheap normalizer (64 prototypes, 2 inner
    steps: the paper's 4096 x 10 would dominate a CPU test)."""
    torch.manual_seed(seed)
    return NeuCLIPModel(model_config("tiny", objective=objective, text_config=SMALL_TOWER, vision_config=SMALL_TOWER,
                                     projection_dim=16, neuclip_num_prototypes=64, neuclip_inner_steps=2,
                                     fastclip_dataset_size=64))


def build_trainer(output_dir, objective: str = "neuclip", steps: int = 2, lora: dict | None = None, model=None,
                  **arg_overrides) -> tuple[NeuCLIPTrainer, ZeroShotEvalCallback]:
    """A trainer on the ~1.7M-parameter real-vocabulary model (or `model`) with an in-training zero-shot evaluation
    every step (the callback's `results` feed the model card); call `trainer.train()`."""
    model = (model if model is not None else hub_model(objective=objective)).train()
    if lora is not None:
        from neuclip_hf.lora import apply_lora

        model = apply_lora(model, **lora)
    processor = small_processor()
    values = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=8, logging_steps=1,
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", warmup_steps=0,
                  learning_rate=1e-3)
    values.update(arg_overrides)
    trainer = NeuCLIPTrainer(model=model, args=NeuCLIPTrainingArguments(**values),
                             train_dataset=CaptionPairs(processor), processing_class=processor)
    rows = eval_rows()
    data = EvalData(lambda: (normalize_row(row) for row in rows), CLASSES, "random labelled images")
    evaluator = ZeroShotEvaluator(processor, data, templates=PROMPTS, batch_size=16)
    callback = ZeroShotEvalCallback(evaluator, eval_steps=1).attach(trainer)
    return trainer, callback
