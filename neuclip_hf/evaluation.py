"""Held-out evaluation of CLIP models: zero-shot classification and image-text retrieval, during and after training.

`ZeroShotEvaluator(processor, data)(model)` returns CLIP_benchmark-named metrics: `acc1`, `acc5`,
`mean_per_class_recall` when the data has labels and class names, `image_retrieval_recall@k` /
`text_retrieval_recall@k` when it has captions, plus sample counts (unreadable samples are skipped and counted)
and timing. `ZeroShotEvalCallback` runs it every `eval_steps` optimizer steps and at the end of training, logs the
metrics through the Trainer with an `eval_` prefix, and keeps the latest and best results for the model card.

Example:
    ```python
    >>> evaluator = ZeroShotEvaluator(processor, data="default", max_samples=2000)
    >>> evaluator(model)["acc1"]
    >>> callback = ZeroShotEvalCallback(evaluator, eval_steps=500)
    >>> trainer.add_callback(callback); callback.trainer = trainer   # or: callback.attach(trainer)
    ```
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, TrainerCallback

from .data.eval_data import EvalData, as_eval_data
from .distributed import fsdp_root_gathered, is_fsdp_sharded, main_process_result
from .images import BadSampleError, load_image
from .metrics import RECALL_KS, TIE_RULES, classification_metrics, retrieval_metrics
from .zero_shot import (
    _check_class_names,
    _image_processor,
    _tokenizer,
    describe_templates,
    encode_images,
    encode_texts,
    evaluation_mode,
    load_templates,
    logit_scale,
    model_device,
    text_max_length,
    zero_shot_classifier,
)


CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"  # CLIP_benchmark's task names
TASKS = (CLASSIFICATION, RETRIEVAL)


@dataclass
class _Batch:
    """One preprocessed batch: model inputs plus labels (None when unlabelled).

    Captions are tokenized to the fixed length `max_length` (not to the longest in the batch), so that a caption's
    tokens, and with them its embedding, never depend on which other captions share its batch.
    """

    pixel_values: torch.Tensor
    labels: list[int | None]
    class_names: list[str | None]
    text_ids: torch.Tensor | None  # (captions in the batch, max_length)
    text_mask: torch.Tensor | None
    captions_per_image: list[int] | None


class ZeroShotEvaluator:
    """Zero-shot classification and retrieval metrics of a model on a held-out set.

    Args:
        processor: The model's `CLIPProcessor` (None: `ZeroShotEvalCallback` takes the Trainer's
            `processing_class`).
        data: A spec (None / `"default"`: the embedded test split; an ImageFolder directory; parquet or
            webdataset files, see `data.open_eval_data`), an `EvalData`, or an iterable of rows with
            image / caption / label columns (e.g. a `datasets.Dataset`).
        class_names: Class names for prompts (default: from the data).
        templates: Prompt templates: `openai` (80), `simple` (7), a file or a list of strings with `{}` (or
            CLIP_benchmark's `{c}`); None: the data's own templates (CLIP_benchmark's
            `zeroshot_classification_templates.txt`) if it has them, else `openai`.
        batch_size: Images (and captions) encoded at a time.
        max_samples: Evaluate on the first `max_samples` readable samples only.
        cache_inputs: Keep the decoded, preprocessed batches in memory after the first call, so later calls
            (every `eval_steps` in training) skip reading and decoding. Costs 4 x 3 x size^2 bytes per image.
        retrieval_ks: Cut-offs of the retrieval recall.
        tie_break: How tied scores count (`metrics.TIE_RULES`): `expected` (default; independent of the order of
            the data) or CLIP_benchmark's `topk`.
        tasks: CLIP_benchmark task names to run when the data allows them: `zeroshot_classification` (labels with
            class names) and / or `zeroshot_retrieval` (captions).
    """

    def __init__(
        self,
        processor=None,
        data=None,
        class_names: Sequence[str] | None = None,
        templates: str | Path | Sequence[str] | None = "openai",
        batch_size: int = 256,
        max_samples: int | None = None,
        cache_inputs: bool = False,
        retrieval_ks: tuple[int, ...] = RECALL_KS,
        tie_break: str = "expected",
        tasks: Sequence[str] = TASKS,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be positive or None, got {max_samples}")
        self.processor = processor
        if class_names is not None:
            _check_class_names(class_names)
        self.data: EvalData = as_eval_data(data, class_names)
        if self.data.class_names is not None:
            _check_class_names(self.data.class_names)
        unknown = [task for task in tasks if task not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks={list(tasks)!r} is invalid: choose from {list(TASKS)}")
        self.tasks = tuple(tasks)
        if tie_break not in TIE_RULES:
            raise ValueError(f"tie_break={tie_break!r} is invalid: expected one of {TIE_RULES}")
        if templates is None and self.data.templates:
            self.templates = load_templates(self.data.templates)
            where = Path(self.data.templates_source)
            self.templates_description = f"{len(self.templates)} templates from {where.parent.name}/{where.name}"
        else:
            self.templates = load_templates(templates)
            self.templates_description = describe_templates(templates, len(self.templates))
        self.batch_size, self.max_samples = batch_size, max_samples
        self.cache_inputs, self.retrieval_ks, self.tie_break = cache_inputs, tuple(retrieval_ks), tie_break
        self._cache: tuple[list[_Batch], Counter] | None = None

    # -- reading ------------------------------------------------------------------------------------------------
    def _samples(self, skipped: Counter) -> Iterator[tuple]:
        """Decoded (image, captions, label, class_name) tuples; bad samples are counted in `skipped`, not yielded.

        Whether captions are expected is decided by the first row: once a source has a caption column, a row
        without a usable caption is a bad sample (as in training), not a silently unpaired image.
        """
        kept, expect_captions = 0, None
        for row in self.data.rows():
            if self.max_samples is not None and kept >= self.max_samples:
                return
            if expect_captions is None:
                has_caption = row.get("has_caption", row.get("caption") is not None)
                expect_captions = RETRIEVAL in self.tasks and bool(has_caption)
            try:
                image = load_image(row["image"])
                captions = self.data.captions(row.get("caption")) if expect_captions else None
            except BadSampleError as error:
                skipped[error.reason] += 1
                continue
            kept += 1
            yield image, captions, row.get("label"), row.get("class_name")

    def _batches(self, max_length: int, skipped: Counter) -> Iterator[_Batch]:
        """Preprocessed batches, from the cache after the first full pass when `cache_inputs` is set."""
        if self._cache is not None:
            skipped.update(self._cache[1])
            yield from self._cache[0]
            return
        batch: list[tuple] = []
        produced: list[_Batch] = []
        for sample in self._samples(skipped):
            batch.append(sample)
            if len(batch) == self.batch_size:
                produced.append(self._preprocess(batch, max_length))
                yield produced[-1]
                batch = []
        if batch:
            produced.append(self._preprocess(batch, max_length))
            yield produced[-1]
        if self.cache_inputs:
            self._cache = (produced, Counter(skipped))

    def _preprocess(self, batch: list[tuple], max_length: int) -> _Batch:
        images, captions, labels, class_names = zip(*batch)
        pixel_values = _image_processor(self.processor)(images=list(images), return_tensors="pt")["pixel_values"]
        text_ids = text_mask = counts = None
        if captions[0] is not None:  # all or none: see `_samples`
            flat = [text for texts in captions for text in texts]
            tokens = _tokenizer(self.processor)(flat, padding="max_length", truncation=True, max_length=max_length,
                                                return_tensors="pt")
            text_ids, text_mask = tokens["input_ids"], tokens["attention_mask"]
            counts = [len(texts) for texts in captions]
        return _Batch(pixel_values, list(labels), list(class_names), text_ids, text_mask, counts)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of `model` (any `CLIPModel`), computed on the model's device; its train/eval mode is kept.

        Returns:
            `acc1`, `acc5` (>= 5 classes), `mean_per_class_recall` (labelled data with class names),
            `image_retrieval_recall@k`, `text_retrieval_recall@k` with their `_ceiling` and `_caption_aware`
            versions, `num_texts` and `num_distinct_texts` (captioned data; see `metrics.retrieval_metrics`),
            `num_samples`,
            `num_skipped` and `num_skipped_<reason>` per bad-sample reason, `seconds` and `images_per_second`.

        Raises:
            ValueError: no readable sample, or data without labels and without captions.
        """
        if self.processor is None:
            raise ValueError("ZeroShotEvaluator has no processor: pass the model's CLIPProcessor")
        start = time.perf_counter()
        with evaluation_mode(model):
            device = model_device(model)
            image_embeds, texts, labels, seen_names, skipped = self._encode(model)
            results: dict[str, float] = {}
            class_names = self._class_names(labels, seen_names) if CLASSIFICATION in self.tasks else None
            if class_names is not None and labels:
                if max(labels) >= len(class_names):
                    raise ValueError(f"label {max(labels)} has no class name ({len(class_names)} class names)")
                weights = zero_shot_classifier(model, self.processor, class_names, self.templates,
                                               batch_size=max(self.batch_size, 256))
                logits = logit_scale(model) * image_embeds.to(device) @ weights
                results.update(classification_metrics(logits, torch.tensor(labels, device=device),
                                                       tie_break=self.tie_break))
            if texts is not None:
                text_embeds, text_to_image, text_groups = texts
                results.update(retrieval_metrics(image_embeds.to(device), text_embeds.to(device), text_to_image,
                                                 ks=self.retrieval_ks, tie_break=self.tie_break,
                                                 text_groups=text_groups))
        if not results:
            raise ValueError(f"{self.data.description}: nothing to evaluate for {', '.join(self.tasks)}; the data "
                             "needs labels with class names (zero-shot classification) or captions (retrieval)")
        seconds = time.perf_counter() - start
        results["num_samples"] = len(image_embeds)
        results["num_skipped"] = sum(skipped.values())
        results.update({f"num_skipped_{reason}": count for reason, count in sorted(skipped.items())})
        # not `runtime` / `samples_per_second`: prefixed with eval_ they would mix with Trainer.evaluate's own
        results["seconds"] = seconds
        results["images_per_second"] = len(image_embeds) / seconds
        return results

    def _encode(self, model: torch.nn.Module):
        """Normalised image embeddings of all kept samples, the texts (embeddings, image index, identical-text ids;
        None without captions), the labels and the class-name column."""
        image_chunks, id_chunks, counts, labels, names = [], [], [], [], []
        skipped: Counter = Counter()
        for batch in self._batches(text_max_length(model, self.processor), skipped):
            image_chunks.append(encode_images(model, batch.pixel_values).cpu())
            if batch.text_ids is not None:
                id_chunks.append(torch.cat([batch.text_ids, batch.text_mask], dim=1))
                counts.extend(batch.captions_per_image)
            labels.extend(batch.labels)
            names.extend(batch.class_names)
        if not image_chunks:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.items()) or "the data is empty"
            raise ValueError(f"{self.data.description}: no readable sample to evaluate ({reasons})")
        texts = None
        if id_chunks:
            # Identical token sequences are encoded once: copies of a caption get one embedding (exact ties, never
            # float noise from batch composition), and the distinct ones, sorted, are batched the same way
            # whatever the order of the data.
            distinct, text_groups = torch.unique(torch.cat(id_chunks), dim=0, return_inverse=True)
            ids, mask = distinct.chunk(2, dim=1)  # rows are [input_ids | attention_mask]
            batches = [slice(start, start + self.batch_size) for start in range(0, len(distinct), self.batch_size)]
            embeds = torch.cat([encode_texts(model, ids[rows], mask[rows]).cpu() for rows in batches])
            text_to_image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            texts = (embeds[text_groups], text_to_image, text_groups)
        usable_labels = labels if all(label is not None for label in labels) else []
        return torch.cat(image_chunks), texts, usable_labels, names, skipped

    def _class_names(self, labels: list[int], seen_names: list[str | None]) -> list[str] | None:
        """The data's class names, else names read from a `class_name` column (label -> name)."""
        if self.data.class_names is not None or not labels:
            return self.data.class_names
        mapping = {label: name for label, name in zip(labels, seen_names) if name is not None}
        if not mapping:
            return None
        missing = [label for label in range(max(labels) + 1) if label not in mapping]
        if missing:
            raise ValueError(f"no class name for labels {missing[:10]}: pass class_names explicitly")
        return [str(mapping[label]) for label in range(max(labels) + 1)]


