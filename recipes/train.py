"""CLIP pretraining with a normalizer estimator (NeuCLIP, AmorLIP, FastCLIP) or a baseline (CLIP, SigLIP).

    python recipes/train.py                                     # embedded Fashion-MNIST data, tiny model, CPU
    python recipes/train.py recipes/configs/default.yaml --objective fastclip --max_steps 300
    accelerate launch --config_file accelerate_config.yaml recipes/train.py recipes/configs/cc12m_vit_b32.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 recipes/train.py

LoRA: `--lora_r 16 [--lora_alpha 32 --lora_target_modules q_proj,v_proj --lora_dropout 0.05]`; Hub: `--push_to_hub
--hub_model_id user/name` (model files and a model card; see neuclip_hf.hub).

Every field of ModelArguments, LoraArguments, DataArguments, EvalArguments and NeuCLIPTrainingArguments is a flag;
a YAML/JSON file (anywhere on the command line) gives values the flags override. Without a file,
recipes/configs/default.yaml is used: `python recipes/train.py --max_steps 100` is the default run with 100 steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging

from neuclip_hf.arguments import (
    DataArguments,
    EvalArguments,
    LoraArguments,
    ModelArguments,
    NeuCLIPTrainingArguments,
    parse_arguments,
)
from neuclip_hf.data import build_train_dataloader, count_samples, find_train_num_samples, open_eval_data
from neuclip_hf.diagnostics import NormalizerDiagnosticsCallback, pool_from_data
from neuclip_hf.distributed import end_process_group, rank_and_world_size
from neuclip_hf.evaluation import ZeroShotEvalCallback, ZeroShotEvaluator, format_metrics_table
from neuclip_hf.model_setup import build_model, build_processor, maybe_apply_lora
from neuclip_hf.normalizers import NormalizerEstimator, normalizer_class
from neuclip_hf.trainer import NeuCLIPTrainer

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
logger = logging.get_logger("neuclip_hf.recipes.train")


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments: dataclass defaults < YAML/JSON file < command line.
    model_args, lora_args, data_args, eval_args, training_args = parse_arguments(
        (ModelArguments, LoraArguments, DataArguments, EvalArguments, NeuCLIPTrainingArguments),
        sys.argv[1:] if argv is None else argv, default_config=DEFAULT_CONFIG,
    )
    if training_args.max_steps <= 0:
        raise ValueError("--max_steps must be set (> 0): the training data is streamed and has no length")
    set_seed(training_args.seed)

    # 2. Model and processor. The training-set size n defines the epoch (FastCLIP's gamma and table, AmorLIP's
    #    epochs, --rho_schedule_unit epoch, the logged epoch): --train_num_samples, else counted from file metadata.
    #    A method whose state is sized by the data (FastCLIP's per-sample table) cannot run without it.
    method = normalizer_class(model_args.objective)
    n = count_samples(data_args) if method.needs_num_samples else find_train_num_samples(data_args)
    extra = {"train_num_samples": n, **method.config_from_data(n)} if n is not None else {}
    model = build_model(model_args, **extra)  # --init_from / --init_normalizer_from are applied here
    processor = build_processor(model_args, model)
    model = maybe_apply_lora(model, lora_args)  # --lora_r > 0: adapters on both towers, normalizer in full

    # 3. Streaming input: each rank reads its own shards, position saved in every checkpoint.
    def train_loader():
        rank, world_size = rank_and_world_size()
        return build_train_dataloader(
            data_args, processor, batch_size=training_args.per_device_train_batch_size,
            num_workers=training_args.dataloader_num_workers, rank=rank, world_size=world_size,
            seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        )

    # 4. Held-out zero-shot classification / retrieval, during training and at the end.
    eval_data = open_eval_data(data_args.eval_data, split=data_args.eval_split,
                               config_name=data_args.dataset_config_name)
    evaluator = ZeroShotEvaluator(processor, eval_data, templates=eval_args.zero_shot_templates,
                                  batch_size=eval_args.eval_batch_size, max_samples=eval_args.eval_max_samples,
                                  cache_inputs=True)
    eval_callback = ZeroShotEvalCallback(evaluator, eval_steps=eval_args.zero_shot_eval_steps)
    trainer = NeuCLIPTrainer(model=model, args=training_args, processing_class=processor,
                             train_loader_factory=train_loader)
    eval_callback.attach(trainer)
    if eval_args.normalizer_diagnostics_steps > 0 and isinstance(trainer.normalizer, NormalizerEstimator):
        # Live check of the estimator against the exact normalizer of a pool of training samples.
        pool = pool_from_data(data_args, processor, eval_args.normalizer_diagnostics_pool)
        NormalizerDiagnosticsCallback(pool, every_steps=eval_args.normalizer_diagnostics_steps).attach(trainer)
    # What the model card says about the run (also used by the background pushes of --hub_strategy every_save).
    trainer.card_info.update(training_data=data_args.train_data or "the embedded Fashion-MNIST captions",
                             finetuned_from=model_args.init_from)

    # 5. Train, save (model + processor; LoRA: adapter + normalizer), report, push (the model files and a card).
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = eval_callback.results["latest"] or {}
    results = {"objective": model_args.objective, "global_step": trainer.state.global_step, "eval": metrics}
    summary = {"output_dir": os.path.abspath(training_args.output_dir), **results}
    if trainer.is_world_process_zero():  # pushed with the model: no local path in it
        Path(training_args.output_dir, "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(format_metrics_table(metrics))
        print(f"\nzero-shot top-1 accuracy on the held-out split: {metrics.get('acc1', float('nan')):.2%}")
    if training_args.push_to_hub:
        trainer.push_to_hub()  # saves the model first; raises HubPushError (files kept) if the upload fails
    else:
        trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        print(f"model and processor saved to {training_args.output_dir}")
    return summary


if __name__ == "__main__":
    main()
    end_process_group()
