"""The index of the training methods: importing it registers every built-in method.

Each method lives in its own flat sibling module (so `save_pretrained` ships them with the model code for
`trust_remote_code`): its estimator, its encoder loss, its config fields, citation and model-card text.

| objective  | module                  | class                     |
|------------|-------------------------|---------------------------|
| `clip`     | `normalizer_clip.py`    | `InBatchNormalizer`       |
| `siglip`   | `normalizer_siglip.py`  | `SigmoidBias`             |
| `fastclip` | `normalizer_fastclip.py`| `MovingAverageNormalizer` |
| `amorlip`  | `normalizer_amorlip.py` | `AmortizedNormalizer`     |
| `neuclip`  | `normalizer_neuclip.py` | `PrototypeNormalizer`     |

Adding a method: write `normalizer_<name>.py` with a `Normalizer` subclass decorated by `@register_normalizer`
and import it here (or anywhere before the config is built); nothing else changes (docs/architecture.md).
"""

from __future__ import annotations

from .normalizer_base import (
    NORMALIZERS,
    ConfigField,
    Normalizer,
    NormalizerEstimator,
    build_normalizer,
    estimator_config,
    find_normalizer,
    normalizer_class,
    register_normalizer,
    registered_objectives,
)
# Imported in the order the objectives are listed (registration order): baselines first, NeuCLIP last.
from .normalizer_clip import InBatchNormalizer  # isort: skip
from .normalizer_siglip import SigmoidBias  # isort: skip
from .normalizer_fastclip import MovingAverageNormalizer  # isort: skip
from .normalizer_amorlip import AmortizedNormalizer  # isort: skip
from .normalizer_neuclip import PrototypeNormalizer  # isort: skip

__all__ = [
    "NORMALIZERS",
    "AmortizedNormalizer",
    "ConfigField",
    "InBatchNormalizer",
    "MovingAverageNormalizer",
    "Normalizer",
    "NormalizerEstimator",
    "PrototypeNormalizer",
    "SigmoidBias",
    "build_normalizer",
    "estimator_config",
    "find_normalizer",
    "normalizer_class",
    "register_normalizer",
    "registered_objectives",
]
