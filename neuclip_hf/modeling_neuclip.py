"""NeuCLIPModel: Hugging Face `CLIPModel` encoders plus a normalizer estimator under `normalizer.*`.

The parameter names are exactly CLIPModel's plus `normalizer.*`, so a NeuCLIP checkpoint loads as a plain
`CLIPModel` (the normalizer keys are ignored) and any CLIP checkpoint loads as a NeuCLIP model with only the
normalizer new (`NeuCLIPModel.from_clip_pretrained`).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, CLIPModel
from transformers.models.clip.modeling_clip import CLIPOutput
from transformers.utils import can_return_tuple, logging

from .configuration_neuclip import NeuCLIPConfig
from .normalizers import Normalizer, build_normalizer
from .objectives import ContrastiveBatch, NormalizerInputs, batch_aware_rho, full_precision

logger = logging.get_logger(__name__)
_FRESH_NORMALIZER: ContextVar[bool] = ContextVar("neuclip_fresh_normalizer", default=False)

# Keyword arguments of `from_clip_pretrained` that go to `from_pretrained`, not into the config.
_LOADING_KWARGS = (
    "revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder", "dtype", "torch_dtype",
    "device_map", "trust_remote_code", "attn_implementation",
)


@dataclass
class NeuCLIPOutput(CLIPOutput):
    r"""Output of [`NeuCLIPModel`]: CLIP's output plus the loss components.

    loss_components (`dict[str, torch.Tensor]`, *optional*, returned when `return_loss` is `True`):
        Detached scalar parts of the loss (e.g. `unified`, `global_in_batch`, `unified_gap` for the global
        objectives, `contrastive` for clip, `sigmoid` for siglip).
    normalizer_diagnostics (`dict[str, torch.Tensor]`, *optional*, returned when `update_normalizer` is `True`):
        What the estimator update reports (e.g. `restart`, `objective_last` for neuclip; `gamma` for fastclip).
    logit_scale (`torch.Tensor` of shape `()`):
        The model's logit scale log(1/T) used for the logits.
    """

    loss_components: dict[str, torch.Tensor] | None = None
    normalizer_diagnostics: dict[str, torch.Tensor] | None = None
    logit_scale: torch.Tensor | None = None


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object from `get_*_features`; transformers 4 returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def fit_text_length(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None, max_length: int, eos_token_id: int):
    """Texts longer than the text model's positions, cut as the tokenizer's `truncation=True` cuts them: the first
    `max_length - 1` tokens and the end token. Callers that tokenize without truncation (the zero-shot pipeline with
    long labels) would otherwise index past the position table; shorter batches are returned unchanged."""
    if input_ids is None or input_ids.shape[-1] <= max_length:
        return input_ids, attention_mask, position_ids
    lengths = attention_mask.sum(dim=-1) if attention_mask is not None else torch.full(
        input_ids.shape[:-1], input_ids.shape[-1], device=input_ids.device)
    input_ids = input_ids[..., :max_length].clone()
    cut = lengths > max_length  # rows whose text ran past the last position: end them with the end token
    input_ids[cut, max_length - 1] = eos_token_id
    if attention_mask is not None:
        attention_mask = attention_mask[..., :max_length]
    if position_ids is not None:
        position_ids = position_ids[..., :max_length]
    return input_ids, attention_mask, position_ids


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / FSDP (`.module`), `torch.compile` (`._orig_mod`) and PEFT (`get_base_model()`)
    wrappers: the NeuCLIPModel whose config and normalizer the training code reads."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` (or the module inside DDP) is a PEFT wrapper."""
    return hasattr(getattr(model, "module", model), "peft_config")


