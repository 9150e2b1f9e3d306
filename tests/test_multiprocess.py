"""recipes/train.py under `accelerate launch` with 2 gloo processes (slow tier): every run must finish.

- Logging, zero-shot evaluation, normalizer diagnostics and checkpointing on every step, the last step a logging
  step (main-process work and `trainer.log` from callbacks on the same step as the Trainer's own collectives).
- `--push_to_hub` against the loopback Hub (background pushes on every save, then the final push).
- A resume: N steps, then resumed to 2N from the step-N checkpoint, equals a straight 2N-step run (weights, the
  normalizer's state and optimizer state, the encoder optimizer, each rank's data position), and the resume names
  its checkpoint and step.

Every launch has a hard timeout that fails the test and kills every process of the run (`launch_processes`).
Runs use relative output directories inside a temporary working directory, as a user would type them.
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from fake_hub import hub_env, module_hub  # noqa: F401  (pytest fixture)
from helpers import assert_launch_succeeded, launch_processes
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from neuclip_hf.checkpointing import is_complete_checkpoint
from neuclip_hf.default_data import prepare_default_data
from neuclip_hf.model_card import CLASSIFICATION_METRICS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train.py"
CONFIG = ROOT / "recipes" / "configs" / "default.yaml"
TIMEOUT = 180  # seconds per launch; one takes ~10 s on 2 idle cores, so only a hang reaches it
N = 2  # steps before the resume; the straight run takes 2N
# Tiny and schedule-free (a constant learning rate: an N-step run must be a prefix of the 2N-step one).
TINY = ["--per_device_train_batch_size", "8", "--eval_max_samples", "32", "--zero_shot_templates", "simple",
        "--eval_batch_size", "32", "--dataloader_num_workers", "0", "--lr_scheduler_type", "constant",
        "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true"]
EVERY_STEP = ["--logging_steps", "1", "--save_steps", "1", "--zero_shot_eval_steps", "1",
              "--normalizer_diagnostics_steps", "1", "--normalizer_diagnostics_pool", "64"]
HUB_TOKEN = "hf_SENTINELtokenNEVERtoLEAK0123456789"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def train(workdir: Path, output_dir: str, max_steps: int, *extra: str, env: dict | None = None):
    """One 2-process recipe run in `workdir`; asserts it finished with exit code 0 on 2 processes."""
    env = env if env is not None else {**os.environ, "PYTHONPATH": str(ROOT)}
    done = launch_processes([RECIPE, CONFIG, "--output_dir", output_dir, "--max_steps", str(max_steps), *TINY,
                                 *extra], TIMEOUT, cwd=workdir, env=env)
    assert_launch_succeeded(done)
    assert "zero-shot top-1 accuracy" in done.stdout and "model and processor saved to" in done.stdout
    summary = json.loads((workdir / output_dir / "eval_results.json").read_text())
    assert summary["global_step"] == max_steps
    marker = json.loads((workdir / output_dir / f"checkpoint-{max_steps}" / "neuclip_checkpoint.json").read_text())
    assert marker["world_size"] == 2
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    prepare_default_data()  # the real cache (scripts/setup.sh prepares it; first use otherwise)
    return tmp_path_factory.mktemp("two_processes")


@pytest.fixture(scope="module")
def straight(workdir):
    """2N steps in one go, everything on every step."""
    return train(workdir, "straight", 2 * N, *EVERY_STEP)


@pytest.fixture(scope="module")
def resumed(workdir, straight):
    """N steps, then a second launch resumed to 2N from the step-N checkpoint."""
    train(workdir, "first", N, *EVERY_STEP)
    return train(workdir, "resumed", 2 * N, *EVERY_STEP, "--resume_from_checkpoint", f"first/checkpoint-{N}")


def test_logging_evaluation_diagnostics_and_checkpoints_on_every_step(workdir, straight):
    run = workdir / "straight"
    history = json.loads((run / f"checkpoint-{2 * N}" / "trainer_state.json").read_text())["log_history"]
    for step in range(1, 2 * N + 1):
        lines = [entry for entry in history if entry["step"] == step]
        kinds = [("train" if "loss" in e else "eval" if "eval_acc1" in e else "diagnostics" if "normalizer_mse" in e
                  else "other") for e in lines]
        # The Trainer's order: the training line first, then what the callbacks measured at that step.
        assert kinds == ["train", "eval", "diagnostics"], (step, kinds)
        assert math.isfinite(lines[0]["loss"]) and lines[1]["eval_num_samples"] == 32
        assert lines[2]["normalizer_mse"] >= 0
    for step in (2 * N - 1, 2 * N):  # save_total_limit 2 keeps the last two, each complete, with both positions
        checkpoint = run / f"checkpoint-{step}"
        assert is_complete_checkpoint(checkpoint)
        layouts = [torch.load(checkpoint / f"data_state_rank{r}.pt", weights_only=True)["layout"] for r in range(2)]
        assert [(layout["rank"], layout["world_size"]) for layout in layouts] == [(0, 2), (1, 2)]


def test_push_to_hub_from_two_processes(workdir, module_hub):  # noqa: F811
    env = hub_env(module_hub, workdir / "hf_home_push", token=HUB_TOKEN)
    train(workdir, "pushed", 2, "--logging_steps", "1", "--save_steps", "1", "--zero_shot_eval_steps", "1",
          "--push_to_hub", "true", "--hub_model_id", "user/two-processes", env=env)
    repo = module_hub.root / "user" / "two-processes"
    files = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert not any(HUB_TOKEN.encode() in (repo / name).read_bytes() for name in files)
    # The final push uploaded the trained weights and a card with the last evaluation.
    local = load_file(workdir / "pushed" / "model.safetensors")
    remote = load_file(repo / "model.safetensors")
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    final_acc1 = json.loads((workdir / "pushed" / "eval_results.json").read_text())["eval"]["acc1"]
    metric_type = CLASSIFICATION_METRICS["acc1"][0]
    card = ModelCard.load(repo / "README.md")
    assert [r.metric_value for r in card.data.eval_results if r.metric_type == metric_type] == [round(final_acc1, 6)]
    assert len(module_hub.commits["user/two-processes"]) >= 2  # at least one background push, then the final one


def test_resume_in_two_processes_equals_straight_run(workdir, straight, resumed):
    # The resume names the checkpoint as the user gave it, and its step, once (main process).
    lines = [line for line in resumed.stderr.splitlines() if "Resuming from" in line]
    assert len(lines) == 1 and lines[0].endswith(f"Resuming from first/checkpoint-{N} (step {N})"), lines
    assert str(workdir) not in lines[0]
    expected, actual = workdir / "straight", workdir / "resumed"
    # Final weights, the normalizer's parameters and buffers included.
    assert_close_tree(load_file(actual / "model.safetensors"), load_file(expected / "model.safetensors"), "model")
    last = f"checkpoint-{2 * N}"
    for name in ("normalizer_optimizer.pt", "optimizer.pt", "data_state_rank0.pt", "data_state_rank1.pt"):
        assert_close_tree(torch.load(actual / last / name, weights_only=True),
                          torch.load(expected / last / name, weights_only=True), name)
    state = json.loads((actual / last / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * N and [e["step"] for e in state["log_history"] if "loss" in e][-1] == 2 * N


def assert_close_tree(actual, expected, where: str) -> None:
    """Nested dicts / lists: floating tensors equal to 1e-6, everything else exactly."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_close_tree(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_tree(a, e, f"{where}[{i}]")
    elif torch.is_tensor(expected) and expected.is_floating_point():
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=where)
    elif torch.is_tensor(expected):
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where
