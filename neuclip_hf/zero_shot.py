"""Zero-shot inference for any Hugging Face `CLIPModel` (NeuCLIP or plain): embeddings, prompt-ensemble classifiers.

The classifier follows OpenAI's CLIP and CLIP_benchmark: for every class, fill each template with the class name,
embed the prompts, L2-normalise each prompt embedding, average them, and renormalise; the (dim, classes) matrix
scores normalised image embeddings by cosine similarity, scaled by the model's logit scale.

Example:
    ```python
    >>> import neuclip_hf
    >>> from transformers import AutoModel, AutoProcessor
    >>> from neuclip_hf.zero_shot import ZeroShotClassifier
    >>> model, processor = AutoModel.from_pretrained(d), AutoProcessor.from_pretrained(d)
    >>> classify = ZeroShotClassifier(model, processor, ["cat", "dog"], templates="openai")
    >>> classify(images)  # [[{"label": "cat", "score": 0.93}, {"label": "dog", "score": 0.07}], ...]
    ```
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .images import BadSampleError, load_image
from .metrics import RECALL_KS, retrieval_metrics
from .modeling_neuclip import _pooled

TEMPLATES_FILE = Path(__file__).parent / "templates" / "openai_imagenet_templates.json"
PLACEHOLDER = "{}"
CLIP_BENCHMARK_PLACEHOLDER = "{c}"
TEMPLATE_SETS = {"openai": "OpenAI's 80 ImageNet prompts", "simple": "OpenAI's 7-prompt subset"}


@lru_cache(maxsize=1)
def _named_templates() -> dict[str, tuple[str, ...]]:
    return {name: tuple(items) for name, items in json.loads(TEMPLATES_FILE.read_text()).items()}


def template_names() -> list[str]:
    """Names of the shipped template sets (`openai`: OpenAI's 80 ImageNet prompts; `simple`: their 7-prompt subset)."""
    return sorted(_named_templates())


def load_templates(templates: str | Path | Sequence[str] | None = "openai") -> list[str]:
    """Prompt templates, each with one `{}` for the class name.

    Args:
        templates: A shipped set's name (`openai`, `simple`), a file (`.json`: a list of strings or
            {"templates": [...]}; otherwise one template per line, e.g. CLIP_benchmark's
            `zeroshot_classification_templates.txt`), a list of strings, or None (`openai`). The class-name slot is
            `{}` or CLIP_benchmark's `{c}`.

    Raises:
        ValueError: an unknown name, an empty set, or a template without `{}`.
    """
    if templates is None:
        templates = "openai"
    if isinstance(templates, (str, Path)):
        named = _named_templates()
        if str(templates) in named:
            templates = list(named[str(templates)])
        elif Path(templates).is_file():
            text = Path(templates).read_text(encoding="utf-8")
            if Path(templates).suffix == ".json":
                loaded = json.loads(text)
                templates = loaded["templates"] if isinstance(loaded, dict) else loaded
            else:
                templates = [line.strip() for line in text.splitlines() if line.strip()]
        elif PLACEHOLDER in str(templates):
            raise ValueError(f"templates must be a list; wrap the single template: [{str(templates)!r}]")
        else:
            raise ValueError(f"unknown templates {str(templates)!r}: not one of {template_names()} nor a file")
    # CLIP_benchmark's templates name the slot `{c}` (`template.format(c=name)`): the same slot as `{}`
    templates = [t.replace(CLIP_BENCHMARK_PLACEHOLDER, PLACEHOLDER) if isinstance(t, str) else t for t in templates]
    if not templates:
        raise ValueError("templates is empty: give at least one template such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or PLACEHOLDER not in template:
            raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return templates


def describe_templates(templates: str | Path | Sequence[str] | None, count: int) -> str:
    """What a `templates` argument resolved to, for messages: e.g. `80 templates (openai: OpenAI's 80 ImageNet
    prompts)`, `18 templates from t.txt`, `2 templates (given as a list)`."""
    if templates is None:
        templates = "openai"
    if isinstance(templates, (str, Path)) and str(templates) in TEMPLATE_SETS:
        return f"{count} templates ({templates}: {TEMPLATE_SETS[str(templates)]})"
    if isinstance(templates, (str, Path)):
        return f"{count} templates from {Path(templates).name}"
    return f"{count} template{'s' if count != 1 else ''} (given as a list)"


def fill_template(template: str, class_name: str) -> str:
    """`template` with its `{}` replaced by `class_name` (other braces are left alone, unlike `str.format`)."""
    return template.replace(PLACEHOLDER, class_name)


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty: zero-shot classification needs at least one class name")
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names has duplicates; each class needs a distinct name")
    return class_names


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no gradients inside; the model's previous train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_model(model: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    parameter = next(model.parameters())
    return tensor.to(parameter.device, parameter.dtype if tensor.is_floating_point() else tensor.dtype)


def encode_images(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 image embeddings (batch, dim) from any `CLIPModel`; inputs move to the model."""
    return F.normalize(_pooled(model.get_image_features(pixel_values=_to_model(model, pixel_values))).float(), dim=-1)


def encode_texts(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L2-normalised float32 text embeddings (batch, dim) from any `CLIPModel`; inputs move to the model."""
    if attention_mask is not None:
        attention_mask = _to_model(model, attention_mask)
    output = model.get_text_features(input_ids=_to_model(model, input_ids), attention_mask=attention_mask)
    return F.normalize(_pooled(output).float(), dim=-1)


def logit_scale(model: torch.nn.Module) -> float:
    """The model's multiplier of cosine similarities, exp(logit_scale) = 1 / temperature."""
    return float(model.logit_scale.detach().float().exp())


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def text_max_length(model: torch.nn.Module, processor) -> int:
    """Tokens a text may have: the tokenizer's limit, capped by the model's text positions."""
    limit = getattr(_tokenizer(processor), "model_max_length", None) or 77
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


def embed_texts(model: torch.nn.Module, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised embeddings (len(texts), dim) of raw strings, tokenized (and truncated) by `processor`."""
    tokenizer, max_length = _tokenizer(processor), text_max_length(model, processor)
    chunks = []
    with evaluation_mode(model):
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            )
            chunks.append(encode_texts(model, tokens["input_ids"], tokens.get("attention_mask")))
    return torch.cat(chunks)


def embed_images(model: torch.nn.Module, processor, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """Normalised embeddings (len(images), dim) of images (PIL, bytes, paths, arrays; see `images.load_image`).

    Raises:
        BadSampleError: an image cannot be read (the message names its position).
    """
    image_processor = _image_processor(processor)
    if len(images) == 0:
        raise ValueError("no images given")
    chunks = []
    with evaluation_mode(model):
        for start in range(0, len(images), batch_size):
            decoded = []
            for offset, value in enumerate(images[start:start + batch_size]):
                try:
                    decoded.append(load_image(value))
                except BadSampleError as error:
                    raise BadSampleError(error.reason, f"image {start + offset}: {error}") from None
            pixel_values = image_processor(images=decoded, return_tensors="pt")["pixel_values"]
            chunks.append(encode_images(model, pixel_values))
    return torch.cat(chunks)


def zero_shot_classifier(
    model: torch.nn.Module,
    processor,
    class_names: Sequence[str],
    templates: str | Path | Sequence[str] | None = "openai",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Class weights (dim, classes): per class, the renormalised mean of its normalised prompt embeddings.

    Args:
        model: Any `CLIPModel` (NeuCLIP or plain); encoded in eval mode, its own mode is restored.
        processor: A `CLIPProcessor` or a tokenizer.
        class_names: One name per class, substituted for `{}` in every template.
        templates: See `load_templates` (`openai`, `simple`, a file or a list of strings).
        batch_size: Prompts encoded at a time.
        device: Where the weights end up (default: the model's device).
    """
    class_names, templates = _check_class_names(class_names), load_templates(templates)
    prompts = [fill_template(template, name) for name in class_names for template in templates]
    embeddings = embed_texts(model, processor, prompts, batch_size)  # already normalised per prompt
    weights = F.normalize(embeddings.view(len(class_names), len(templates), -1).mean(dim=1), dim=-1)
    return weights.T.contiguous().to(device or model_device(model))


class ZeroShotClassifier:
    """A zero-shot image classifier: class weights built once, images scored in batches.

    Args:
        model: Any `CLIPModel` (NeuCLIP or plain).
        processor: Its `CLIPProcessor`.
        class_names: One name per class.
        templates: Prompt templates (see `load_templates`); `["This is a photo of {}."]` reproduces the
            transformers `zero-shot-image-classification` pipeline's default prompt.
        batch_size: Images (and prompts) encoded at a time.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        class_names: Sequence[str],
        templates: str | Path | Sequence[str] | None = "openai",
        batch_size: int = 64,
    ):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.class_names = _check_class_names(class_names)
        self.weights = zero_shot_classifier(model, processor, self.class_names, templates, max(batch_size, 256))
        self.scale = logit_scale(model)

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (N, classes) of normalised image embeddings with the class weights."""
        return self.scale * image_embeds.to(self.weights.device) @ self.weights

    def predict_proba(self, images: Sequence) -> torch.Tensor:
        """Per-class probabilities (N, classes): softmax of the scaled similarities, as CLIP and the pipeline do."""
        return self.logits(embed_images(self.model, self.processor, images, self.batch_size)).softmax(dim=-1).cpu()

    def __call__(self, images: Sequence, top_k: int | None = None) -> list[list[dict[str, float | str]]]:
        """Pipeline-style output: per image, `{"label", "score"}` dicts sorted by score (the best `top_k`)."""
        results = []
        for row in self.predict_proba(images).tolist():
            ranked = sorted(zip(self.class_names, row), key=lambda pair: -pair[1])[:top_k]
            results.append([{"label": label, "score": score} for label, score in ranked])
        return results


def zero_shot_classify(
    model: torch.nn.Module,
    processor,
    images: Sequence,
    class_names: Sequence[str],
    templates: str | Path | Sequence[str] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-class probabilities (N, classes) of `images` (templates default to OpenAI's 80 ImageNet prompts)."""
    return ZeroShotClassifier(model, processor, class_names, templates, batch_size).predict_proba(images)


def zero_shot_retrieval(
    model: torch.nn.Module,
    processor,
    images: Sequence,
    captions: Sequence[str],
    text_to_image: Sequence[int] | None = None,
    ks: tuple[int, ...] = RECALL_KS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Image / text retrieval recall@k of a small in-memory set (see `metrics.retrieval_metrics`).

    Args:
        images: The candidate images.
        captions: The texts.
        text_to_image: The image index of each caption; default: caption i describes image i.
        ks: The cut-offs.

    Raises:
        ValueError: counts that do not pair up.
    """
    if text_to_image is None:
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: pass text_to_image to give "
                             "each caption's image index when an image has several captions")
        text_to_image = list(range(len(captions)))
    elif len(text_to_image) != len(captions):
        raise ValueError(f"text_to_image has {len(text_to_image)} entries for {len(captions)} captions")
    image_embeds = embed_images(model, processor, images, batch_size)
    text_embeds = embed_texts(model, processor, list(captions), max(batch_size, 256))
    return retrieval_metrics(image_embeds, text_embeds, torch.as_tensor(list(text_to_image)), ks=ks)


__all__ = [
    "ZeroShotClassifier",
    "describe_templates",
    "embed_images",
    "embed_texts",
    "encode_images",
    "encode_texts",
    "evaluation_mode",
    "fill_template",
    "load_templates",
    "logit_scale",
    "template_names",
    "zero_shot_classifier",
    "zero_shot_classify",
    "zero_shot_retrieval",
]
