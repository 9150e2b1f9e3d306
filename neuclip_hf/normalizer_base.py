"""The normalizer contract, the registry of methods and the helpers every method shares.

Every training method of the package is one contrastive objective plus an estimate of each anchor's
log-normalizer log(eps + g_i) (docs/algorithms.md, section 2). A method is one `Normalizer` subclass in its own
file (`normalizer_<name>.py`), registered with `@register_normalizer`, and it owns everything about the method:

- `update(inputs)` changes its own state from the detached global batch (`NormalizerInputs`). Every rank sees the
  same gathered per-anchor statistics; an update that is a sum over anchors runs on this rank's `update_rows` and
  adds the ranks' parts with one all-reduce (`sum_parts_across_ranks`), the rest is the same deterministic
  computation on every rank, so the state stays identical on all ranks;
- `estimate(inputs)` returns detached estimates of log(eps + g_i) for this rank's anchors (`NormalizerEstimator`);
- `loss(batch, inputs, rho)` is the encoder objective that uses the estimate;
- its parameters, buffers and counters are in `state_dict()`, its optimizer (owned here, because restarts and
  re-initialisations reset it) in `optimizer.state_dict()`;
- its metadata: `title`, `summary` and `citation` (model cards), `config_prefix` and `config_fields` (its
  `NeuCLIPConfig` fields, their defaults, checks and help), `count_diagnostics` (which of its diagnostics are event
  counts rather than averages in the training logs), and the data it needs (`needs_sample_ids`,
  `needs_num_samples` with `config_from_data`).

Nothing outside a method's file is keyed by its objective name: the config, the trainer, the Hub code and the model
cards ask the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from .objectives import ContrastiveBatch, NormalizerInputs, unified_loss

NORMALIZERS: dict[str, type["Normalizer"]] = {}


# -- configuration fields -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConfigField:
    """One `NeuCLIPConfig` field of a method (stored as `<config_prefix><name>`).

    Attributes:
        default: Value when the field is not given.
        help: What it means (and the published value).
        check: Returns True for an allowed value.
        expected: What is allowed, for the error message.
    """

    default: Any
    help: str
    check: Callable[[Any], bool]
    expected: str


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_field(default: int, help: str, minimum: int = 1) -> ConfigField:
    """An integer field with a lower bound."""
    return ConfigField(default, help, lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")


def number_field(default: float, help: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> ConfigField:
    """A real-valued field inside [low, high] (ends open when asked); `optional` also allows None."""

    def check(value) -> bool:
        if value is None:
            return optional
        if not _is_number(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    if low is not None and high is not None:
        expected = f"a value in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        expected = f"{'<' if high_open else '<='} {high}"
    else:
        expected = "a finite number"
    return ConfigField(default, help, check, expected + (" or None" if optional else ""))


def choice_field(default: str, help: str, choices: tuple[str, ...]) -> ConfigField:
    """A field taking one of a few names."""
    return ConfigField(default, help, lambda v: v in choices, f"one of {choices}")


def bool_field(default: bool, help: str) -> ConfigField:
    return ConfigField(default, help, lambda v: isinstance(v, bool), "True or False")


# -- the registry -----------------------------------------------------------------------------------------------
def register_normalizer(cls: type["Normalizer"]) -> type["Normalizer"]:
    """Class decorator: make `cls` available as `NeuCLIPConfig(objective=cls.objective)`.

    Raises:
        ValueError: another class already uses the objective name or the config prefix.
    """
    for other in NORMALIZERS.values():
        if other is cls or other.__qualname__ == cls.__qualname__ and other.__module__ == cls.__module__:
            continue  # re-registration of the same class (module reloaded)
        if other.objective == cls.objective:
            raise ValueError(f"objective {cls.objective!r} is already registered by {other.__name__}")
        if cls.config_fields and other.config_prefix == cls.config_prefix:
            raise ValueError(f"config prefix {cls.config_prefix!r} is already used by {other.__name__}")
    NORMALIZERS[cls.objective] = cls
    return cls


def registered_objectives() -> tuple[str, ...]:
    """The objective names that a config accepts, in registration order."""
    return tuple(NORMALIZERS)


def normalizer_class(objective: str) -> type["Normalizer"]:
    """The registered class of an objective.

    Raises:
        ValueError: no method is registered under that name.
    """
    if objective not in NORMALIZERS:
        raise ValueError(f"objective={objective!r} is invalid: expected one of {registered_objectives()} (the "
                         "registered methods)")
    return NORMALIZERS[objective]


def build_normalizer(config) -> "Normalizer":
    """The normalizer of `config.objective`."""
    return normalizer_class(config.objective)(config)


def find_normalizer(model: nn.Module) -> "Normalizer":
    """The normalizer that the model's forward uses, through DDP and PEFT wrappers (under peft's `modules_to_save`,
    which `neuclip_hf.lora` refuses, the trained copy)."""
    found = [m for m in model.modules() if isinstance(m, Normalizer)]
    if not found:
        raise TypeError(f"{type(model).__name__} has no normalizer: NeuCLIPTrainer trains NeuCLIPModel")
    if len(found) > 1:  # PEFT's modules_to_save keeps a frozen original next to the trained copy
        trainable = [m for m in found if any(p.requires_grad for p in m.parameters())]
        found = trainable or found
    return found[-1]


def estimator_config(config, objective: str | None = None) -> dict[str, Any]:
    """The config values that parametrise an objective's estimator: `eps` and the method's own fields."""
    cls = normalizer_class(objective or config.objective)
    values = {"eps": config.eps}
    values.update({key: getattr(config, key, None) for key in sorted(cls.config_keys())})
    return values


# -- shared helpers -------------------------------------------------------------------------------------------------
def zero_counter() -> torch.Tensor:
    """A scalar step / event counter buffer."""
    return torch.zeros((), dtype=torch.long)


def tile_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows taken cyclically from `rows` (repeats them when there are fewer than `count`)."""
    repeats = math.ceil(count / rows.shape[0])
    return rows.repeat(repeats, 1)[:count]


