"""The Hub side of `NeuCLIPTrainer`: Trainer's push conventions with neuclip_hf's card and safety rules.

`--push_to_hub --hub_model_id user/name` works as with any `transformers.Trainer` (repository created when the
trainer is built, `hub_strategy="every_save"` pushes the saved model in the background, `trainer.push_to_hub()` at
the end), with these differences:
- the card is neuclip_hf's (`model_card.build_model_card`): training setup, estimator hyper-parameters, the
  `ZeroShotEvalCallback` results as `model-index`, intended uses, citations;
- only model files are uploaded (`hub.upload_files`: safetensors, JSON, model code, tokenizer, card); the pickled
  `training_args.bin` and checkpoint folders with pickled optimizer states never are, so the `checkpoint` and
  `all_checkpoints` hub strategies are refused;
- Hub calls are retried with backoff (`--hub_push_attempts`, `--hub_push_backoff`); the final push raises
  `hub.HubPushError` when it still fails, while a failed background push only logs a warning. The local files
  are never modified by a push;
- in a distributed run every rank makes the same collective calls (docs/architecture.md): the repository is created
  on the main process and its id handed to every rank, and `push_to_hub` returns on every rank once the main
  process has uploaded (or, not blocking, started the upload). A background push (`every_save`) is main-process
  work inside the checkpoint save, which ends with a barrier of every rank (`NeuCLIPTrainer._save_checkpoint`).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from huggingface_hub import get_token
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging
from transformers.utils.hub import PushInProgress, hf_api

from .distributed import main_process_result
from .evaluation import ZeroShotEvalCallback
from .hub import HubPushError, RetryPolicy, call_with_retry, upload_folder
from .lora import lora_summary
from .model_card import DEFAULT_LICENSE, TrainingSummary, build_model_card, public_text

logger = logging.get_logger(__name__)


class _PublicArguments:
    """Training arguments as TensorBoard's `args` text shows them: local absolute paths cut to their last part."""

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name)

    def to_json_string(self) -> str:
        return public_text(self._args.to_json_string())


class PublicTensorBoardCallback(TensorBoardCallback):
    """transformers' `TensorBoardCallback`, writing what `--hub_push_tensorboard` may push: the `args` text without
    local absolute paths (`public_text`) and the run folder named `runs/<time>` without the host name."""

    def on_train_begin(self, args, state, control, **kwargs):
        if self.logging_dir is None and state.is_world_process_zero and not state.is_hyper_param_search:
            self.logging_dir = os.path.join(args.output_dir, "runs", datetime.now().strftime("%b%d_%H-%M-%S"))
        super().on_train_begin(_PublicArguments(args), state, control, **kwargs)


def use_public_tensorboard(trainer) -> None:
    """Swap the Trainer's `TensorBoardCallback` (added by `report_to`) for `PublicTensorBoardCallback`."""
    if any(type(callback) is TensorBoardCallback for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(PublicTensorBoardCallback)

# Files a background push copies from the checkpoint into output_dir before uploading it (the normalizer files exist
# only for LoRA runs; the model code files are rewritten by save_pretrained and copied too).
_CHECKPOINT_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
                           "adapter_model.safetensors", "normalizer.safetensors", "normalizer_config.json")


