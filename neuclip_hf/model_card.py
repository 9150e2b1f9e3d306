"""Model cards for pushed models, adapters and normalizers, rendered from the templates in `model_cards/`.

The cards carry the training setup (objective, estimator hyper-parameters, data, steps, global batch, hardware),
the in-training zero-shot results as `model-index` metadata, intended uses and limitations, and citations. They are
built only from explicit fields (never from a dump of the training arguments), so no token or local secret can end
up in them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .modeling_neuclip import is_peft_model, unwrap_model
from .normalizers import NORMALIZERS, estimator_config, find_normalizer
from .version import __version__



def templates_dir() -> Path:
    """The card templates: `neuclip_hf/model_cards/` in an installed package (setup.py maps the top-level
    `model_cards/` folder there), the repository's top-level `model_cards/` in a source checkout."""
    for candidate in (Path(__file__).parent / "model_cards", Path(__file__).resolve().parents[1] / "model_cards"):
        if (candidate / "model_card.md").is_file():
            return candidate
    raise FileNotFoundError("the model card templates (model_cards/model_card.md) are missing from this install")


TEMPLATES = templates_dir()
MODEL_TEMPLATE = TEMPLATES / "model_card.md"
NORMALIZER_TEMPLATE = TEMPLATES / "normalizer_card.md"
DEFAULT_LICENSE = "apache-2.0"
SMALL_MODEL_PARAMETERS = 50_000_000  # below this the card says the model is a demonstration

# The papers the package implements, cited on every card besides the trained method's own.
PACKAGE_METHODS = ("neuclip", "amorlip", "clip")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str | None) -> bool:
    """True for `namespace/name` strings that are not an existing local path."""
    return bool(name) and _HUB_ID.match(str(name)) is not None and not Path(str(name)).exists()


def describe_method(objective: str) -> tuple[str, str]:
    """(title, one-paragraph summary) of a method, from its registered normalizer class."""
    method = NORMALIZERS.get(objective)
    return (method.title or objective, method.summary) if method is not None else (objective, "")


# Metrics of `ZeroShotEvaluator` that go into `model-index`: name -> (task type, metric type, pretty name).
CLASSIFICATION_METRICS = {
    "acc1": ("accuracy", "Top-1 accuracy"),
    "acc5": ("top_5_accuracy", "Top-5 accuracy"),
    "mean_per_class_recall": ("mean_per_class_recall", "Mean per-class recall"),
}
RETRIEVAL_TASK = ("image-text-retrieval", "Image-text retrieval")
CLASSIFICATION_TASK = ("zero-shot-image-classification", "Zero-shot image classification")


# An absolute local path (POSIX `/a/b`, home-relative `~/a`, Windows `C:\\a`), up to a space, quote, comma or bracket.
_LOCAL_PATH = re.compile(r"(?<![\w:/.])(?:~|[A-Za-z]:\\|/)[^\s,;'\"()\[\]{}<>]*")


def public_text(text: str | None) -> str | None:
    """`text` with every absolute local path replaced by its last component (`/home/ann/data/*.tar` -> `*.tar`):
    what a card or any pushed file says about local data, without the user name or the machine's layout."""
    if not text:
        return text

    def last_part(match: re.Match) -> str:
        path = match.group(0).rstrip("/\\")
        return re.split(r"[/\\]", path)[-1] or path

    return _LOCAL_PATH.sub(last_part, text)


