"""neuclip_hf: efficient CLIP pretraining (NeuCLIP, AmorLIP, FastCLIP, SigLIP, CLIP) on Hugging Face.

Importing the package registers `NeuCLIPConfig` / `NeuCLIPModel` with `AutoConfig`, `AutoModel` and
`AutoModelForZeroShotImageClassification`, so `AutoModel.from_pretrained(<neuclip dir>)` returns a NeuCLIPModel
and `pipeline("zero-shot-image-classification", model=<neuclip dir>)` works.

Only the model, its config and the normalizers are imported eagerly; every other public name is imported on first
use, so inference (`from_pretrained`, `zero_shot_classify`) never loads the training data stack (`datasets`,
`torchdata`, `pyarrow`).
"""

from importlib import import_module

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_neuclip import NeuCLIPConfig
from .modeling_neuclip import NeuCLIPModel, NeuCLIPOutput
from .normalizers import (
    NORMALIZERS,
    AmortizedNormalizer,
    InBatchNormalizer,
    MovingAverageNormalizer,
    Normalizer,
    NormalizerEstimator,
    PrototypeNormalizer,
    SigmoidBias,
    build_normalizer,
    register_normalizer,
    registered_objectives,
)
from .objectives import ContrastiveBatch, NormalizerInputs
from .version import __version__

AutoConfig.register(NeuCLIPConfig.model_type, NeuCLIPConfig, exist_ok=True)
AutoModel.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)
# Saved directories carry the model code + auto_map, so they load with trust_remote_code=True without this package.
NeuCLIPConfig.register_for_auto_class()
NeuCLIPModel.register_for_auto_class("AutoModel")

# Public names imported on first use: name -> submodule.
_LAZY = {
    **dict.fromkeys(
        ("DataArguments", "DataQualityError", "StreamingDataLoader", "accumulate_data_stats", "build_eval_dataloader",
         "build_train_dataloader", "count_samples", "EvalData", "open_eval_data"), "data"),
    **dict.fromkeys(("default_data_files", "prepare_default_data"), "default_data"),
    **dict.fromkeys(("ZeroShotEvalCallback", "ZeroShotEvaluator", "evaluate_pretrained", "load_model_and_processor"),
                    "evaluation"),
    **dict.fromkeys(("classification_metrics", "load_metric", "retrieval_metrics"), "metrics"),
    **dict.fromkeys(("HubPushError", "RetryPolicy", "load_normalizer", "push_normalizer", "push_to_hub",
                     "save_normalizer"), "hub"),
    **dict.fromkeys(("apply_lora", "load_lora", "merge_lora", "save_lora"), "lora"),
    **dict.fromkeys(("TrainingSummary", "build_model_card"), "model_card"),
    **dict.fromkeys(("ZeroShotClassifier", "encode_images", "encode_texts", "load_templates", "zero_shot_classifier",
                     "zero_shot_classify", "zero_shot_retrieval"), "zero_shot"),
    **dict.fromkeys(("NeuCLIPTrainer", "NeuCLIPTrainingArguments"), "trainer"),
    **dict.fromkeys(("NormalizerDiagnosticsCallback",), "diagnostics"),
}


def __getattr__(name: str):
    if name == "OBJECTIVES":  # the registered objectives, including methods registered after import
        return registered_objectives()
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "NORMALIZERS",
    "OBJECTIVES",
    "AmortizedNormalizer",
    "ContrastiveBatch",
    "InBatchNormalizer",
    "MovingAverageNormalizer",
    "NeuCLIPConfig",
    "NeuCLIPModel",
    "NeuCLIPOutput",
    "Normalizer",
    "NormalizerEstimator",
    "NormalizerInputs",
    "PrototypeNormalizer",
    "SigmoidBias",
    "__version__",
    "build_normalizer",
    "register_normalizer",
    "registered_objectives",
    *sorted(_LAZY),
]
