"""Every argument dataclass of the package, and the recipes' parser that also reads one YAML/JSON file.

- `ModelArguments`: what model to train (objective, preset, continued pretraining, config overrides);
- `LoraArguments`: LoRA adapters (`--lora_r` > 0 enables them);
- `DataArguments`: training and evaluation data (sources, columns, bad-sample policy, preprocessing);
- `EvalArguments`: held-out zero-shot evaluation and the live normalizer diagnostics during training;
- `NeuCLIPTrainingArguments`: `transformers.TrainingArguments` plus what the normalizer methods need.

`python recipes/train.py config.yaml --max_steps 100`: the file's values first, then the command line overrides
them. Every dataclass field is a flag (`--objective`, `--init_from`, `--train_data`, and all `TrainingArguments`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .hub import RetryPolicy
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
RHO_SCHEDULE_UNITS = ("fraction", "epoch")
RESUME_WITH_OTHER_LAYOUT = ("refuse", "next_epoch")


@dataclass
class ModelArguments:
    """What model to train."""

    objective: str = field(
        default="neuclip", metadata={"help": "clip, siglip, fastclip, amorlip or neuclip (NeuCLIPConfig.objective)."}
    )
    model_preset: str = field(
        default="tiny", metadata={"help": "Geometry of a model trained from scratch: tiny or vit-b-32."}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Continued pretraining: a CLIP or NeuCLIP checkpoint (directory or Hub id, e.g. "
                          "openai/clip-vit-base-patch32). Its encoders, tokenizer and processor are loaded; only the "
                          "normalizer is new."},
    )
    init_normalizer_from: str | None = field(
        default=None,
        metadata={"help": "Warm-start the normalizer from a normalizer repository / directory (normalizer.safetensors "
                          "+ normalizer_config.json, see neuclip_hf.hub.push_normalizer) or a NeuCLIP checkpoint; the "
                          "objective and the tensor shapes must match."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory or Hub id (default: OpenAI's CLIP BPE, built offline)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "NeuCLIPConfig fields to set, as JSON ('{\"neuclip_num_prototypes\": 1024}') or "
                          "'key=value,key=value' (e.g. 'neuclip_inner_steps=10,rho=8.5')."},
    )


@dataclass
class EvalArguments:
    """Held-out zero-shot evaluation during and after training (the data is `--eval_data`)."""

    zero_shot_eval_steps: int = field(
        default=0, metadata={"help": "Evaluate every N steps (0: only at the end of training)."}
    )
    zero_shot_templates: str = field(
        default="openai", metadata={"help": "Prompt templates: openai (80), simple (7) or a file with one per line."}
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many held-out samples (default: all)."}
    )
    eval_batch_size: int = field(default=256, metadata={"help": "Images encoded at a time during evaluation."})
    normalizer_diagnostics_steps: int = field(
        default=0,
        metadata={"help": "Every N steps, log the estimator's error against the exact log-normalizer of a probe set "
                          "over a pool of training samples (normalizer_mse, normalizer_in_batch_mse); 0: off."},
    )
    normalizer_diagnostics_pool: int = field(
        default=2048, metadata={"help": "Training samples in the diagnostics' reference pool (the first ones)."}
    )
    # Deprecated spellings, kept for one release.
    normaliser_diagnostics_steps: int | None = field(
        default=None, metadata={"help": "Deprecated: use --normalizer_diagnostics_steps."}
    )
    normaliser_diagnostics_pool: int | None = field(
        default=None, metadata={"help": "Deprecated: use --normalizer_diagnostics_pool."}
    )

    def __post_init__(self):
        for old, new in (("normaliser_diagnostics_steps", "normalizer_diagnostics_steps"),
                         ("normaliser_diagnostics_pool", "normalizer_diagnostics_pool")):
            value = getattr(self, old)
            if value is not None:
                warnings.warn(f"--{old} is deprecated; use --{new}", FutureWarning, stacklevel=2)
                setattr(self, new, value)
                setattr(self, old, None)


@dataclass
class LoraArguments:
    """LoRA flags of the training recipe (`--lora_r 16` enables it)."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full encoders (no LoRA)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated module names inside both encoders that get adapters (CLIP attention: "
                          "q_proj, k_proj, v_proj, out_proj; MLP: fc1, fc2)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})