@dataclass
class TrainingSummary:
    """What a card says about the training run; every field is optional.

    Attributes:
        training_data: The training data (a Hub dataset id goes into the `datasets` metadata).
        steps: Optimizer steps.
        per_device_batch_size: Pairs per process and step.
        num_processes: Data-parallel processes.
        learning_rate: Peak encoder learning rate.
        normalizer_learning_rate: The normalizer optimizer's learning rate (None: the config's).
        precision: `fp32`, `bf16` or `fp16`.
        hardware: E.g. `8 x NVIDIA H100 80GB HBM3`.
        training_seconds: Wall-clock training time.
        finetuned_from: The checkpoint training started from (continued pretraining).
        final_temperature: T at the end of training.
        lora: `{"r", "alpha", "dropout", "target_modules"}` when only a LoRA adapter was trained.
    """

    training_data: str | None = None
    steps: int | None = None
    per_device_batch_size: int | None = None
    num_processes: int | None = None
    learning_rate: float | None = None
    normalizer_learning_rate: float | None = None
    precision: str | None = None
    hardware: str | None = None
    training_seconds: float | None = None
    finetuned_from: str | None = None
    final_temperature: float | None = None
    lora: dict | None = None

    @property
    def global_batch_size(self) -> int | None:
        if self.per_device_batch_size is None:
            return None
        return self.per_device_batch_size * (self.num_processes or 1)

    @classmethod
    def from_trainer(cls, trainer, training_data: str | None = None, finetuned_from: str | None = None,
                     lora: dict | None = None) -> "TrainingSummary":
        """The summary of a `NeuCLIPTrainer` run (arguments, state and the hardware it ran on)."""
        args, state = trainer.args, trainer.state
        runtime = [entry["train_runtime"] for entry in state.log_history if "train_runtime" in entry]
        return cls(
            training_data=training_data,
            steps=state.global_step,
            per_device_batch_size=args.per_device_train_batch_size,
            num_processes=trainer.accelerator.num_processes,
            learning_rate=args.learning_rate,
            normalizer_learning_rate=args.normalizer_learning_rate,
            precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            hardware=describe_hardware(args.device, trainer.accelerator.num_processes),
            training_seconds=runtime[-1] if runtime else None,
            finetuned_from=finetuned_from,
            final_temperature=unwrap_model(trainer.model).temperature,
            lora=lora,
        )


def describe_hardware(device: torch.device | str, num_processes: int = 1) -> str:
    """E.g. `2 x NVIDIA H100 80GB HBM3` or `1 x CPU process`."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{num_processes} x {torch.cuda.get_device_name(device)}"
    name = {"cpu": "CPU process", "mps": "Apple MPS device", "xpu": "Intel XPU"}.get(device.type, device.type)
    return f"{num_processes} x {name}{'es' if num_processes > 1 and name.endswith('process') else ''}"


def _format(value: Any) -> str:
    """A compact table cell."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "None" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    """E.g. `42 s`, `12.5 min`, `3.20 h`."""
    if not seconds:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else \
        f"{seconds / 3600:.2f} h"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def quality_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    """The accuracy / recall metrics of an evaluation (drops counts, timings and the duplicate-caption ceilings,
    which describe the data, not the model; the caption-aware recalls only when captions repeat)."""
    metrics = metrics or {}
    repeated = metrics.get("num_distinct_texts", 0) < metrics.get("num_texts", 0)
    return {name: float(value) for name, value in metrics.items()
            if (name in CLASSIFICATION_METRICS or "recall@" in name) and not name.endswith("_ceiling")
            and (repeated or not name.endswith("_caption_aware")) and not math.isnan(float(value))}


def duplicate_captions_note(metrics: dict[str, float] | None) -> str | None:
    """One sentence on repeated captions (e.g. templated ones), or None when every caption is distinct."""
    metrics = metrics or {}
    texts, distinct = metrics.get("num_texts"), metrics.get("num_distinct_texts")
    if not texts or distinct is None or distinct >= texts:
        return None
    return (f"The evaluation captions repeat: {int(distinct):,} distinct texts among {int(texts):,}. Identical "
            "captions get identical embeddings, so plain retrieval recall@1 cannot exceed "
            f"{_percent(metrics.get('image_retrieval_recall@1_ceiling'))} (image) / "
            f"{_percent(metrics.get('text_retrieval_recall@1_ceiling'))} (text); the `_caption_aware` recalls "
            "count a retrieved text identical to the true caption (or an image with the query as its caption) as a "
            "hit. Zero-shot classification is the meaningful number here.")


def _unpack_eval(eval_results: dict | None) -> tuple[dict, dict, int | None, int | None, str | None]:
    """(latest metrics, best metrics, step of latest, best step, best metric) from a callback's `results` or a flat
    metrics dict."""
    if not eval_results:
        return {}, {}, None, None, None
    if "latest" in eval_results:  # ZeroShotEvalCallback.results
        history = eval_results.get("history") or []
        step = history[-1]["step"] if history else None
        return (quality_metrics(eval_results.get("latest")), quality_metrics(eval_results.get("best")), step,
                eval_results.get("best_step"), eval_results.get("metric_for_best", "acc1"))
    return quality_metrics(eval_results), {}, None, None, None


def model_index(metrics: dict[str, float], model_name: str, dataset_name: str, dataset_type: str,
                dataset_split: str | None = None) -> list[EvalResult]:
    """`model-index` entries for the zero-shot metrics (classification and retrieval)."""
    results = []
    for name, value in metrics.items():
        if name in CLASSIFICATION_METRICS:
            (task_type, task_name), (metric_type, metric_name) = CLASSIFICATION_TASK, CLASSIFICATION_METRICS[name]
        else:  # e.g. image_retrieval_recall@5
            (task_type, task_name), metric_type = RETRIEVAL_TASK, name.replace("@", "_at_")
            metric_name = name.replace("_", " ").capitalize()  # e.g. "Image retrieval recall@5"
        results.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type,
                                  dataset_name=dataset_name, dataset_split=dataset_split, metric_type=metric_type,
                                  metric_value=round(value, 6), metric_name=metric_name))
    return results


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:64] or "custom"


def _tower(config, vision: bool) -> str:
    if vision:
        return (f"ViT ({config.num_hidden_layers} layers, width {config.hidden_size}, patch {config.patch_size}, "
                f"{config.image_size} px)")
    return (f"Transformer ({config.num_hidden_layers} layers, width {config.hidden_size}, context "
            f"{config.max_position_embeddings}, vocabulary {config.vocab_size})")


def _citations(objective: str) -> str:
    """NeuCLIP, AmorLIP and CLIP always (the package implements them), plus the objective's own paper."""
    keys = [*PACKAGE_METHODS, *([objective] if objective not in PACKAGE_METHODS else [])]
    return "\n\n".join(NORMALIZERS[key].citation for key in keys if key in NORMALIZERS and NORMALIZERS[key].citation)


