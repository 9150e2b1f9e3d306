"""`accelerate launch` with 2 CPU processes (gloo): ranks agree, and equal a 1-process run on the same batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_launch_succeeded, launch_processes

pytestmark = pytest.mark.slow  # slow tier: multi-process runs

SCRIPT = Path(__file__).parent / "scripts" / "train_two_ranks.py"
OBJECTIVES = ["neuclip", "fastclip"]

pytestmark = pytest.mark.slow  # a 2-process run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    (out / "two").mkdir()
    done = launch_processes([SCRIPT, "--out", out / "two", "--objectives", *OBJECTIVES], timeout=600)
    assert_launch_succeeded(done)
    (out / "one").mkdir()
    one = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out / "one"), "--objectives", *OBJECTIVES],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    load = lambda p: torch.load(p, weights_only=False)  # noqa: E731  (our own test output)
    return tuple(load(out / run / f"result_rank{rank}.pt") for run, rank in (("two", 0), ("two", 1), ("one", 0)))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_process_training_equals_one_process(runs, objective):
    rank0, rank1, single = (r[objective] for r in runs)
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    for name, value in rank0["model"].items():
        # Identical on both ranks: encoders through DDP, normalizer state through identical updates.
        assert torch.equal(value, rank1["model"][name]), f"{name} differs between ranks"
        if value.is_floating_point():
            torch.testing.assert_close(value, single["model"][name], atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert torch.equal(value, single["model"][name]), name
    for key, state in rank0["normalizer_optimizer"].items():
        for field, tensor in state.items():
            assert torch.equal(tensor, rank1["normalizer_optimizer"][key][field])
    assert rank0["losses"] == pytest.approx(single["losses"], abs=1e-5)