def sum_parts_across_ranks(inputs: NormalizerInputs, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ranks' parts of sums over anchors, added up (one all-reduce for all of them) when `inputs.sharded`.

    Args:
        inputs: The batch statistics whose `update_rows` the parts were computed on.
        parts: Tensors (gradients, objective values) that are sums over this rank's anchors.

    Returns:
        The whole batch's sums, shaped as `parts` (the tensors themselves when the update is not sharded).
    """
    if not inputs.sharded:
        return parts
    flat = inputs.sum_across_ranks_(torch.cat([part.detach().reshape(-1) for part in parts]))
    return [chunk.view_as(part) for chunk, part in zip(flat.split([part.numel() for part in parts]), parts)]


# -- the contract -------------------------------------------------------------------------------------------------
class Normalizer(nn.Module):
    """Base of everything that can sit under `model.normalizer` (one subclass per method)."""

    objective: ClassVar[str]
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one paragraph for model cards
    citation: ClassVar[str] = ""  # BibTeX of the method's paper
    config_prefix: ClassVar[str] = ""
    config_fields: ClassVar[dict[str, ConfigField]] = {}
    # Diagnostics of `update` that are event counts (summed over a logging window, not averaged).
    count_diagnostics: ClassVar[tuple[str, ...]] = ("nonfinite",)
    needs_sample_ids: ClassVar[bool] = False
    # Whether the method's state is sized by the number of training samples (see `config_from_data`).
    needs_num_samples: ClassVar[bool] = False
    # Whether `loss`/`update` read the detached batch statistics (`NormalizerInputs`: per-anchor vectors from each
    # rank's L x B block of similarities).
    needs_statistics: ClassVar[bool] = True
    # Whether the temperature penalty weight rho may be negative (annealing schedules).
    allows_negative_rho: ClassVar[bool] = False
    # Whether the loss is RGCL-g-shaped in T (dL/dT >= 2 rho - 2 log(B - 1)), so `rho_reference_batch` applies.
    rgcl_temperature: ClassVar[bool] = False
    default_temperature: ClassVar[float] = 0.07  # CLIP's initial T when the config gives none
    # Initial values of the buffers that do not start at zero (counters, tables, banks and flags start at zero).
    buffer_initial_values: ClassVar[dict[str, float]] = {}

    def __init__(self, config):
        super().__init__()
        self.eps = float(config.eps)
        self.train_num_samples: int | None = config.train_num_samples
        self._optimizer: torch.optim.Optimizer | None = None
        self._learning_rate: float | None = None

    # -- epochs ------------------------------------------------------------------------------------------------------
    def set_train_num_samples(self, n: int) -> None:
        """The training-set size (one epoch = n samples seen), for estimators with epoch-based schedules."""
        self.train_num_samples = int(n)

    def epoch_length_problem(self) -> str | None:
        """Why this estimator cannot run without knowing the epoch length (None: it can)."""
        return None

    # -- configuration ------------------------------------------------------------------------------------------
    @classmethod
    def config_keys(cls) -> list[str]:
        """The method's field names as stored in the config (`<config_prefix><name>`)."""
        return [cls.config_prefix + name for name in cls.config_fields]

    @classmethod
    def validate_config(cls, config) -> None:
        """Check the method's fields (and cross-field rules in subclasses); raises ValueError naming the field."""
        for name, spec in cls.config_fields.items():
            key = cls.config_prefix + name
            value = getattr(config, key, spec.default)
            if not spec.check(value):
                raise ValueError(f"NeuCLIPConfig.{key}={value!r} is invalid: expected {spec.expected}.")

    @classmethod
    def settings(cls, config) -> SimpleNamespace:
        """The method's fields without their prefix (`settings(config).num_prototypes`)."""
        return SimpleNamespace(**{name: getattr(config, cls.config_prefix + name, spec.default)
                                  for name, spec in cls.config_fields.items()})

    @classmethod
    def config_from_data(cls, num_samples: int) -> dict[str, Any]:
        """Config fields derived from the training data (e.g. a per-sample table's size); see `needs_num_samples`."""
        return {}

    # -- parameters and optimizer ------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """(Re-)initialise learnable state. Called by the model's weight init (guarded against loaded tensors)."""

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Give every buffer not loaded from a checkpoint its initial value. Called by the model's weight init:
        `from_pretrained` materialises the buffers a checkpoint lacks (a CLIP checkpoint has no normalizer)
        uninitialised, so counters, tables and banks would otherwise start from garbage."""
        for name, buffer in self.named_buffers():
            if not getattr(buffer, "_is_hf_initialized", False):  # set by transformers on tensors it loaded
                buffer.fill_(self.buffer_initial_values.get(name.rsplit(".", 1)[-1], 0))

    def encoder_parameter_names(self) -> set[str]:
        """Names (relative to this module) of parameters trained with the encoders rather than by `update`."""
        return set()

    def estimator_parameters(self) -> list[nn.Parameter]:
        """Parameters the normalizer's own optimizer trains in `update`."""
        encoder_side = self.encoder_parameter_names()
        return [p for n, p in self.named_parameters() if n not in encoder_side and p.requires_grad]

    def default_learning_rate(self) -> float | None:
        return None

    def scaled_learning_rate(self, lr: float) -> float:
        """The learning rate the own optimizer runs at for a requested `lr` (see AmorLIP's world-size scaling)."""
        return lr

    def _make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        raise TypeError(f"{type(self).__name__} has no optimizer")

    def build_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer | None:
        """Create the normalizer's optimizer (after the model is on its device); `lr=None` uses the config's."""
        params = self.estimator_parameters()
        if not params:
            return None
        self._learning_rate = lr if lr is not None else self.default_learning_rate()
        self._optimizer = self._make_optimizer(params, self.scaled_learning_rate(self._learning_rate))
        return self._optimizer

    def ensure_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer | None:
        """Build the optimizer if needed (keeping an existing one and its state), then apply `lr` if given."""
        if self._optimizer is None:
            return self.build_optimizer(lr)
        if lr is not None:
            self._learning_rate = lr
            for group in self._optimizer.param_groups:
                group["lr"] = self.scaled_learning_rate(lr)
        return self._optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The normalizer's optimizer, built on first use."""
        if self._optimizer is None:
            self.build_optimizer(self._learning_rate)
        return self._optimizer

    def reset_optimizer_state(self) -> None:
        """Forget accumulated optimizer statistics (torch re-creates them lazily on the next step)."""
        if self._optimizer is not None:
            self._optimizer.state.clear()

    def _optimizer_step(self, loss: torch.Tensor, params: list[nn.Parameter], clip: float | None = None) -> None:
        """One step of the own optimizer. Uses `autograd.grad`, so encoder gradients and DDP hooks are untouched."""
        self._apply_gradients(params, torch.autograd.grad(loss, params), clip)

    def _apply_gradients(
        self, params: list[nn.Parameter], gradients: list[torch.Tensor], clip: float | None = None
    ) -> None:
        """Step the own optimizer with the given gradients; `.grad` is cleared again afterwards."""
        for p, g in zip(params, gradients):
            p.grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        for p in params:
            p.grad = None

    @contextmanager
    def rollback_if_nonfinite(self, params: list[nn.Parameter], diagnostics: dict) -> Iterator[None]:
        """Undo the optimizer steps of the block if they left a non-finite parameter (and reset the optimizer), so
        one bad batch never poisons the estimator; records `nonfinite` in `diagnostics`."""
        backup = [p.detach().clone() for p in params]
        yield
        if not all(torch.isfinite(p).all() for p in params):
            for p, b in zip(params, backup):
                p.copy_(b)
            self.reset_optimizer_state()
            diagnostics["nonfinite"] = torch.tensor(1.0)

    # -- the method ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, inputs: NormalizerInputs | None) -> dict[str, torch.Tensor]:
        """Update own state from the detached global batch; returns diagnostics (detached scalars)."""
        return {}

    def loss(
        self, batch: ContrastiveBatch, inputs: NormalizerInputs | None, rho: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder objective of this method, for this rank's local anchors."""
        raise NotImplementedError


class NormalizerEstimator(Normalizer):
    """A normalizer that estimates alpha_i ~ log(eps + g_i) for each anchor and direction; its encoders minimise
    NeuCLIP's unified objective with that (detached) estimate."""

    rgcl_temperature = True

    def estimate(self, inputs: NormalizerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached estimates of log(eps + g1_i), log(eps + g2_i) for the anchors in `inputs.local`."""
        raise NotImplementedError

    def loss(self, batch, inputs, rho):
        alpha_image, alpha_text = self.estimate(inputs)
        return unified_loss(batch, alpha_image, alpha_text, self.eps, rho)


__all__ = [
    "NORMALIZERS",
    "ConfigField",
    "Normalizer",
    "NormalizerEstimator",
    "bool_field",
    "build_normalizer",
    "choice_field",
    "estimator_config",
    "find_normalizer",
    "int_field",
    "normalizer_class",
    "number_field",
    "register_normalizer",
    "registered_objectives",
    "sum_parts_across_ranks",
    "tile_rows",
    "zero_counter",
]
