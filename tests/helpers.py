"""Tiny models and batches shared by the tests (import after conftest has made the Hub offline), and the 2-process
`accelerate launch` runner of the multi-process tests."""

import os
import re
import socket
import subprocess
import sys

import psutil
import pytest
import torch

from neuclip_hf import NeuCLIPConfig

# A 100-token vocabulary with bos 0 / eos 1 (pad = eos): CLIP pools at the first eos, so ids must agree.
TINY_TEXT = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
)
OBJECTIVES = ("clip", "siglip", "fastclip", "amorlip", "neuclip")


def tiny_config(objective: str = "neuclip", **overrides) -> NeuCLIPConfig:
    """A ~75k-parameter NeuCLIP config (16-d embeddings)."""
    values = dict(
        text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=16, objective=objective,
        fastclip_dataset_size=64, neuclip_num_prototypes=32, amorlip_epoch_steps=4,
    )
    values.update(overrides)
    return NeuCLIPConfig(**values)


def tiny_batch(batch_size: int = 8, seq_len: int = 10, image_size: int = 16, seed: int = 0) -> dict:
    """Random token ids ending in eos, random pixels and sample ids."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 100, (batch_size, seq_len), generator=generator)
    input_ids[:, -1] = 1
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "sample_ids": torch.arange(batch_size)}


def unit_vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def free_port() -> int:
    """A free TCP port on the loopback interface (for process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch(num_processes: int) -> list[str]:
    """`python` arguments of `accelerate launch` with `num_processes` CPU processes over gloo (`--cpu
    --num_processes 2` would silently run one), on a free port."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def start_two_processes(script_and_args: list, log_path, cwd=None, env: dict | None = None) -> subprocess.Popen:
    """Start `accelerate launch` with 2 CPU processes, its stdout and stderr going to `log_path`; returns at once
    (see `launch_processes`; the caller waits with a timeout and calls `kill_tree` on failure)."""
    env = {**(os.environ if env is None else env), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *cpu_launch(2), *map(str, script_and_args)]
    with open(log_path, "w") as log:  # a file, not a pipe: a long run's output never blocks it
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The rank processes below an `accelerate launch` (by their RANK variable); empty until they have started."""
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        try:
            parent_rank = child.parent().environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
        if rank is not None and parent_rank is None:  # the top process of the rank, not one of its workers
            ranks[int(rank)] = child
    return ranks


def kill_tree(launcher: subprocess.Popen) -> None:
    """Kill the launcher and every process below it."""
    try:
        root = psutil.Process(launcher.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended in the meantime
        tree = []
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def launch_processes(script_and_args: list, timeout: float, cwd=None, env: dict | None = None,
                     num_processes: int = 2) -> subprocess.CompletedProcess:
    """Run `accelerate launch` with `num_processes` CPU processes; a run that outlives `timeout` seconds FAILS the
    test.

    A hang (ranks waiting in different collectives) is the failure this guards against: on timeout the launcher and
    every process below it are killed (the workers run in their own sessions, so killing the launcher's process
    group would leave them behind), and the test fails with the captured output. The exit code is the caller's
    to assert.

    Args:
        script_and_args: The script and its arguments.
        timeout: Seconds before the run counts as hung.
        cwd: Working directory of the launch.
        env: The environment (default: this process's); `ACCELERATE_USE_CPU` and `OMP_NUM_THREADS` are set on it.
        num_processes: Processes (2: this machine has 2 cores; 4 for a resume at another world size).
    """
    # PYTHONFAULTHANDLER: a rank killed by a signal (an abort in C++) prints every thread's Python stack first.
    env = {**(os.environ if env is None else env), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, *cpu_launch(num_processes), *map(str, script_and_args)]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"`accelerate launch` did not finish within {timeout:.0f} s and was killed (a hang: ranks in "
                    f"different collectives?)\n{launch_report(stdout, stderr)}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


FIRST_FAILURE = re.compile(r"Fatal Python error|terminate called|Traceback \(most recent call last\)")


def launch_report(stdout: str, stderr: str) -> str:
    """What a failed launch printed: the ends of stdout and stderr and, before them, stderr from its first failure
    on (a traceback, a fatal signal or a C++ terminate), which the other ranks' later tracebacks would push out of a
    plain tail."""
    first = FIRST_FAILURE.search(stderr)
    head = stderr[max(0, first.start() - 200): first.start() + 5000] if first else ""
    return (f"--- stdout (end) ---\n{stdout[-2000:]}\n--- stderr from the first failure ---\n{head}\n"
            f"--- stderr (end) ---\n{stderr[-4000:]}")


def assert_launch_succeeded(done: subprocess.CompletedProcess) -> None:
    """Fail with `launch_report` unless the launch exited with 0."""
    assert done.returncode == 0, f"exit code {done.returncode}\n{launch_report(done.stdout, done.stderr)}"


def spawn_with_timeout(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` whose run FAILS the test after `timeout` seconds (a hang:
    ranks waiting in different collectives); every worker is killed first. A worker's exception is re-raised."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(30)
            pytest.fail(f"{nprocs} spawned processes did not finish within {timeout:.0f} s and were killed (a hang: "
                        "ranks in different collectives?)")
