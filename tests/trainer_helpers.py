"""Small datasets and trainer builders for the trainer tests."""

import torch
from helpers import tiny_batch, tiny_config
from torch.utils.data import Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from neuclip_hf import NeuCLIPModel
from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments


class PairDataset(Dataset):
    """`n` random tiny image-text pairs with sample ids (map-style)."""

    def __init__(self, n: int = 40, seed: int = 1):
        self.rows = tiny_batch(n, seed=seed)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def stateful_loader(dataset, batch_size: int = 8) -> StatefulDataLoader:
    """A resumable loader in a fixed order (like a stream without shuffle buffer).

    (torchdata's stateful RandomSampler does not restore the permutation of the epochs after a resumed one, so
    shuffled map-style data is not used for exact-resume tests.)
    """
    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True,
                              collate_fn=default_collate)


def make_trainer(objective: str, output_dir, max_steps: int, streaming: bool = False, model_kwargs=None,
                 dataset=None, lora: dict | None = None, **arg_overrides) -> NeuCLIPTrainer:
    """A NeuCLIPTrainer on a tiny model (LoRA-wrapped by `neuclip_hf.lora.apply_lora(**lora)` if given)."""
    torch.manual_seed(0)
    model = NeuCLIPModel(tiny_config(objective, **(model_kwargs or {})))
    if lora is not None:
        from neuclip_hf.lora import apply_lora

        model = apply_lora(model, **lora)
    values = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, logging_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, save_strategy="steps",
        save_steps=max_steps, warmup_steps=2, temperature_learning_rate=1e-3,
    )
    values.update(arg_overrides)
    args = NeuCLIPTrainingArguments(**values)
    dataset = dataset if dataset is not None else PairDataset()
    if streaming:
        return NeuCLIPTrainer(model=model, args=args, train_loader_factory=lambda: stateful_loader(dataset))
    return NeuCLIPTrainer(model=model, args=args, train_dataset=dataset)


def final_state(trainer) -> dict:
    """Every model tensor and the normalizer optimizer's per-parameter state of a trained trainer."""
    model = trainer.core_model
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = trainer.normalizer.optimizer
    if optimizer is not None:
        for i, param_state in enumerate(optimizer.state_dict()["state"].values()):
            for k, v in param_state.items():
                state[f"normalizer_optimizer.{i}.{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    return state


def assert_same_final_state(expected_trainer, actual_trainer) -> None:
    """Model tensors and normalizer optimizer state of two trainers agree (floats to 1e-5, the rest exactly)."""
    expected, actual = final_state(expected_trainer), final_state(actual_trainer)
    assert set(expected) == set(actual)
    for name, value in expected.items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(actual[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(torch.as_tensor(actual[name]), torch.as_tensor(value)), name
