"""NeuCLIPTrainer: Hugging Face `Trainer` with the alternating normalizer / encoder updates.

Per optimizer step (one DDP forward, one backward):
  1. encoders forward (DDP-wrapped, autocast under bf16/fp16), local embeddings gathered with autograd;
  2. the normalizer updates its own state from the detached global batch (NeuCLIP: restart rule then T_u AdaGrad
     steps; AmorLIP: its Stage I schedule and EMA; FastCLIP: the table rows of the batch's sample ids) — this runs
     inside `NeuCLIPModel.forward(update_normalizer=True)` with the normalizer's own optimizer, and is identical on
     every rank because every rank sees the same gathered batch;
  3. the encoder loss with the estimate detached, backward, AdamW step on encoders and temperature;
  4. clamp 1/T <= 100, FastCLIP's temperature learning-rate threshold, the normalizer's scheduler step.

The normalizer's parameters are never in the encoder optimizer, never in the encoder gradient clipping (they never
hold a `.grad`) and never in DDP's gradient averaging (`NeuCLIPModel.ddp_ignored_state_names`).

Rule for callbacks and Hub code in distributed runs (docs/architecture.md has the details): every rank makes the
same sequence of collective calls, whatever it logs, evaluates, saves or pushes. So
- a callback never changes the Trainer's control flags (`should_log`, `should_save`, ...) on one rank only, neither
  directly nor by calling `trainer.log` on one rank (`on_log` clears `should_log`, and the rank that logged would
  skip the all-gather of the step's training log that the others enter);
- work done on the main process only (evaluation, diagnostics, model card, Hub upload) sits between collectives
  every rank makes: `distributed.main_process_result` hands the main process's result to every rank (log it on
  every rank, as `Trainer` logs its own evaluation metrics), or a barrier of every rank follows the work;
- lines logged during a step (a callback's `on_step_end`) come after the step's training line: `NeuCLIPTrainer.log`
  queues them until that line is logged, so they never cancel it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import Trainer, TrainerCallback
from transformers.optimization import get_scheduler
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging
from transformers.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

from .arguments import NeuCLIPTrainingArguments
from .checkpointing import marker_global_step, read_full_weights, resolve_resume_checkpoint, write_marker
from .distributed import (
    average_replicated_gradients_,
    broadcast_encoder_state_,
    full_model_state_dict,
    is_distributed,
    is_fsdp_sharded,
    load_full_model_state_dict,
    own_class,
    rank_and_world_size,
    shard_encoders_fsdp2,
)
from .hub import NORMALIZER_WEIGHTS_NAME, RetryPolicy, load_normalizer, save_normalizer
from .data.samples import DataQualityError, bad_data_message, over_bad_limit
from .images import BAD_SAMPLE_REASONS
from .lora import check_lora_model, keep_normalizer_trainable
from .modeling_neuclip import is_peft_model, unwrap_model
from .normalizers import Normalizer, find_normalizer
from .trainer_hub import HubPushMixin, use_public_tensorboard

logger = logging.get_logger(__name__)

NORMALIZER_STATE_NAME = "normalizer_optimizer.pt"
RHO_EPOCHS_NEED_SIZE = "--rho_schedule_unit epoch counts epochs: set --train_num_samples (the training-set size)"
DATA_STATE_NAME = "data_state_rank{rank}.pt"
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a process ended by SIGTERM reports, as schedulers expect


def checkpoint_map_location(device: torch.device, world_size: int) -> torch.device | str:
    """Where a checkpointed optimizer state is loaded, as `Trainer` loads its own optimizer: straight onto each
    rank's accelerator in a distributed run, else the CPU (`optimizer.load_state_dict` then moves the state next to
    its parameters). Never an indexed CPU device: torch cannot restore storages onto `cpu:0`."""
    return device if world_size > 1 and device.type != "cpu" else "cpu"


def scheduled_value(schedule: list[float], unit: str, step: int, max_steps: int, global_batch: int,
                    train_num_samples: int | None) -> float:
    """The value of a piecewise-constant schedule at optimizer step `step` (0-based) of a `max_steps` run.

    Args:
        schedule: K values over K equal parts of the run.
        unit: `fraction` (parts of the steps) or `epoch` (blocks of whole epochs: epoch e = step x global_batch // n
            of a run of E = max_steps x global_batch / n epochs rounded, uses value e K // E, as AmorLIP's --rho_list).
        step, max_steps: The step and the run's length.
        global_batch: Samples per step.
        train_num_samples: n, needed by `epoch`.
    """
    if unit == "epoch":
        if train_num_samples is None:
            raise ValueError(RHO_EPOCHS_NEED_SIZE)
        epoch = step * global_batch // train_num_samples  # the integer epoch of this step
        total_epochs = max(1, round(max_steps * global_batch / train_num_samples))
        index = epoch * len(schedule) // total_epochs
    else:
        index = step * len(schedule) // max(max_steps, 1)
    return float(schedule[min(index, len(schedule) - 1)])



@contextmanager
def library_progress_bars(enabled: bool):
    """transformers' own progress bars (e.g. "Writing model shards" while saving) on or off inside, as before after.

    Inside Trainer's progress bar a library bar is a nested tqdm bar, drawn with cursor-up escape codes; in a log
    file (stderr not a terminal) those codes are garbage, so the trainer saves with them off there.
    """
    was_enabled = is_progress_bar_enabled()
    (enable_progress_bar if enabled else disable_progress_bar)()
    try:
        yield
    finally:
        (enable_progress_bar if was_enabled else disable_progress_bar)()


class TemperatureThresholdLR:
    """Per-group learning-rate factor of the temperature: 1 until T first drops to the threshold, then `factor`.

    A plain object (not a closure), so `LambdaLR.state_dict()` stores its `crossed` flag and resume is exact.
    """

    def __init__(self, threshold: float, factor: float):
        self.threshold = threshold
        self.factor = factor
        self.crossed = False

    def observe(self, temperature: float) -> None:
        self.crossed = self.crossed or temperature <= self.threshold

    def __call__(self, step: int) -> float:
        return self.factor if self.crossed else 1.0


def optimizer_state_by_name(saved: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """A `torch.optim` state dict keyed by parameter index (`optimizer.pt`) keyed by parameter name instead, as
    `set_optimizer_state_dict` takes it. The saving run built its optimizer from the same model with the same groups,
    so the i-th parameter of each saved group is the i-th parameter of the same group of `optimizer`.

    Raises:
        ValueError: the saved groups do not have the sizes of `optimizer`'s (another model or optimizer set-up).
    """
    names = {id(param): name for name, param in model.named_parameters()}
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        raise ValueError(f"the saved encoder optimizer has parameter groups of sizes {sizes}, this run's "
                         f"{[len(group['params']) for group in optimizer.param_groups]}: another model or set-up")
    name_of = {index: names[id(param)] for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)
               for index, param in zip(saved_group["params"], group["params"])}
    return {"state": {name_of[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                             for group in saved["param_groups"]]}


def describe_layout(layout: dict) -> str:
    """A data layout (`StreamingDataLoader.layout`) in words."""
    return (f"{layout['world_size']} process(es) x {layout['num_workers']} DataLoader worker(s), batch "
            f"{layout['batch_size']} per process")


class EndlessLoader:
    """A resumable loader iterated epoch after epoch as one endless stream.

    Ranks can see different numbers of batches per epoch (shards of different sizes), so epochs are never
    synchronised: when a rank's pass ends it starts its next epoch (`set_epoch`, which reshuffles shards) and keeps
    feeding steps. The Trainer sees an iterable without length and counts `max_steps`.
    """

    def __init__(self, loader):
        self.loader = loader

    def no_batch_error(self) -> Exception:
        """The error of a pass without a batch: what was read and skipped (per reason, per shard), as a
        `DataQualityError` when the bad fraction is over the limit, else a `RuntimeError`."""
        totals, stream = getattr(self.loader, "totals", None), getattr(self.loader, "stream", None)
        if totals is None:
            return RuntimeError("the training data yields no batch: fewer samples than one batch per rank?")
        layout = getattr(self.loader, "layout", {})
        if stream is not None and over_bad_limit(totals.read, totals.skipped, stream.max_bad_fraction, 1):
            return DataQualityError(bad_data_message(totals.read, totals.skipped, stream.max_bad_fraction,
                                                     f"rank {layout.get('rank', 0)}", totals.describe()))
        return RuntimeError(
            f"the training data yields no batch on rank {layout.get('rank', 0)}: {totals.describe()}. Each "
            f"DataLoader worker needs at least batch_size={layout.get('batch_size', '?')} good samples per pass "
            f"(num_workers={layout.get('num_workers', '?')}, world_size={layout.get('world_size', '?')})."
        )

    def __iter__(self):
        empty_passes = 0
        while True:
            produced = False
            totals = getattr(self.loader, "totals", None)
            read_before = totals.read if totals is not None else None
            for batch in self.loader:
                produced = True
                yield batch
            empty_passes = 0 if produced else empty_passes + 1
            read_something = totals is not None and totals.read > read_before
            # One pass that reads nothing is normal right after resuming at the end of an epoch; a pass that read
            # samples without making a batch, or a second empty pass, means the data cannot feed training.
            if empty_passes > 1 or (empty_passes and read_something):
                raise self.no_batch_error()
            if hasattr(self.loader, "set_epoch") and hasattr(self.loader, "epoch"):
                self.loader.set_epoch(self.loader.epoch + 1)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's post-step work right after the encoder optimizer step (before the lr scheduler step)."""

    def __init__(self, trainer: "NeuCLIPTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step()


class _StopOnSignal(TrainerCallback):
    """Saves a checkpoint and stops after the step in which any rank received SIGTERM (decided on every rank from
    the same all-reduced flag, so every rank saves and stops at the same step)."""

    def __init__(self, trainer: "NeuCLIPTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.stop_agreed:
            control.should_save = True
            control.should_training_stop = True
        return control


FSDP_REFUSAL = (
    "NeuCLIPTrainer does not run under the Trainer's FSDP (--fsdp / --fsdp_config, or `accelerate launch --use_fsdp`): "
    "accelerate's FSDP2 preparation shards every root parameter, and torch's fully_shard refuses CLIP's scalar "
    "logit_scale, while FSDP1 would flatten the normalizer that its own optimizer updates. Use --fsdp_encoders true "
    "instead (a plain multi-process launch, without --use_fsdp): FSDP2 shards the encoders and keeps the normalizer "
    "and logit_scale whole (docs/scale.md, FSDP)."
)
FSDP_NEEDS_PROCESSES = ("--fsdp_encoders true needs a distributed launch with at least 2 processes "
                        "(`accelerate launch --multi_gpu --num_processes N ...` or torchrun); this run has 1")
FSDP_REFUSES_LORA = ("--fsdp_encoders true does not shard a LoRA (PEFT) model: its adapters are small, train it "
                     "with DDP (leave --fsdp_encoders false)")
FSDP_REFUSES_BEST_MODEL = ("--fsdp_encoders true does not support --load_best_model_at_end: the zero-shot metrics "
                           "of NeuCLIPTrainer are logged by a callback, not by Trainer.evaluate")
FSDP_OPTIMIZER_DIR = "optimizer_fsdp"  # the encoder optimizer's sharded state (torch.distributed.checkpoint)


class NeuCLIPTrainer(HubPushMixin, Trainer):
    """Trainer for `NeuCLIPModel` with any objective (`model.config.objective`).

    Args:
        model: A `NeuCLIPModel` (optionally PEFT-wrapped).
        args: `NeuCLIPTrainingArguments`.
        train_loader_factory: Optional callable returning the training DataLoader (e.g. the streaming
            `StatefulDataLoader` of `neuclip_hf.data`); it is used as is (not re-sharded by Accelerate) and, if it
            has `state_dict()`, its position is saved in every checkpoint and restored on resume.
        **kwargs: Everything `Trainer` accepts (`train_dataset`, `eval_dataset`, `data_collator`,
            `processing_class`, `callbacks`, ...).
    """

    loss_is_scaled_for_ga = False  # the contrastive loss is a mean over the local anchors, never pre-scaled

    def __init__(self, model=None, args: NeuCLIPTrainingArguments | None = None, *,
                 train_loader_factory: Callable[[], Any] | None = None, **kwargs):
        if args is None:
            args = NeuCLIPTrainingArguments()
        if not isinstance(args, NeuCLIPTrainingArguments):
            raise TypeError(f"NeuCLIPTrainer needs NeuCLIPTrainingArguments, got {type(args).__name__}")
        if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
            raise ValueError(FSDP_REFUSAL)
        self._check_output_dir(args.output_dir)
        # Used by the Hub pushes (the repository is created inside Trainer.__init__ under --push_to_hub).
        self.hub_retry = RetryPolicy(args.hub_push_attempts, args.hub_push_backoff)
        # --hub_token lives on the trainer, not in the arguments: `Trainer` pickles the arguments into
        # training_args.bin (output_dir and every checkpoint) and TensorBoard / loggers record them.
        self._hub_token, args.hub_token = args.hub_token, None
        self.card_info: dict = {}
        super().__init__(model=model, args=args, **kwargs)
        if args.fsdp_encoders:
            self._shard_encoders()
        self._train_loader_factory = train_loader_factory
        self._train_loader = None
        self._resume_checkpoint: str | None = None
        self._defer_rng_restore = False
        self._pending_rng_checkpoint: str | None = None
        streaming = train_loader_factory is not None or (
            self.train_dataset is not None and not hasattr(self.train_dataset, "__len__")
        )
        if streaming and args.max_steps <= 0:
            raise ValueError("--max_steps must be set (> 0) when the training data is a stream without a length")
        if not streaming and self.train_dataset is not None:
            self._set_train_num_samples_from(len(self.train_dataset))
        self.temperature_lr: TemperatureThresholdLR | None = None
        self.normalizer_scheduler = None
        self._nonfinite_streak = 0
        self._nonfinite_total = 0
        self._queued_logs: list[dict[str, float]] = []
        # Data counts [read, skipped per reason]: this rank's loader totals already all-reduced, and the run's totals
        # over every rank.
        self._data_reported = torch.zeros(len(BAD_SAMPLE_REASONS) + 1, dtype=torch.float64)
        self._data_totals = torch.zeros(len(BAD_SAMPLE_REASONS) + 1, dtype=torch.float64)
        self._data_limits: tuple[float, int] | None = None  # (max_bad_fraction, min samples) of the stream
        self.stop_requested = False  # set by SIGTERM on this rank
        self.stop_agreed = False  # some rank received SIGTERM: every rank saves and stops after this step
        self._reset_metric_accumulators()
        self.add_callback(_AfterOptimizerStep(self))
        self.add_callback(_StopOnSignal(self))
        use_public_tensorboard(self)  # TensorBoard's args text and run folder without local paths or host name

    @staticmethod
    def _check_output_dir(output_dir: str) -> None:
        try:
            os.makedirs(output_dir, exist_ok=True)
            probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise ValueError(f"--output_dir={output_dir!r} cannot be written: {error}") from None

    # -- FSDP2 ----------------------------------------------------------------------------------------------------
    def _shard_encoders(self) -> None:
        """--fsdp_encoders: shard the (placed) model's encoders with FSDP2 before the Trainer prepares it.

        The Trainer then takes its path for a model that owns its sharding (`is_distributed_loading_by_transformers`,
        transformers 5.x): accelerate applies mixed precision only and wraps no DDP around the DTensor parameters.
        The replicated parameters' gradients are averaged in `training_step`, gradient clipping spans both kinds of
        parameters (`Trainer._mixed_mesh_grad_norm`), and saves write full weights plus the optimizer's sharded state.
        """
        if self.args.world_size < 2 or not is_distributed():
            raise ValueError(FSDP_NEEDS_PROCESSES)
        if is_peft_model(self.model):
            raise ValueError(FSDP_REFUSES_LORA)
        if self.args.load_best_model_at_end:
            raise ValueError(FSDP_REFUSES_BEST_MODEL)
        if not hasattr(self, "is_distributed_loading_by_transformers"):
            raise RuntimeError("--fsdp_encoders needs transformers' Trainer path for pre-sharded models "
                               "(`is_distributed_loading_by_transformers`, transformers 5.x)")
        broadcast_encoder_state_(self.model)  # every rank shards rank 0's weights, as DDP would train them
        shard_encoders_fsdp2(self.model)
        self.is_distributed_loading_by_transformers = True  # no DDP wrap, no device placement by accelerate
        self.model_wrapped = self.model

    @property
    def encoders_sharded(self) -> bool:
        return bool(self.args.fsdp_encoders) and is_fsdp_sharded(self.model)

    def _sync_replicated_trainable_parameters(self, model) -> None:
        # transformers' version would broadcast the normalizer's parameters and average their gradients in a hook
        # (also inside the normalizer's own update); here the encoder state was broadcast before sharding and the
        # replicated parameters' gradients are averaged in `training_step`.
        if not self.args.fsdp_encoders:
            super()._sync_replicated_trainable_parameters(model)

    # -- model parts ----------------------------------------------------------------------------------------------
    @property
    def core_model(self):
        """The NeuCLIPModel inside any DDP / PEFT / compile wrappers."""
        return unwrap_model(self.model)

    @property
    def normalizer(self) -> Normalizer:
        return find_normalizer(self.model)

    # -- epochs ---------------------------------------------------------------------------------------------------
    @property
    def train_num_samples(self) -> int | None:
        """n, the training-set size (one epoch = n samples seen): the model config's, filled from the data."""
        return self.core_model.config.train_num_samples

    @property
    def global_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.accelerator.num_processes

    def _set_train_num_samples_from(self, n: int) -> None:
        """A map-style dataset knows its size: it defines the epoch (a different configured value is replaced)."""
        configured = self.train_num_samples
        if configured is not None and configured != n:
            logger.warning(f"train_num_samples={configured} in the model config, but the training dataset has {n} "
                           f"samples: epochs count {n}")
        self.core_model.set_train_num_samples(n)

    def epochs_seen(self) -> float | None:
        """Samples seen so far / training-set size (true epochs); None when n is unknown."""
        n = self.train_num_samples
        return None if n is None else self.state.global_step * self.global_batch_size / n

    def check_epoch_length(self) -> None:
        """Refuse to start when an epoch-based schedule is on and the epoch length is unknown."""
        problem = self.normalizer.epoch_length_problem()
        if problem is None and self.args.rho_schedule and self.args.rho_schedule_unit == "epoch" \
                and self.train_num_samples is None:
            problem = RHO_EPOCHS_NEED_SIZE
        if problem is not None:
            raise ValueError(problem)

    # -- data -----------------------------------------------------------------------------------------------------
    def get_train_dataloader(self):
        if self._train_loader_factory is None:
            return super().get_train_dataloader()
        stream_loader = self._train_loader_factory()
        loader = EndlessLoader(stream_loader)
        self._train_loader = loader
        stream = getattr(stream_loader, "stream", None)
        if hasattr(stream_loader, "enforce_bad_limit") and stream is not None:
            stream_loader.enforce_bad_limit = False  # judged here on the totals of every rank (training_step)
            self._data_limits = (stream.max_bad_fraction, stream.bad_check_min_samples)
        if self._resume_checkpoint is not None and hasattr(stream_loader, "load_state_dict"):
            self._resume_data_position(stream_loader)
        return loader

    def _resume_data_position(self, loader) -> None:
        """Restore this rank's data stream position from the checkpoint being resumed; or, when the checkpoint was
        written with another layout (processes or workers) and `--resume_with_other_layout next_epoch` allows it,
        start the next data epoch (`StreamingDataLoader.start_after`).

        Every rank decides from the same files before any collective, so a refusal stops every rank with the same
        message rather than leaving some waiting for the others.

        Raises:
            ValueError: another global batch, or another layout with `--resume_with_other_layout refuse`.
        """
        checkpoint, (rank, _) = self._resume_checkpoint, rank_and_world_size()

        def saved_state(saved_rank: int) -> dict | None:
            path = os.path.join(checkpoint, DATA_STATE_NAME.format(rank=saved_rank))
            return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None

        own = saved_state(rank)
        saved = (own if own is not None else saved_state(0) or {}).get("layout")
        current = getattr(loader, "layout", None)
        if saved is None or current is None or all(
                saved[key] == current[key] for key in ("world_size", "num_workers", "batch_size")):
            if own is None:
                logger.warning(f"No data position for rank {rank} in {checkpoint}; the Trainer will skip the "
                               "consumed batches by re-reading them.")
                return
            loader.load_state_dict(own)  # the same layout (or a loader that keeps none): resumes exactly
            logger.info(f"Restored the data stream position of rank {rank} from {checkpoint}")
        else:
            saved_batch, batch = (layout["batch_size"] * layout["world_size"] for layout in (saved, current))
            if saved_batch != batch:
                raise ValueError(
                    f"{checkpoint} was written with a global batch of {saved_batch} ({describe_layout(saved)}) and "
                    f"this run has {batch} ({describe_layout(current)}). The objectives, the estimators and the "
                    "epoch schedules are defined by the global batch: keep it, with --per_device_train_batch_size = "
                    f"{saved_batch} / processes.")
            if self.args.resume_with_other_layout == "refuse":
                raise ValueError(
                    f"{checkpoint} was written by {describe_layout(saved)} and this run has "
                    f"{describe_layout(current)}: the saved data positions are per process and per worker, so they "
                    "cannot carry over. Resume with the same layout, or pass --resume_with_other_layout next_epoch "
                    "to keep everything else and start the next epoch of the data.")
            states = [saved_state(r) for r in range(saved["world_size"])]
            if any(state is None for state in states):
                missing = [DATA_STATE_NAME.format(rank=r) for r, state in enumerate(states) if state is None]
                raise ValueError(f"{checkpoint} lacks the data positions {', '.join(missing)} of its "
                                 f"{saved['world_size']} processes")
            epoch = loader.start_after(states, keep_totals=rank == 0)
            if rank == 0:
                logger.warning(f"Resuming with another data layout ({describe_layout(saved)} -> "
                               f"{describe_layout(current)}): every process starts data epoch {epoch}; the rest of "
                               f"epoch {epoch - 1} is not seen.")
        # The stream goes on from its restored position or new epoch: the Trainer must not also skip batches, and
        # the RNG state is restored at the first step, after the Trainer has created the data iterator (creating
        # it draws from the global RNG).
        self.args.ignore_data_skip = True
        self._defer_rng_restore = True

    # -- optimizers -----------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list[str]:
        # Published CLIP recipes: no weight decay on biases, norms, any 1-D tensor, nor the temperature.
        names = super().get_decay_parameter_names(model)
        shapes = dict(model.named_parameters())
        return [n for n in names if shapes[n].ndim >= 2 and not n.endswith("logit_scale")]

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if is_peft_model(opt_model):
            check_lora_model(opt_model)
        normalizer = find_normalizer(opt_model)
        if self.optimizer is None:
            estimator_params = {id(p) for p in normalizer.estimator_parameters()}
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[str, list] = {"decay": [], "no_decay": [], "temperature": []}
            for name, param in opt_model.named_parameters():
                if not param.requires_grad or id(param) in estimator_params:
                    continue  # the normalizer's own optimizer trains these
                key = "temperature" if name.endswith("logit_scale") else "decay" if name in decay else "no_decay"
                groups[key].append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            temperature_lr = self.args.temperature_learning_rate
            param_groups = [
                {"params": groups["decay"], "weight_decay": self.args.weight_decay, "group": "decay"},
                {"params": groups["no_decay"], "weight_decay": 0.0, "group": "no_decay"},
                {"params": groups["temperature"], "weight_decay": 0.0, "group": "temperature",
                 **({"lr": temperature_lr} if temperature_lr is not None else {})},
            ]
            self.optimizer = optimizer_cls([g for g in param_groups if g["params"]], **optimizer_kwargs)
        normalizer.ensure_optimizer(self.args.normalizer_learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.args.temperature_learning_rate is not None:
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(
                    f"--temperature_learning_rate needs a LambdaLR-based --lr_scheduler_type, got {type(scheduler)}"
                )
            groups = [g.get("group") for g in scheduler.optimizer.param_groups]
            if "temperature" in groups:
                index = groups.index("temperature")
                self.temperature_lr = TemperatureThresholdLR(
                    self.args.temperature_lr_threshold, self.args.temperature_lr_factor
                )
                # The temperature keeps its own constant learning rate (no warm-up, no cosine), as in FastCLIP.
                scheduler.lr_lambdas[index] = self.temperature_lr
                group = scheduler.optimizer.param_groups[index]
                group["lr"] = group["initial_lr"] * self.temperature_lr(scheduler.last_epoch)
        normalizer = self.normalizer
        if normalizer.optimizer is not None and self.normalizer_scheduler is None:
            self.normalizer_scheduler = get_scheduler(
                self.args.normalizer_lr_scheduler_type, optimizer=normalizer.optimizer,
                num_warmup_steps=0, num_training_steps=num_training_steps,
            )
        return scheduler

    # -- the training step ----------------------------------------------------------------------------------------
    def current_rho(self) -> float | None:
        """rho of the current step under `--rho_schedule` (None: the config's rho)."""
        schedule = self.args.rho_schedule
        if not schedule:
            return None
        return scheduled_value(schedule, self.args.rho_schedule_unit, self.state.global_step, self.state.max_steps,
                               self.global_batch_size, self.train_num_samples)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Evaluation loss: the objective with the current estimate (the normalizer is not updated)."""
        inputs = {k: v for k, v in inputs.items() if k != "data_stats"}
        outputs = model(**inputs, return_loss=True, rho=self.current_rho())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._defer_rng_restore and checkpoint is not None:
            self._pending_rng_checkpoint = checkpoint
            return
        super()._load_rng_state(checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._pending_rng_checkpoint is not None:
            self._defer_rng_restore = False
            self._load_rng_state(self._pending_rng_checkpoint)
            self._pending_rng_checkpoint = None
        model.train()
        self._accumulate_data_stats(inputs.pop("data_stats", None))
        inputs = self._prepare_inputs(inputs)
        rho = self.current_rho()
        with self.compute_loss_context_manager():
            outputs = model(**inputs, return_loss=True, update_normalizer=True, rho=rho)
        loss = outputs.loss
        # Every rank must take the same decisions, or DDP would deadlock: skip the step if ANY rank is non-finite,
        # stop when ANY rank got SIGTERM or the bad data of ALL ranks is over the limit (one all-reduce for all).
        finite = self._agree_on_step(torch.isfinite(loss.detach()))
        self.accelerator.backward(loss)  # also on a bad step, so every rank joins DDP's gradient reduction
        # FSDP2 reduce-scatters the sharded gradients in backward; the parameters it keeps whole (logit_scale, SigLIP's
        # bias) are averaged here, before the Trainer clips (no-op under DDP).
        average_replicated_gradients_(model)
        if not finite:
            model.zero_grad(set_to_none=True)  # no gradient -> AdamW leaves every weight and moment unchanged
            self._handle_nonfinite_step(outputs)
            return loss.detach()
        self._nonfinite_streak = 0
        self._accumulate_step_metrics(outputs, rho)
        return loss.detach()

    def _agree_on_step(self, finite: torch.Tensor) -> bool:
        """All-reduce (sum) [finite, SIGTERM received, data counts of this step] over ranks; returns whether every
        rank's loss is finite, sets `stop_agreed`, adds the counts to the run's totals and raises
        `DataQualityError` (on every rank at the same step) when they are over the limit."""
        world = self.accelerator.num_processes
        # This rank's new data counts: its loader's totals (resumed with the data position, so a resumed run counts
        # the samples before its checkpoint too) minus what earlier steps already reduced.
        totals = getattr(getattr(self._train_loader, "loader", None), "totals", None)
        current = self._data_reported.clone() if totals is None else torch.tensor(
            [totals.read] + [totals.bad[r] for r in BAD_SAMPLE_REASONS], dtype=torch.float64)
        flags = torch.tensor([float(finite.item()), float(self.stop_requested)], dtype=torch.float64)
        summed = torch.cat([flags, current - self._data_reported]).to(self.args.device)  # float64: exact counts
        if world > 1:
            summed = self.accelerator.reduce(summed, reduction="sum")
        summed = summed.cpu()
        self._data_reported = current
        self._data_totals += summed[2:]
        if summed[1].item() > 0 and not self.stop_agreed:
            self.stop_agreed = True
            logger.warning(f"SIGTERM received by {int(summed[1].item())} rank(s): saving a checkpoint after step "
                           f"{self.state.global_step + 1}, then stopping (exit code {PREEMPTED_EXIT_CODE})")
        self._check_bad_data()
        return bool(summed[0].item() == world)

    def _check_bad_data(self) -> None:
        if self._data_limits is None:
            return
        max_fraction, min_samples = self._data_limits
        read, skipped = float(self._data_totals[0]), float(self._data_totals[1:].sum())
        if over_bad_limit(read, skipped, max_fraction, min_samples):
            rank, world = rank_and_world_size()
            totals = getattr(getattr(self._train_loader, "loader", None), "totals", None)
            details = ", ".join(f"{reason}={int(n)}" for reason, n in zip(BAD_SAMPLE_REASONS, self._data_totals[1:])
                                if n)
            local = f"; on rank {rank}: {totals.describe()}" if totals is not None else ""
            raise DataQualityError(bad_data_message(read, skipped, max_fraction, f"all {world} rank(s)",
                                                    f"Skipped: {details}{local}"))

    def _handle_nonfinite_step(self, outputs) -> None:
        self._nonfinite_streak += 1
        self._nonfinite_total += 1
        parts = {"loss": outputs.loss, **(outputs.loss_components or {}), **(outputs.normalizer_diagnostics or {})}
        bad = sorted(name for name, value in parts.items()
                     if torch.is_tensor(value) and not torch.isfinite(value).all())
        if outputs.image_embeds is not None and not torch.isfinite(outputs.image_embeds).all():
            bad.append("image_embeds")
        if outputs.text_embeds is not None and not torch.isfinite(outputs.text_embeds).all():
            bad.append("text_embeds")
        step = self.state.global_step + 1
        logger.warning(f"step {step}: non-finite {', '.join(bad) or 'loss on another rank'}; step skipped")
        if self._nonfinite_streak >= self.args.max_consecutive_nonfinite:
            raise RuntimeError(
                f"training stopped at step {step}: {self._nonfinite_streak} consecutive steps with a non-finite "
                f"loss or estimate (last non-finite components: {', '.join(bad) or 'on another rank'}). Lower the "
                "learning rate, enable gradient clipping, or check the input data."
            )

    def after_optimizer_step(self) -> None:
        """Clamp the temperature, apply the temperature lr threshold, step the normalizer's scheduler."""
        core = self.core_model
        core.clamp_logit_scale_()
        if self.temperature_lr is not None:
            self.temperature_lr.observe(core.temperature)
        if self.normalizer_scheduler is not None:
            self.normalizer_scheduler.step()

    # -- logging --------------------------------------------------------------------------------------------------
    def _reset_metric_accumulators(self) -> None:
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._samples_seen = 0
        self._last_log_time = time.time()

    def _accumulate_step_metrics(self, outputs, rho: float | None) -> None:
        values = {f"loss_{k}": v for k, v in (outputs.loss_components or {}).items()}
        values["rho"] = torch.tensor(self.core_model.config.rho if rho is None else rho)
        values.update({f"normalizer_{k}": v for k, v in (outputs.normalizer_diagnostics or {}).items()})
        for name, value in values.items():
            value = value.detach().float().to(self.args.device)
            self._metric_sums[name] = self._metric_sums.get(name, 0) + value
        self._metric_steps += 1
        self._samples_seen += int(outputs.image_embeds.shape[0]) * self.accelerator.num_processes

    def _accumulate_data_stats(self, stats: dict | None) -> None:
        """Warn about the bad samples of one batch's `data_stats` (the counts are taken from the loader's totals)."""
        if not stats:
            return
        if stats.get("samples_skipped"):
            logger.warning(f"skipped {stats['samples_skipped']} bad sample(s); last: {stats.get('last_bad_reason')} "
                           f"in {stats.get('last_bad_shard')}")

    def _drain_metrics(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        names = sorted(self._metric_sums)
        # The estimator's event counts (e.g. NeuCLIP's restarts) are summed over the window, not averaged.
        counts = {f"normalizer_{name}" for name in type(self.normalizer).count_diagnostics}
        if names:
            stacked = torch.stack([self._metric_sums[n] for n in names]) / max(self._metric_steps, 1)
            if self.accelerator.num_processes > 1:
                stacked = self.accelerator.reduce(stacked, reduction="mean")
            for name, value in zip(names, stacked.tolist()):
                logs[name] = round(value * self._metric_steps) if name in counts else value
        data_counts = self._data_totals.tolist()  # running totals of the run, over every rank (see _agree_on_step)
        if data_counts[0] > 0:
            logs["data_samples_read"] = data_counts[0]
            for reason, count in zip(BAD_SAMPLE_REASONS, data_counts[1:]):
                if count:
                    logs[f"data_skipped_{reason}"] = count
        elapsed = max(time.time() - self._last_log_time, 1e-9)
        logs["samples_per_second"] = round(self._samples_seen / elapsed, 2)
        logs["temperature"] = self.core_model.temperature
        logs["nonfinite_steps_skipped"] = self._nonfinite_total
        self._reset_metric_accumulators()
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the lines logged during a step (by callbacks) kept after the step's training line.

        A callback's `on_step_end` runs before the Trainer logs the step (`_maybe_log_save_evaluate`). Logging there
        would run `on_log`, which clears `control.should_log`: the step's training line would be lost, and on a rank
        that logged alone the all-gather of that line would be skipped (a deadlock). Such lines are queued and
        logged right after the training line, where `Trainer` logs its own evaluation metrics. The logged `epoch` is
        the true one (samples seen / training-set size) when the size is known.
        """
        epochs = self.epochs_seen()
        if epochs is not None:  # true epochs (samples seen / n), not the Trainer's steps per loader length
            self.state.epoch = epochs
        if "loss" in logs and "train_runtime" not in logs:  # the periodic training line
            logs.update(self._drain_metrics())
            super().log(logs, start_time)
            queued, self._queued_logs = self._queued_logs, []
            for line in queued:
                super().log(line)
        elif self._training_line_due():
            self._queued_logs.append(logs)
        else:
            super().log(logs, start_time)

    def _training_line_due(self) -> bool:
        """Whether `_maybe_log_save_evaluate` is about to log this step's training line (its own condition)."""
        last_logged = getattr(self, "_globalstep_last_logged", self.state.global_step)
        return self.control.should_log and self.state.global_step > last_logged

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.encoders_sharded:
            # Every rank writes its shards of the encoder optimizer's state (torch.distributed.checkpoint); the
            # scheduler is the same on every rank: one copy.
            dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                     checkpoint_id=os.path.join(output_dir, FSDP_OPTIMIZER_DIR))
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        else:
            super()._save_optimizer_and_scheduler(output_dir)
        normalizer = self.normalizer
        if self.args.should_save and normalizer.optimizer is not None:
            state = {"optimizer": normalizer.optimizer.state_dict()}
            if self.normalizer_scheduler is not None:
                state["scheduler"] = self.normalizer_scheduler.state_dict()
            torch.save(state, os.path.join(output_dir, NORMALIZER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        sharded_dir = os.path.join(checkpoint, FSDP_OPTIMIZER_DIR) if checkpoint is not None else None
        if checkpoint is not None and (self.encoders_sharded or os.path.isdir(sharded_dir)):
            # A sharded run, or a DDP / one-process run resuming an FSDP2 checkpoint: the formats differ.
            self._load_encoder_optimizer_across_formats(checkpoint, sharded_dir)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        normalizer = self.normalizer
        path = os.path.join(checkpoint, NORMALIZER_STATE_NAME)
        if normalizer.optimizer is None:
            return
        if not os.path.isfile(path):
            logger.warning(f"{path} not found: the normalizer's optimizer starts from a fresh state")
            return
        location = checkpoint_map_location(self.args.device, self.args.world_size)
        state = torch.load(path, map_location=location, weights_only=True)
        normalizer.optimizer.load_state_dict(state["optimizer"])
        if self.normalizer_scheduler is not None and "scheduler" in state:
            self.normalizer_scheduler.load_state_dict(state["scheduler"])

    def _load_encoder_optimizer_across_formats(self, checkpoint: str, sharded_dir: str) -> None:
        """Load the encoder optimizer's state from either format into either kind of run: DCP shards
        (`optimizer_fsdp/`, written by an FSDP2 run) are re-sharded to this run's mesh or, for an unsharded run,
        read whole; a DDP / one-process `optimizer.pt` (keyed by parameter index) is keyed by parameter name and
        scattered into this run's shards."""
        full_file = os.path.join(checkpoint, OPTIMIZER_NAME)
        if os.path.isdir(sharded_dir):
            state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            # Each rank reads the chunks it holds; one process without a process group reads them all (torch warns
            # that it assumes so: intended here).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(state, checkpoint_id=sharded_dir, no_dist=not torch.distributed.is_initialized())
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            return
        if not os.path.isfile(full_file):
            raise ValueError(f"{checkpoint} has neither {OPTIMIZER_NAME} nor {FSDP_OPTIMIZER_DIR}/: the encoder "
                             "optimizer cannot be resumed from it")
        saved = torch.load(full_file, map_location="cpu", weights_only=True)
        named = optimizer_state_by_name(saved, self.optimizer, self.model)
        set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if state_dict is None and self.encoders_sharded:
            # Full weights, gathered on every rank (a collective) and written by rank 0: a normal checkpoint that
            # `from_pretrained` loads in one process.
            state_dict = full_model_state_dict(self.model)
        # nested in Trainer's bar: cursor-up escapes; a sharded model saved under its own class name and code
        with library_progress_bars(enabled=sys.stderr.isatty()), own_class(self.model):
            super()._save(output_dir, state_dict)
        if self.args.should_save and is_peft_model(self.model):  # a PEFT save holds only the adapter
            save_normalizer(self.model, output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if self.encoders_sharded:
            # The full weights a save wrote (`_save`); every rank reads them and keeps its own shards.
            load_full_model_state_dict(model, read_full_weights(resume_from_checkpoint))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if is_peft_model(model):  # the adapter was loaded above; the normalizer is stored next to it
            if not os.path.isfile(os.path.join(resume_from_checkpoint, NORMALIZER_WEIGHTS_NAME)):
                raise ValueError(f"{resume_from_checkpoint} has no {NORMALIZER_WEIGHTS_NAME}: it was not written by "
                                 "NeuCLIPTrainer, so the normalizer cannot be resumed")
            load_normalizer(model, resume_from_checkpoint, local_files_only=True)
            keep_normalizer_trainable(model)  # loading an adapter may re-freeze the base model

    def _save_checkpoint(self, model, trial) -> None:
        # Rotation (deleting old checkpoints) waits until the new checkpoint is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self._train_loader is not None and hasattr(self._train_loader, "state_dict"):
            rank, _ = rank_and_world_size()
            torch.save(self._train_loader.state_dict(), os.path.join(output_dir, DATA_STATE_NAME.format(rank=rank)))
        self.accelerator.wait_for_everyone()  # every rank has written its files
        if self.args.should_save:
            write_marker(output_dir, self.state.global_step, self.accelerator.num_processes)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                               use_mtime=False)
        self.accelerator.wait_for_everyone()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints (`True` picks the newest complete one); writes
        the model card (`output_dir/README.md`) at the end."""
        self.check_epoch_length()
        self.check_disk_space()
        self._resume_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if self._resume_checkpoint is not None and self.is_world_process_zero():
            # The path as the user gave it (or under the --output_dir they gave): no path is made absolute.
            step = marker_global_step(self._resume_checkpoint)
            logger.warning(f"Resuming from {self._resume_checkpoint} (step {step})")
        with self._sigterm_requests_a_stop():
            output = super().train(resume_from_checkpoint=self._resume_checkpoint, **kwargs)
        if self.stop_agreed:
            logger.warning(f"Stopped by SIGTERM: checkpoint-{self.state.global_step} in {self.args.output_dir} is "
                           "complete; continue with --resume_from_checkpoint true")
            raise SystemExit(PREEMPTED_EXIT_CODE)
        self.create_model_card()  # a local README.md at the end of every run, pushed or not (main process)
        return output

    @contextmanager
    def _sigterm_requests_a_stop(self):
        """While training, SIGTERM (a preempted job, or the launcher stopping the ranks) only sets `stop_requested`:
        the next step's all-reduce tells every rank, which then save a complete checkpoint and stop."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return

        def request_stop(signum, frame):
            self.stop_requested = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def checkpoint_bytes(self) -> int:
        """About what one save writes: the weights, plus AdamW's two moments when checkpoints are saved."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        weights += sum(b.numel() * b.element_size() for b in self.model.buffers())
        trainable = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad)
        saves_checkpoints = str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) != "no"
        return weights + (2 * trainable if saves_checkpoints else 0)

    def check_disk_space(self) -> None:
        """Refuse to start when `output_dir` cannot be written or has less free space than one save needs (a full
        disk would otherwise fail at the first checkpoint, after the work of the steps before it)."""
        self._check_output_dir(self.args.output_dir)
        needed = self.checkpoint_bytes()
        free = shutil.disk_usage(self.args.output_dir).free
        if free < needed:
            raise ValueError(f"--output_dir={self.args.output_dir!r} has {free / 2**20:.1f} MiB free, but one save "
                             f"of this model needs about {needed / 2**20:.1f} MiB (weights and optimizer state): "
                             "free some space or choose another --output_dir")



__all__ = ["EndlessLoader", "NeuCLIPTrainer", "NeuCLIPTrainingArguments", "TemperatureThresholdLR",
           "library_progress_bars"]
