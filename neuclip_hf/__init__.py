"""neuclip_hf: efficient CLIP pretraining (NeuCLIP, AmorLIP, FastCLIP, SigLIP, CLIP) on Hugging Face.

Importing the package registers `NeuCLIPConfig` / `NeuCLIPModel` with `AutoConfig`, `AutoModel` and
`AutoModelForZeroShotImageClassification`, so `AutoModel.from_pretrained(<neuclip dir>)` returns a NeuCLIPModel
and `pipeline("zero-shot-image-classification", model=<neuclip dir>)` works.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_neuclip import OBJECTIVES, NeuCLIPConfig
from .data import (
    DataArguments,
    DataQualityError,
    StreamingDataLoader,
    accumulate_data_stats,
    build_eval_dataloader,
    build_train_dataloader,
    count_samples,
)
from .default_data import default_data_files, prepare_default_data
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
)
from .objectives import ContrastiveBatch, NormalizerInputs
from .version import __version__
from .eval_data import EvalData, open_eval_data
from .evaluation import ZeroShotEvalCallback, ZeroShotEvaluator, evaluate_pretrained, load_model_and_processor
from .metrics import classification_metrics, load_metric, retrieval_metrics
from .hub import HubPushError, RetryPolicy, load_normalizer, push_normalizer, push_to_hub, save_normalizer
from .lora import apply_lora, load_lora, merge_lora, save_lora
from .model_card import TrainingSummary, build_model_card
from .zero_shot import (
    ZeroShotClassifier,
    encode_images,
    encode_texts,
    load_templates,
    zero_shot_classifier,
    zero_shot_classify,
    zero_shot_retrieval,
)

AutoConfig.register(NeuCLIPConfig.model_type, NeuCLIPConfig, exist_ok=True)
AutoModel.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)
# Saved directories carry the model code + auto_map, so they load with trust_remote_code=True without this package.
NeuCLIPConfig.register_for_auto_class()
NeuCLIPModel.register_for_auto_class("AutoModel")

__all__ = [
    "OBJECTIVES",
    "NORMALIZERS",
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
    "EvalData",
    "HubPushError",
    "RetryPolicy",
    "TrainingSummary",
    "apply_lora",
    "build_model_card",
    "load_lora",
    "load_normalizer",
    "merge_lora",
    "push_normalizer",
    "push_to_hub",
    "save_lora",
    "save_normalizer",
    "ZeroShotClassifier",
    "ZeroShotEvalCallback",
    "ZeroShotEvaluator",
    "classification_metrics",
    "encode_images",
    "encode_texts",
    "evaluate_pretrained",
    "load_metric",
    "load_model_and_processor",
    "load_templates",
    "open_eval_data",
    "retrieval_metrics",
    "zero_shot_classifier",
    "zero_shot_classify",
    "zero_shot_retrieval",
    "DataArguments",
    "DataQualityError",
    "StreamingDataLoader",
    "accumulate_data_stats",
    "build_eval_dataloader",
    "build_train_dataloader",
    "count_samples",
    "default_data_files",
    "prepare_default_data",
]
