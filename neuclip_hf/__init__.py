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

AutoConfig.register(NeuCLIPConfig.model_type, NeuCLIPConfig, exist_ok=True)
AutoModel.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(NeuCLIPConfig, NeuCLIPModel, exist_ok=True)

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