@dataclass
class DataArguments:
    """Input arguments of training and evaluation (`HfArgumentParser`-compatible)."""

    train_data: str | None = field(default=None, metadata={
        "help": "Training data: a glob, a comma-separated list of files (webdataset .tar, .parquet, .arrow, captions "
                ".jsonl/.csv), a local directory (images + captions.jsonl, or a dataset directory) or a Hub dataset "
                "name. Default: the embedded Fashion-MNIST captions (train split)."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Evaluation data, same forms as --train_data. Default: the embedded dataset's test split."})
    train_split: str = field(default="train", metadata={"help": "Split of a dataset directory / Hub dataset."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split for evaluation of a dataset directory / Hub dataset (default: the first of test, validation, "
                "valid, val, eval that exists)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column / webdataset field to use."})
    caption_column: str | None = field(default=None, metadata={
        "help": "Caption column / webdataset field; `json.<key>` picks a key inside a JSON field."})
    id_column: str | None = field(default=None, metadata={
        "help": "Sample-id column (default: sample_id / id / key / the webdataset key; else a content hash)."})
    shuffle_buffer: int = field(default=0, metadata={
        "help": "Shuffle buffer (raw examples per DataLoader worker); > 0 also shuffles the shard order, anew at "
                "each set_epoch. 0 = fixed order and exact resume; with a buffer, a resume skips the buffered "
                "examples (at most shuffle_buffer per worker) and repeats none."})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "Stop with an error when the fraction of bad samples read (totals over every DataLoader worker and "
                "rank) is over this limit with 99.5% confidence (Wilson lower bound). 0: any bad sample stops."})
    bad_check_min_samples: int = field(default=1000, metadata={
        "help": "Judge the bad fraction only after this many samples were read in total (all workers and ranks)."})
    min_image_side: int = field(default=DEFAULT_MIN_SIDE, metadata={"help": "Skip images with a smaller side."})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "Skip images with more pixels (decompression bombs; checked before decoding)."})
    augment: bool = field(default=False, metadata={"help": "Random-resized-crop augmentation for training."})
    jpeg_draft: bool = field(default=True, metadata={
        "help": "Decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when the result still covers the model input: "
                "several times faster on photos much larger than the input. --jpeg_draft False decodes at full "
                "size (bit-exact CLIP preprocessing)."})
    augment_min_scale: float = field(default=0.9, metadata={
        "help": "Smallest area fraction of the random-resized crop (CLIP uses 0.9)."})
    max_text_length: int | None = field(default=None, metadata={
        "help": "Tokens per caption, start/end included (default: the tokenizer's model_max_length, which the "
                "trainer sets to the model's max positions)."})
    train_num_samples: int | None = field(default=None, metadata={
        "help": "Training-set size n: one epoch is n samples seen (FastCLIP's table size, AmorLIP's epochs, "
                "epoch-based rho schedules, the logged epoch). Unset: counted once from parquet footers / "
                "webdataset tar headers (cached), or taken from the Hub dataset's metadata."})
    dataset_size: int | None = field(default=None, metadata={
        "help": "Deprecated alias of --train_num_samples."})

    def __post_init__(self):
        if self.dataset_size is not None:
            warnings.warn("--dataset_size is deprecated: use --train_num_samples (the same number of training "
                          "samples)", FutureWarning, stacklevel=2)
            if self.train_num_samples not in (None, self.dataset_size):
                raise ValueError(f"--dataset_size={self.dataset_size} and --train_num_samples="
                                 f"{self.train_num_samples} disagree; give only --train_num_samples")
            self.train_num_samples = self.dataset_size
        checks = [
            (self.shuffle_buffer >= 0, "shuffle_buffer", "an integer >= 0"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "a fraction in [0, 1]"),
            (self.bad_check_min_samples >= 1, "bad_check_min_samples", "an integer >= 1"),
            (self.min_image_side >= 1, "min_image_side", "an integer >= 1"),
            (self.max_image_pixels >= 1, "max_image_pixels", "an integer >= 1"),
            (0.0 < self.augment_min_scale <= 1.0, "augment_min_scale", "a fraction in (0, 1]"),
            (self.max_text_length is None or self.max_text_length >= 2, "max_text_length", "None or >= 2"),
            (self.train_num_samples is None or self.train_num_samples >= 1, "train_num_samples", "None or >= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"DataArguments.{name}={getattr(self, name)!r}: expected {expected}")


@dataclass
class NeuCLIPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus what the normalizer methods need; defaults follow the published CLIP recipes.

    Gradient accumulation is refused: the global objectives and the estimators need the whole global batch in one
    step (their normalizer is a function of the batch), and NeuCLIP's point is to need no huge batch.
    """

    normalizer_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the normalizer's own optimizer (default: the config's)."}
    )
    normalizer_lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Scheduler of the normalizer's optimizer (a transformers scheduler)."}
    )
    temperature_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Own constant learning rate of the temperature (FastCLIP: 1e-4 to 2e-4); None: the encoder "
                          "schedule, as OpenCLIP does."},
    )
    temperature_lr_threshold: float = field(
        default=0.03, metadata={"help": "FastCLIP's rule: multiply the temperature lr by the factor once T <= this."}
    )
    temperature_lr_factor: float = field(default=1 / 3, metadata={"help": "See temperature_lr_threshold."})
    rho_schedule: list[float] | None = field(
        default=None,
        metadata={"help": "Piecewise-constant rho over equal segments of the run (see --rho_schedule_unit), in this "
                          "package's convention: rho per direction, the loss adds 2 rho T, so AmorLIP's rho_A is "
                          "2 rho. AmorLIP's released CC12M run (--rho_list [8.5 -8.5 -8.5], 33 epochs) is "
                          "`--rho_schedule 4.25 -4.25 -4.25 --rho_schedule_unit epoch`; its paper's medium scale "
                          "(rho_A 6.5, -8.0 in the last quarter) is `3.25 3.25 3.25 -4.0`. Default: the config's rho."},
    )
    rho_schedule_unit: str = field(
        default="fraction",
        metadata={"help": "How --rho_schedule splits the run: `fraction` (equal parts of the run's steps) or `epoch` "
                          "(equal blocks of whole epochs, as AmorLIP's --rho_list: epoch e of a run of E epochs, "
                          "E = max_steps x global batch / n rounded, uses value floor(e K / E) of K; needs "
                          "--train_num_samples)."},
    )
    max_consecutive_nonfinite: int = field(
        default=5, metadata={"help": "Stop after this many consecutive steps with a non-finite loss or estimate."}
    )
    resume_with_other_layout: str = field(
        default="refuse",
        metadata={"help": "What resuming from a checkpoint written by another number of processes or DataLoader workers "
                          "does with the data stream, whose saved positions are per rank and per worker: `refuse` (an "
                          "error on every rank, naming both layouts) or `next_epoch` (the weights, optimizers, "
                          "normalizer, schedules and data totals carry over; every rank starts the epoch after the "
                          "newest one a saved rank had reached, so no sample is seen twice and the rest of the "
                          "interrupted epoch is not seen). The global batch must stay the same either way."},
    )
    fsdp_encoders: bool = field(
        default=False, metadata={"help": "Shard the encoders with torch's FSDP2 (each CLIP encoder layer one unit; "
                                         "the normalizer and logit_scale stay whole), instead of DDP. Needs a "
                                         "distributed launch (docs/scale.md, FSDP); the Trainer's own --fsdp and "
                                         "accelerate's --use_fsdp are refused."}
    )
    # Defaults changed from TrainingArguments (published CLIP recipes: AdamW beta2 0.98, eps 1e-6, cosine, clip 1).
    output_dir: str | None = field(default="outputs/neuclip", metadata={"help": "Where checkpoints are written."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the encoders."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on biases, norms, 1-D, T)."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Encoder learning-rate schedule."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `sample_ids` in the batch."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "All encoder weights are used."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Equal batches on every rank."})
    ddp_timeout: int = field(default=900, metadata={
        "help": "Seconds a rank waits in a collective (the process-group timeout) before failing: bounds how long "
                "the others wait for a rank that hangs or whose death the launcher cannot see. Raise it when the "
                "main process's evaluation or Hub upload, which the other ranks wait for, takes longer."})
    hub_push_tensorboard: bool = field(
        default=False, metadata={"help": "Also push the TensorBoard event files under output_dir/runs/ "
                                         "(--report_to tensorboard writes them) with the model."}
    )
    hub_push_attempts: int = field(
        default=4, metadata={"help": "Attempts of each Hub call of a push (network errors, HTTP 408/429/5xx)."}
    )
    hub_push_backoff: float = field(
        default=2.0, metadata={"help": "Seconds before the first retry of a Hub call; doubles per retry (max 60)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"--gradient_accumulation_steps={self.gradient_accumulation_steps} is not supported: the global "
                "objectives and normalizer estimators need the whole global batch in one step. Raise "
                "--per_device_train_batch_size or the number of processes instead (NeuCLIP is designed for small "
                "batches)."
            )
        for name in ("learning_rate", "normalizer_learning_rate", "temperature_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"--{name}={value} is invalid: a learning rate must be >= 0")
        if self.per_device_train_batch_size * max(self.world_size, 1) < 2:
            raise ValueError(
                f"--per_device_train_batch_size={self.per_device_train_batch_size} with {self.world_size} process(es) "
                "gives a global batch of 1: contrastive objectives need at least 2 pairs"
            )
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"--max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 1")
        if self.rho_schedule is not None and len(self.rho_schedule) == 0:
            raise ValueError("--rho_schedule needs at least one value")
        if self.rho_schedule_unit not in RHO_SCHEDULE_UNITS:
            raise ValueError(f"--rho_schedule_unit={self.rho_schedule_unit!r} is invalid: expected one of "
                             f"{RHO_SCHEDULE_UNITS}")
        if self.resume_with_other_layout not in RESUME_WITH_OTHER_LAYOUT:
            raise ValueError(f"--resume_with_other_layout={self.resume_with_other_layout!r} is invalid: expected one "
                             f"of {RESUME_WITH_OTHER_LAYOUT}")
        if self.push_to_hub and self.hub_strategy in ("checkpoint", "all_checkpoints"):
            strategy = getattr(self.hub_strategy, "value", self.hub_strategy)
            raise ValueError(
                f"--hub_strategy={strategy} is not supported: checkpoints hold pickled optimizer and RNG states, "
                "which neuclip_hf never uploads. Use every_save (the model files of each save) or end."
            )
        RetryPolicy(self.hub_push_attempts, self.hub_push_backoff)  # validates both values


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`config_overrides` as a dict: JSON, or comma-separated key=value pairs with YAML-typed values."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    overrides = {}
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return overrides


def _to_cli(values: dict[str, Any]) -> list[str]:
    """A config file's mapping as command-line tokens, so the real command line can override it."""
    tokens: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        tokens.append(f"--{key}")
        if isinstance(value, bool):
            tokens.append("true" if value else "false")
        elif isinstance(value, (list, tuple)):
            tokens.extend(str(v) for v in value)
        elif isinstance(value, dict):
            tokens.append(json.dumps(value))
        else:
            tokens.append(str(value))
    return tokens


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    return values


def parse_arguments(dataclass_types: tuple, argv: list[str], default_config: str | Path | None = None) -> tuple:
    """Parse `argv` into the dataclasses: dataclass defaults < one YAML/JSON config file < command-line flags.

    The config file may stand anywhere in `argv` (a `.yaml` / `.yml` / `.json` token that is not the value of a
    flag, such as `--deepspeed ds.json`); without one, `default_config` is used, so `--max_steps 100` alone changes
    only the steps of the default run. Flags always override the file, whatever their position.

    Args:
        dataclass_types: The argument dataclasses, e.g. (ModelArguments, DataArguments, NeuCLIPTrainingArguments).
        argv: Command-line tokens (without the program name).
        default_config: The file used when `argv` names none (the recipe's default run).

    Raises:
        ValueError: more than one config file, a key of the file or a flag that no dataclass has.
        FileNotFoundError: a config file that does not exist.
    """
    parser = HfArgumentParser(dataclass_types)
    takes_value = {option for action in parser._actions for option in action.option_strings if action.nargs != 0}
    known = {option for action in parser._actions for option in action.option_strings}
    tokens, configs = [], []
    for index, token in enumerate(argv):
        is_value = index > 0 and argv[index - 1].split("=")[0] in takes_value and "=" not in argv[index - 1]
        if Path(token).suffix in CONFIG_SUFFIXES and not token.startswith("-") and not is_value:
            configs.append(token)
        else:
            tokens.append(token)
    if len(configs) > 1:
        raise ValueError(f"give at most one config file, got {configs}")
    config = configs[0] if configs else default_config
    if config is not None:
        values = read_config_file(config)
        unknown_keys = [key for key in values if f"--{key}" not in known]
        if unknown_keys:
            raise ValueError(f"{Path(config).name}: unknown key(s) {', '.join(unknown_keys)} (see --help)")
        tokens = _to_cli(values) + tokens  # argparse keeps the last value: the command line wins
    unknown = [t for t in tokens if t.startswith("--") and t.split("=")[0] not in known]
    if unknown:
        raise ValueError(f"unknown argument(s): {', '.join(unknown)} (see --help)")
    return parser.parse_args_into_dataclasses(args=tokens)