def log_callback_metrics(trainer, state, logs: dict[str, float]) -> None:
    """Log a callback's metrics through `trainer.log` (every `report_to` integration sees them), or append them to
    `state.log_history` without a trainer. Call it on every rank with the same `logs` (see `main_process_result`)."""
    if trainer is not None:
        trainer.log(logs)
    else:
        state.log_history.append({**logs, "step": state.global_step})


class ZeroShotEvalCallback(TrainerCallback):
    """Run a `ZeroShotEvaluator` every `eval_steps` optimizer steps and at the end of training.

    The metrics are logged through the Trainer (`trainer.log`, so every `report_to` integration sees them) with
    the prefix `eval_`; without an attached trainer they are appended to `state.log_history`. In a distributed run
    the main process evaluates while the other ranks wait for its metrics (every rank evaluates an FSDP2-sharded
    model, whose forwards are collectives), then every rank records and logs the same line, so every rank makes
    the same calls and takes the same control decisions (docs/architecture.md, "Rules for callbacks in distributed
    runs"). `NeuCLIPTrainer` logs the line after the step's training line; a
    plain `Trainer` then skips that step's training line on every rank (its `on_log` clears `should_log`).

    Args:
        evaluator: The evaluator to run.
        eval_steps: Evaluate every this many optimizer steps (None or 0: only at the end of training).
        metric_for_best: Which metric picks `results["best"]`.
        greater_is_better: Whether a larger `metric_for_best` is better.
        prefix: Prepended to the metric names in the logs.

    Attributes:
        trainer: Set by the trainer (or `attach`) so metrics go through `trainer.log`.
        results: `{"latest": {...}, "best": {...}, "best_step": int, "history": [{"step": ..., ...}]}` with
            unprefixed metric names, for the model card.
    """

    def __init__(
        self,
        evaluator: ZeroShotEvaluator,
        eval_steps: int | None = None,
        metric_for_best: str = "acc1",
        greater_is_better: bool = True,
        prefix: str = "eval_",
    ):
        if eval_steps is not None and eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0 or None, got {eval_steps}")
        self.evaluator, self.eval_steps = evaluator, eval_steps
        self.metric_for_best, self.greater_is_better, self.prefix = metric_for_best, greater_is_better, prefix
        self.trainer = None
        self.results: dict = {"latest": None, "best": None, "best_step": None, "history": []}
        self._last_step: int | None = None

    def attach(self, trainer) -> "ZeroShotEvalCallback":
        """Add this callback to a `transformers.Trainer` and log through it."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        due = bool(self.eval_steps) and state.global_step % self.eval_steps == 0
        last = state.max_steps > 0 and state.global_step >= state.max_steps  # before on_train_end's teardown
        if due or last:
            self.evaluate(model, state, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self._last_step != state.global_step:  # training stopped early, or max_steps was unknown
            self.evaluate(model, state, processing_class)

    def evaluate(self, model: torch.nn.Module, state, processing_class=None) -> dict[str, float] | None:
        """Evaluate now on the main process, record and log the metrics on every rank; returns them.

        A collective in a distributed run: every rank calls it at the same step (the events above do).
        Returns None only for a state that is not the main process's outside a process group.
        """
        self._last_step = state.global_step
        if model is None:
            return None
        if self.evaluator.processor is None:
            self.evaluator.processor = processing_class
        def run() -> dict[str, float]:
            with fsdp_root_gathered(model):
                return self.evaluator(model)

        # An FSDP2-sharded model's forwards are collectives: then every rank evaluates (the same data) and rank 0's
        # metrics are logged.
        metrics = main_process_result(run, state.is_world_process_zero, every_rank=is_fsdp_sharded(model))
        if metrics is None:
            return None
        self._record(metrics, state.global_step)
        log_callback_metrics(self.trainer, state, {f"{self.prefix}{name}": value for name, value in metrics.items()})
        return metrics

    def _record(self, metrics: dict[str, float], step: int) -> None:
        self.results["latest"] = dict(metrics)
        self.results["history"].append({"step": step, **metrics})
        value, best = metrics.get(self.metric_for_best), self.results["best"]
        if value is None:
            return
        better = best is None or (value > best[self.metric_for_best] if self.greater_is_better
                                  else value < best[self.metric_for_best])
        if better:
            self.results["best"], self.results["best_step"] = dict(metrics), step


def check_model_location(name_or_path: str | Path) -> None:
    """Fail early, in one line, for a model location that is neither a local directory nor a possible Hub id.

    A name that looks like a path (absolute, `./`, `../`, `~`, more than one `/`, or a Windows separator) and does
    not exist is reported as a missing directory instead of being sent to the Hub (whose failure is a long
    connection traceback); an existing file that is not a directory is refused too.

    Raises:
        FileNotFoundError: no such local directory.
    """
    text = str(name_or_path)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{text} is a file, not a model directory (a folder with config.json)")
    looks_local = (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text)
    if looks_local:
        raise FileNotFoundError(f"no such model directory: {text}")


def load_model_and_processor(
    model_name_or_path: str | Path, processor_name_or_path: str | Path | None = None, device: str | None = None,
    trust_remote_code: bool | None = None,
):
    """A model (NeuCLIP or plain CLIP, through `AutoModel`) and its processor from a directory or Hub id.

    Raises:
        FileNotFoundError: a local-looking location that does not exist (see `check_model_location`).
        OSError: neither a local directory nor a loadable Hub model (one line naming both), or no processor.
    """
    for location in (model_name_or_path, processor_name_or_path):
        if location is not None:
            check_model_location(location)
    try:
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"{model_name_or_path} is neither a local model directory nor a model the Hub serves here "
                      f"({first_line[:300]})") from None
    source = processor_name_or_path or model_name_or_path
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise OSError(f"no processor found in {source}: save one next to the model with "
                      f"processor.save_pretrained(dir), or name one explicitly ({error})") from error
    if device is not None:
        model.to(device)
    return model.eval(), processor


def evaluate_pretrained(
    model_name_or_path: str | Path,
    data=None,
    templates: str | Path | Sequence[str] | None = "openai",
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    max_samples: int | None = None,
    device: str | None = None,
    processor_name_or_path: str | Path | None = None,
    tie_break: str = "expected",
    tasks: Sequence[str] = TASKS,
    model=None,
    processor=None,
) -> dict:
    """Load a saved model and evaluate it (what `recipes/eval.py` runs).

    Args:
        model_name_or_path: The model directory or Hub id (also its name in the results).
        data: An evaluation spec or `EvalData` (see `ZeroShotEvaluator`).
        templates: See `ZeroShotEvaluator` (None: the data's templates, else `openai`).
        class_names: Class names in label order.
        batch_size: Images (and captions) encoded at a time.
        max_samples: Evaluate the first N readable samples.
        device: Where to run (default: where the model loads).
        processor_name_or_path: The processor's location (default: the model's).
        tie_break: `expected` or CLIP_benchmark's `topk`.
        tasks: `zeroshot_classification` and / or `zeroshot_retrieval`.
        model: An already loaded model (with `processor`): skips loading.
        processor: Its processor.

    Returns:
        `{"model", "model_class", "data", "templates", "num_templates", "tasks", "metrics"}` (JSON-serialisable).
    """
    if model is None:
        model, processor = load_model_and_processor(model_name_or_path, processor_name_or_path, device)
    evaluator = ZeroShotEvaluator(processor, data, class_names, templates, batch_size, max_samples,
                                  tie_break=tie_break, tasks=tasks)
    metrics = evaluator(model)
    ran = [task for task, key in ((CLASSIFICATION, "acc1"), (RETRIEVAL, "image_retrieval_recall@1"))
           if key in metrics]
    return {
        "model": str(model_name_or_path),
        "model_class": type(model).__name__,
        "data": evaluator.data.description,
        "templates": evaluator.templates_description,
        "num_templates": len(evaluator.templates),
        "tasks": ran,
        "tie_break": tie_break,
        "metrics": metrics,
    }


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A two-column text table: rates as percentages, counts as integers, timing with units."""
    rows = []
    for name, value in metrics.items():
        if name.startswith("num_"):
            shown = f"{int(value)}"
        elif name == "seconds":
            shown = f"{value:.2f} s"
        elif name == "images_per_second":
            shown = f"{value:.1f}"
        else:
            shown = f"{100 * value:.2f} %"
        rows.append((name, shown))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    return "\n".join(lines + [f"{name:<{width}}  {shown}" for name, shown in rows])


__all__ = [
    "CLASSIFICATION",
    "RETRIEVAL",
    "TASKS",
    "ZeroShotEvalCallback",
    "ZeroShotEvaluator",
    "check_model_location",
    "evaluate_pretrained",
    "format_metrics_table",
    "load_model_and_processor",
]
