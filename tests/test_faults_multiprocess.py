"""Faults of a 2-process gloo run under `accelerate launch` (issue 12): SIGTERM to every rank (a preempted job)
saves a complete checkpoint and exits 143; `kill -9` of one rank makes the launcher exit non-zero within a bounded
time naming the dead rank; `--resume_from_checkpoint true` then continues from the last complete checkpoint and ends
with the weights of an uninterrupted run. One chain of launches shares the work of every check."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_launch_succeeded, kill_tree, launch_processes, rank_processes, start_two_processes

from neuclip_hf import NeuCLIPModel
from neuclip_hf.checkpointing import MARKER, is_complete_checkpoint, last_complete_checkpoint
from neuclip_hf.default_data import prepare_default_data

pytestmark = pytest.mark.slow  # slow tier: multi-process runs

ROOT = Path(__file__).resolve().parents[1]
SLOW_TRAIN = ROOT / "tests" / "scripts" / "slow_train.py"
STEPS = 8
# A constant learning rate and no evaluation during training keep the runs short; the final weights depend on
# every step, so equal weights mean the resumed chain replayed exactly the uninterrupted run.
ARGS = [ROOT / "recipes" / "configs" / "default.yaml", "--max_steps", STEPS, "--save_steps", 2,
        "--per_device_train_batch_size", 16, "--eval_max_samples", 32, "--dataloader_num_workers", 0,
        "--logging_steps", 1, "--report_to", "none", "--disable_tqdm", "true", "--save_total_limit", 10,
        "--normalizer_diagnostics_steps", 0]
KILL_BOUND_S = 60  # the launcher notices a dead rank at once and stops the others (SIGTERM, SIGKILL after 30 s)


def env(slow_step_s: float = 0.0) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_STEP_S": str(slow_step_s)}


def wait_for(condition, timeout: float, launcher: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if launcher.poll() is not None or time.monotonic() > deadline:
            kill_tree(launcher)
            pytest.fail(f"{what} did not happen (launcher exit {launcher.poll()}):\n{log.read_text()[-6000:]}")
        time.sleep(0.2)


def wait_exit(launcher: subprocess.Popen, timeout: float, log: Path) -> tuple[int, float]:
    start = time.monotonic()
    try:
        code = launcher.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(launcher)
        pytest.fail(f"the launcher did not exit within {timeout:.0f} s (a hang):\n{log.read_text()[-6000:]}")
    return code, time.monotonic() - start


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if is_complete_checkpoint(p))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    prepare_default_data()
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    result = {"out": out}

    # 1. A run slowed to ~1 step/s; once checkpoint-2 is complete, SIGTERM every rank (a preempted job).
    log = tmp / "sigterm.log"
    launcher = start_two_processes([SLOW_TRAIN, *ARGS, "--output_dir", out], log, cwd=ROOT, env=env(1.0))
    wait_for(lambda: 2 in complete_steps(out) and len(rank_processes(launcher)) == 2, 400, launcher, log,
             "checkpoint-2")
    ranks = rank_processes(launcher)
    for process in ranks.values():
        process.send_signal(signal.SIGTERM)
    result["sigterm_exit"], _ = wait_exit(launcher, 120, log)
    result["sigterm_log"] = log.read_text()
    result["sigterm_steps"] = complete_steps(out)

    # 2. Resumed, slowed again; once a newer checkpoint is complete, kill -9 rank 1.
    log = tmp / "kill.log"
    resumed_at = max(result["sigterm_steps"])
    launcher = start_two_processes([SLOW_TRAIN, *ARGS, "--output_dir", out, "--resume_from_checkpoint", "true"], log,
                                   cwd=ROOT, env=env(1.0))
    wait_for(lambda: max(complete_steps(out)) > resumed_at and len(rank_processes(launcher)) == 2, 400, launcher, log,
             "a checkpoint after the resume")
    rank_processes(launcher)[1].kill()  # SIGKILL: no handler, no cleanup
    result["kill_exit"], result["kill_seconds"] = wait_exit(launcher, 300, log)
    result["kill_log"] = log.read_text()
    result["kill_steps"] = complete_steps(out)

    # 3. Resumed again, at full speed, to the end; 4. the same run uninterrupted.
    done = launch_processes([ROOT / "recipes" / "train.py", *ARGS, "--output_dir", out,
                                 "--resume_from_checkpoint", "true"], timeout=600, cwd=ROOT, env=env())
    result["final"] = done
    reference = launch_processes([ROOT / "recipes" / "train.py", *ARGS, "--output_dir", tmp / "reference"],
                                     timeout=600, cwd=ROOT, env=env())
    result["reference"] = reference
    result["reference_out"] = tmp / "reference"
    return result


def test_sigterm_saves_a_complete_checkpoint_and_exits_143(chain):
    log = chain["sigterm_log"]
    assert chain["sigterm_exit"] != 0, log[-3000:]
    steps = chain["sigterm_steps"]
    assert max(steps) > 2, log[-3000:]  # a checkpoint written on SIGTERM, after the step it arrived in
    last = max(steps)
    assert f"Stopped by SIGTERM: checkpoint-{last} in" in log
    assert re.search(r"exitcode\s*:\s*143", log), log[-3000:]  # the ranks' exit code, as the launcher reports it
    checkpoint = chain["out"] / f"checkpoint-{last}"
    assert json.loads((checkpoint / MARKER).read_text())["world_size"] == 2
    assert all((checkpoint / f"data_state_rank{r}.pt").is_file() for r in range(2))


def test_a_killed_rank_ends_the_launch_in_bounded_time_naming_it(chain):
    log = chain["kill_log"]
    assert chain["kill_exit"] != 0
    assert chain["kill_seconds"] < KILL_BOUND_S, (chain["kill_seconds"], log[-3000:])
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", log) and "Signal 9 (SIGKILL)" in log, log[-3000:]
    assert f"Resuming from {chain['out'] / 'checkpoint-'}" in log  # the second launch resumed from the SIGTERM one


def test_resume_after_the_faults_continues_from_the_last_complete_checkpoint_exactly(chain):
    done, reference = chain["final"], chain["reference"]
    assert_launch_succeeded(done)
    assert_launch_succeeded(reference)
    last = max(chain["kill_steps"])
    assert f"Resuming from {chain['out'] / f'checkpoint-{last}'} (step {last})" in done.stderr
    assert last_complete_checkpoint(chain["out"]).name == f"checkpoint-{STEPS}"
    resumed = NeuCLIPModel.from_pretrained(chain["out"]).state_dict()
    expected = NeuCLIPModel.from_pretrained(chain["reference_out"]).state_dict()
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(resumed[name], value), name