def _hyperparameters(config) -> list[tuple[str, str]]:
    rows = [(name, _format(value)) for name, value in estimator_config(config).items()]
    rows += [("rho", _format(config.rho)), ("temperature_init", _format(config.temperature_init)),
             ("temperature_min", _format(config.temperature_min))]
    return rows


def build_model_card(model: torch.nn.Module, *, repo_id: str, training: TrainingSummary | None = None,
                     eval_results: dict | None = None, eval_dataset: str | None = None,
                     eval_dataset_id: str | None = None, license: str = DEFAULT_LICENSE, tags: list[str] | None = None,
                     language: str | list[str] | None = "en", model_name: str | None = None,
                     eval_max_samples: int | None = None) -> ModelCard:
    """The card of a full model or (PEFT) adapter repository.

    Args:
        model: The NeuCLIPModel or LoRA-wrapped model being pushed.
        repo_id: Its repository (used in the usage snippets).
        training: The training setup (`TrainingSummary.from_trainer`).
        eval_results: `ZeroShotEvalCallback.results` or a flat metrics dict (`ZeroShotEvaluator` output).
        eval_dataset: Human-readable name of the evaluation data (e.g. the evaluator's `data.description`).
        eval_dataset_id: Hub dataset id of the evaluation data, if it has one.
        license: SPDX id or Hub license name of the weights.
        tags: Extra tags.
        language: Language(s) of the text encoder's training data.
        model_name: Title of the card (default: the repository name).
        eval_max_samples: The evaluator's sample limit (`--eval_max_samples`; None: the whole set).
    """
    training = training or TrainingSummary()
    core = unwrap_model(model)
    config = core.config
    objective = config.objective
    title, description = describe_method(objective)
    model_name = model_name or repo_id.split("/")[-1]
    adapter = is_peft_model(model)
    latest, best, step, best_step, best_metric = _unpack_eval(eval_results)
    raw_latest = (eval_results or {}).get("latest", eval_results) if eval_results else {}
    num_samples = (raw_latest or {}).get("num_samples")
    eval_name = eval_dataset or "the held-out evaluation data"
    finetuned = training.finetuned_from
    base_model = finetuned if looks_like_hub_id(finetuned) else None
    card_tags = ["neuclip_hf", "clip", "contrastive-learning", objective, "zero-shot-image-classification"]
    card_tags += ["lora", "peft"] if adapter else []
    card_tags += [t for t in (tags or []) if t not in card_tags]
    data = ModelCardData(
        language=language, license=license, library_name="peft" if adapter else "transformers",
        pipeline_tag="zero-shot-image-classification", tags=card_tags, base_model=base_model,
        datasets=[training.training_data] if looks_like_hub_id(training.training_data) else None,
        model_name=model_name if latest else None,
        eval_results=model_index(latest, model_name, eval_name, eval_dataset_id or _slug(eval_name)) or None,
    )
    num_parameters = sum(p.numel() for p in core.parameters())
    rows = [
        ("training data", training.training_data or "not recorded"),
        ("optimizer steps", _format(training.steps)),
        ("global batch (pairs per step)", _format(training.global_batch_size)),
        ("per-device batch x processes",
         f"{_format(training.per_device_batch_size)} x {_format(training.num_processes)}"),
        ("encoder peak learning rate", _format(training.learning_rate)),
        ("normalizer learning rate", _format(training.normalizer_learning_rate) if training.normalizer_learning_rate
         is not None else "the config's"),
        ("precision", training.precision or "not recorded"),
        ("hardware", training.hardware or "not recorded"),
        ("training time", _duration(training.training_seconds)),
        ("final temperature T", _format(training.final_temperature)),
    ]
    eval_rows = [(name, _percent(value), _percent(best.get(name))) for name, value in latest.items()]
    summary = (f"A CLIP model trained with {title} using `neuclip_hf`" + (f", continued from {finetuned}" if finetuned
               else "") + (" (LoRA adapter)" if adapter else "") + ".")
    return ModelCard.from_template(
        data, template_path=str(MODEL_TEMPLATE), model_name=model_name, repo_id=repo_id, summary=summary,
        objective=objective, objective_title=title, objective_description=description,
        vision_tower=_tower(config.vision_config, True), text_tower=_tower(config.text_config, False),
        projection_dim=config.projection_dim, finetuned_from=finetuned, lora=training.lora,
        library_version=__version__, hyperparameters=_hyperparameters(config), training_rows=rows,
        eval_rows=eval_rows, eval_dataset=eval_name, eval_step=step if step is not None else training.steps,
        best_step=best_step, best_metric=best_metric, training_data=training.training_data or "not recorded",
        small_model=num_parameters < SMALL_MODEL_PARAMETERS, num_parameters=f"{num_parameters:,}",
        eval_samples=f"{int(num_samples):,}" if num_samples else "not recorded",
        eval_max_samples=f"{eval_max_samples:,}" if eval_max_samples else "none (the whole set)",
        duplicates_note=duplicate_captions_note(raw_latest),
        citations=_citations(objective),
    )