class NeuCLIPModel(CLIPModel):
    """CLIP encoders trained with a normalizer estimator (`config.objective`).

    Example:
        ```python
        >>> from neuclip_hf import NeuCLIPConfig, NeuCLIPModel
        >>> model = NeuCLIPModel(NeuCLIPConfig(objective="neuclip"))
        >>> out = model(input_ids=ids, pixel_values=pixels, return_loss=True, update_normalizer=True)
        >>> out.loss, out.loss_components["unified_gap"]
        ```
    """

    config_class = NeuCLIPConfig
    config: NeuCLIPConfig
    _keep_in_fp32_modules = ["normalizer"]

    def __init__(self, config: NeuCLIPConfig):
        # Checked by type name, not isinstance: remote-code loading can import this file and the config's from
        # two different dynamic modules.
        if type(config).__name__ != "NeuCLIPConfig":
            raise TypeError(
                f"NeuCLIPModel needs a NeuCLIPConfig, got {type(config).__name__}; "
                "use NeuCLIPConfig.from_clip_config(config) or NeuCLIPModel.from_clip_pretrained(...)"
            )
        super().__init__(config)  # builds the encoders and calls post_init() (below); the config validated itself

    def post_init(self):
        # CLIPModel.__init__ ends with post_init(); adding the normalizer here, just before weights are
        # initialised, builds it exactly once without re-running the encoders' initialisation.
        if not hasattr(self, "normalizer"):
            self.normalizer: Normalizer = build_normalizer(self.config)
            for module in self.normalizer.modules():
                module._owned_by_normalizer = True
            self._ddp_params_and_buffers_to_ignore = self.ddp_ignored_state_names()
            self.logit_scale.requires_grad_(bool(self.config.learn_temperature))  # False: T stays at its init
        super().post_init()
        if _FRESH_NORMALIZER.get():  # inside from_clip_pretrained: the checkpoint's normalizer is not this one
            self._keys_to_ignore_on_load_missing = {*self._keys_to_ignore_on_load_missing, r"^normalizer\."}
            self._keys_to_ignore_on_load_unexpected = {*self._keys_to_ignore_on_load_unexpected, r"^normalizer\."}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, Normalizer):
            module.reset_parameters()  # estimator-specific init (the CLIP default would give Linear std 1.0)
            module.reset_buffers()  # counters / tables / banks a loaded checkpoint lacked: zero, not garbage
        elif not getattr(module, "_owned_by_normalizer", False):
            super()._init_weights(module)

    def ddp_ignored_state_names(self, prefix: str = "normalizer.") -> list[str]:
        """Names DDP must neither all-reduce nor broadcast: the estimator's own parameters and buffers.

        Every rank updates them identically from the gathered batch with the normalizer's own optimizer;
        parameters trained with the encoders (SigLIP's bias) stay under DDP.
        """
        encoder_side = self.normalizer.encoder_parameter_names()
        names = [n for n, _ in self.normalizer.named_parameters() if n not in encoder_side]
        names += [n for n, _ in self.normalizer.named_buffers()]
        return [prefix + n for n in names]

    # -- inference API ------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """L2-normalised image embeddings, shape (batch, projection_dim)."""
        return F.normalize(_pooled(self.get_image_features(pixel_values=pixel_values, **kwargs)), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """L2-normalised text embeddings, shape (batch, projection_dim)."""
        output = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return F.normalize(_pooled(output), dim=-1)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.logit_scale.detach()))

    def set_train_num_samples(self, n: int) -> None:
        """Record the training-set size n (one epoch = n samples) in the config and tell the normalizer."""
        self.config.train_num_samples = int(n)
        self.normalizer.set_train_num_samples(n)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep T in [temperature_min, temperature_max] (1/T <= 100 by default); call after every step."""
        low = -torch.log(torch.tensor(self.config.temperature_max)).item()
        high = -torch.log(torch.tensor(self.config.temperature_min)).item()
        self.logit_scale.clamp_(low, high)

    # -- training objective -------------------------------------------------------------------------------------
    def contrastive_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        update_normalizer: bool = False,
        rho: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The objective of this rank's local anchors against the gathered global batch.

        Args:
            image_embeds: (L, d) normalised local image embeddings (with grad).
            text_embeds: (L, d) normalised local text embeddings.
            sample_ids: (L,) stable sample ids, needed by `fastclip`.
            update_normalizer: Run the estimator update on the detached global batch first (training).
            rho: Temperature penalty weight for this step (defaults to `config.rho`; the trainer schedules it).
                With `config.rho_reference_batch`, the RGCL-g objectives use the batch-aware
                `rho - log((B_ref - 1) / (B - 1))` at global batch B.

        Returns:
            The loss, its components and the estimator's diagnostics (None without an update).
        """
        normalizer = self.normalizer
        if normalizer.needs_sample_ids and sample_ids is None:
            raise ValueError(
                f"objective={self.config.objective!r} keeps per-sample state and needs `sample_ids` in the batch"
            )
        rho = self.config.rho if rho is None else rho
        with full_precision(image_embeds.device):
            batch = ContrastiveBatch.gather(image_embeds, text_embeds, self.logit_scale, sample_ids)
            if normalizer.rgcl_temperature:
                rho = batch_aware_rho(rho, batch.all_image.shape[0], self.config.rho_reference_batch)
            # The B x B batch statistics only for methods that read them (not clip / siglip).
            inputs = NormalizerInputs.from_batch(batch, self.config.eps) if normalizer.needs_statistics else None
            diagnostics = None
            if update_normalizer:
                if inputs is None or inputs.is_finite():
                    diagnostics = normalizer.update(inputs)
                else:  # a non-finite batch must not reach the estimator's state; the loss will be non-finite too
                    diagnostics = {"skipped_nonfinite_batch": torch.tensor(1.0)}
            loss, components = normalizer.loss(batch, inputs, rho)
        return loss, components, diagnostics

    def get_text_features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs):
        """`CLIPModel.get_text_features` on texts fitted to the text model's positions (`fit_text_length`)."""
        input_ids, attention_mask, position_ids = fit_text_length(
            input_ids, attention_mask, position_ids, self.config.text_config.max_position_embeddings,
            self.config.text_config.eos_token_id)
        return super().get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        sample_ids: torch.LongTensor | None = None,
        update_normalizer: bool = False,
        rho: float | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> NeuCLIPOutput:
        r"""Encode both modalities; with `return_loss=True` also compute the configured objective.

        Args:
            input_ids: (batch, seq) token ids.
            pixel_values: (batch, channels, height, width) images.
            attention_mask: (batch, seq) text mask.
            position_ids: Optional text positions.
            return_loss: Compute the objective (local anchors against the gathered global batch).
            sample_ids: (batch,) stable sample ids (needed by `fastclip`).
            update_normalizer: Update the estimator on this batch before computing the loss (training step).
            rho: Temperature penalty weight for this step (defaults to `config.rho`).
            interpolate_pos_encoding: Passed to the vision tower.
        """
        image_output = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        text_output = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        image_embeds = F.normalize(_pooled(image_output), dim=-1)
        text_embeds = F.normalize(_pooled(text_output), dim=-1)
        logits_per_text = (text_embeds @ image_embeds.T) * self.logit_scale.exp()

        loss = components = diagnostics = None
        if return_loss:
            loss, components, diagnostics = self.contrastive_loss(
                image_embeds, text_embeds, sample_ids, update_normalizer, rho
            )
        return NeuCLIPOutput(
            loss=loss,
            # A copy, not a view: FSDP2 hooks every output of a sharded model for backward and warns on views.
            logits_per_image=logits_per_text.T.contiguous(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_output,
            vision_model_output=image_output,
            loss_components=components,
            normalizer_diagnostics=diagnostics,
            logit_scale=self.logit_scale,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; the directory also carries this package's model code and an
        `auto_map`, so it loads without neuclip_hf installed (`trust_remote_code=True`), in `AutoModel` and in the
        zero-shot image-classification pipeline."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForZeroShotImageClassification", f"{__name__.split('.')[-1]}.NeuCLIPModel")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_clip_pretrained(cls, pretrained_model_name_or_path, **overrides) -> "NeuCLIPModel":
        """Build a NeuCLIP model from any `CLIPModel` checkpoint: encoders loaded, only the normalizer new.

        Args:
            pretrained_model_name_or_path: A local directory or Hub id in `CLIPModel` layout
                (e.g. `openai/clip-vit-base-patch32`); a NeuCLIP checkpoint works too.
            **overrides: NeuCLIPConfig fields (e.g. `objective="fastclip"`, `neuclip_num_prototypes=1024`) and
                `from_pretrained` loading arguments (`revision`, `cache_dir`, `token`, `dtype`, ...).
        """
        load_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in _LOADING_KWARGS}
        config_kwargs = {k: load_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")
                         if k in load_kwargs}
        source = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        config = NeuCLIPConfig.from_clip_config(source, **overrides)
        # The normalizer is new by design here: a plain CLIP checkpoint has no `normalizer.*` keys (MISSING) and
        # one of another objective has other ones (UNEXPECTED). Neither is a fault, so neither is reported.
        fresh = getattr(source, "objective", None) != config.objective
        token = _FRESH_NORMALIZER.set(fresh)
        try:
            model = cls.from_pretrained(pretrained_model_name_or_path, config=config, **load_kwargs)
        finally:
            _FRESH_NORMALIZER.reset(token)
        if fresh:
            logger.info(f"{pretrained_model_name_or_path}: encoders loaded; the {config.objective} normalizer is new")
        return model


__all__ = ["NeuCLIPModel", "NeuCLIPOutput", "fit_text_length", "is_peft_model", "unwrap_model"]