class HubPushMixin:
    """Mixed into `NeuCLIPTrainer` (before `Trainer`). Set `card_info` (keyword arguments of `create_model_card`,
    e.g. `training_data`, `finetuned_from`) before training so that background pushes carry them too."""

    hub_retry: RetryPolicy
    card_info: dict

    _hub_token: str | None = None  # --hub_token, taken out of the arguments by NeuCLIPTrainer (never pickled)

    def _secret(self, token: str | None) -> str | None:
        return token or self._hub_token or get_token()

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the repository (retried on transient failures; `HubPushError` if it cannot be created).

        Called on every rank: the main process creates it and every rank gets its id, so that later decisions
        (`push_to_hub` creates the repository when `hub_model_id` is None) are the same on every rank.
        """
        repo_name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self._hub_token
        private = private if private is not None else self.args.hub_private_repo

        def create() -> str:
            url = call_with_retry(lambda: hf_api().create_repo(repo_name, token=token, private=private, exist_ok=True),
                                  "repository creation", repo_name, self.hub_retry, secret=self._secret(token))
            return url.repo_id

        self.hub_model_id = main_process_result(create, self.is_world_process_zero())
        self.push_in_progress = None

    def create_model_card(self, training_data: str | None = None, finetuned_from: str | None = None,
                          license: str | None = None, tags: str | list[str] | None = None,
                          model_name: str | None = None, language: str | list[str] | None = None,
                          eval_dataset_id: str | None = None, dataset: str | list[str] | None = None, **unused):
        """Write neuclip_hf's card to `output_dir/README.md` (main process) and return it.

        Args:
            training_data: What the model was trained on (`dataset`, Trainer's name for it, is accepted too).
            finetuned_from: The checkpoint training started from.
            license: License of the weights (default: apache-2.0).
            tags: Extra tags.
            model_name: Card title (default: the repository name).
            language: Language of the texts (default: en).
            eval_dataset_id: Hub id of the evaluation data, if any.
            dataset: Alias of `training_data` (Trainer's keyword).
            **unused: Other `Trainer.create_model_card` keywords (`tasks`, `dataset_tags`, ...), ignored.
        """
        if not self.is_world_process_zero():
            return None
        info = {**self.card_info, **{k: v for k, v in dict(
            training_data=training_data or (dataset if isinstance(dataset, str) else None),
            finetuned_from=finetuned_from, license=license, tags=[tags] if isinstance(tags, str) else tags,
            model_name=model_name, language=language, eval_dataset_id=eval_dataset_id).items() if v is not None}}
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, ZeroShotEvalCallback)), None)
        # Data and checkpoint names as the card shows them: local paths by their last component (no user name,
        # no machine layout leaves the machine).
        summary = TrainingSummary.from_trainer(self, public_text(info.get("training_data")),
                                               public_text(info.get("finetuned_from")), lora=lora_summary(self.model))
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        card = build_model_card(
            self.model, repo_id=repo_id, training=summary,
            eval_results={**callback.results, "metric_for_best": callback.metric_for_best} if callback else None,
            eval_dataset=public_text(callback.evaluator.data.description) if callback else None,
            eval_max_samples=callback.evaluator.max_samples if callback else None,
            eval_dataset_id=info.get("eval_dataset_id"), license=info.get("license") or DEFAULT_LICENSE,
            tags=info.get("tags"), language=info.get("language", "en"), model_name=info.get("model_name"),
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))
        return card

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save the model to `output_dir`, write the card and upload the model files (Trainer's conventions).

        Args:
            commit_message: The commit message.
            blocking: Wait for the upload (False: returns a `Future`).
            token: A write token (default: `--hub_token`, the logged-in token or `HF_TOKEN`).
            revision: Branch (default: `--hub_revision`).
            private: Create the repository private.
            **kwargs: For `create_model_card` (`training_data`, `finetuned_from`, `license`, `tags`, ...).

        Returns:
            The `CommitInfo` (a `Future` of it when not blocking); None on processes other than the main one, which
            wait for the main process's upload (or its start, when not blocking).

        Raises:
            hub.HubPushError: the upload failed after its retries; `output_dir` holds the complete saved model.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self._hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)  # every rank: the save may need collectives

        def push():
            return upload_folder(self.args.output_dir, self.hub_model_id, token=token,
                                 revision=revision if revision is not None else self.args.hub_revision,
                                 commit_message=commit_message or "End of training", retry=self.hub_retry,
                                 api=hf_api(), create_repo=False,
                                 include_tensorboard=self.args.hub_push_tensorboard)

        result = None
        if self.is_world_process_zero():
            self.create_model_card(**kwargs)
            self._finish_current_push()  # an earlier background push must not race with this one
            result = push() if blocking else hf_api().run_as_future(push)
        self.accelerator.wait_for_everyone()  # the main process's card and upload sit between matching barriers
        return result

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """`hub_strategy="every_save"`: push the model files of the new checkpoint in the background."""
        if not self.is_world_process_zero() or self.args.hub_strategy == "end":
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return  # the previous push is still running: skip this one, as Trainer does
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        for name in _CHECKPOINT_MODEL_FILES + tuple(p.name for p in Path(checkpoint_folder).glob("*.py")):
            source = Path(checkpoint_folder, name)
            if source.is_file():
                Path(output_dir, name).write_bytes(source.read_bytes())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        self.create_model_card()
        message = f"Training in progress, step {self.state.global_step}"

        def push():
            try:
                return upload_folder(output_dir, self.hub_model_id, token=self._hub_token,
                                     revision=self.args.hub_revision, commit_message=message, retry=self.hub_retry,
                                     api=hf_api(), create_repo=False,
                                     include_tensorboard=self.args.hub_push_tensorboard)
            except (HubPushError, ValueError) as error:  # training goes on; the final push raises
                logger.warning(f"background push skipped: {error}")
                return None

        job = hf_api().run_as_future(push)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)


__all__ = ["HubPushMixin"]