def build_normalizer_card(model: torch.nn.Module, *, repo_id: str, source_model: str | None = None,
                          license: str = DEFAULT_LICENSE, tags: list[str] | None = None) -> ModelCard:
    """The card of a normalizer-only repository (`neuclip_hf.hub.push_normalizer`)."""
    config = unwrap_model(model).config
    title, description = describe_method(config.objective)
    card_tags = ["neuclip_hf", "normalizer", config.objective] + list(tags or [])
    data = ModelCardData(license=license, library_name="neuclip_hf", tags=card_tags,
                         base_model=source_model if looks_like_hub_id(source_model) else None)
    return ModelCard.from_template(
        data, template_path=str(NORMALIZER_TEMPLATE), model_name=f"{repo_id.split('/')[-1]}", repo_id=repo_id,
        objective=config.objective, objective_title=title, objective_description=description,
        normalizer_class=type(find_normalizer(model)).__name__, projection_dim=config.projection_dim,
        source_model=source_model, hyperparameters=_hyperparameters(config), citations=_citations(config.objective),
    )


__all__ = [
    "TrainingSummary",
    "build_model_card",
    "build_normalizer_card",
    "describe_hardware",
    "describe_method",
    "duplicate_captions_note",
    "looks_like_hub_id",
    "model_index",
    "templates_dir",
]
