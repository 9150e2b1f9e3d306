"""Shared pieces of the benchmark scripts: timing, environment record, JSON / plot / README output."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"


def environment() -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median and spread of the wall time of `fn()` in seconds (synchronising CUDA when present)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2) + "\n")
    return path


def plot_path(name: str, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{name}.png"


def subplots(ncols: int, figsize: tuple[float, float]):
    """A row of `ncols` axes on a non-interactive backend: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, name: str, out_dir: Path | None = None) -> Path:
    """Write `results/<name>.png` (or into `out_dir`) and release the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = plot_path(name, out_dir)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme_section(name: str, body: str, readme: Path | None = None) -> None:
    """Replace (or append) the block between `<!-- name:start -->` and `<!-- name:end -->` in the README."""
    readme = Path(readme) if readme is not None else README
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def quick_or_full(quick: bool, quick_value, full_value):
    return quick_value if quick else full_value


def set_threads() -> None:
    """Use every core unless OMP_NUM_THREADS says otherwise (timings are reported with the thread count)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


# -- timing on a shared machine ---------------------------------------------------------------------------------------
def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot, summed over cores (Linux `/proc/stat`; else None)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def default_max_other_load() -> float:
    """Other processes' CPU use (in cores) under which a one-thread run still has a core to itself, with a margin:
    0.75 of a core on 2 cores."""
    return max((os.cpu_count() or 1) - 1.25, 0.25)


def run_alone(command: list[str], env: dict | None = None, max_other_load: float | None = None) -> tuple[dict, dict]:
    """Run a measurement subprocess that prints one JSON line last, and judge whether it had a core to itself.

    The CPU time that every process on the machine spent during the run, less the subprocess's own, is the load of
    others (in cores, averaged over the run). A run counts as valid when that stayed at or below `max_other_load`.

    Returns:
        The subprocess's JSON result, and `{"other_load_cores", "max_other_load", "valid", "wall_seconds"}`.
    """
    limit = default_max_other_load() if max_other_load is None else max_other_load
    busy_before, start = cpu_busy_seconds(), time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"measurement {command[2:]} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    busy_after = cpu_busy_seconds()
    other = None if busy_before is None or busy_after is None else max(busy_after - busy_before - own, 0.0) / wall
    load = {"other_load_cores": other, "max_other_load": limit, "valid": other is not None and other <= limit,
            "wall_seconds": wall}
    return json.loads(done.stdout.strip().splitlines()[-1]), load


def wait_for_quiet(max_other_load: float, timeout: float, window: float = 3.0) -> float | None:
    """Wait (up to `timeout` seconds) until the machine's load over `window` seconds is at most `max_other_load`
    cores; returns the last load seen (None where it cannot be read)."""
    deadline = time.monotonic() + timeout
    while True:
        before = cpu_busy_seconds()
        time.sleep(window)
        after = cpu_busy_seconds()
        if before is None or after is None:
            return None
        load = (after - before) / window
        if load <= max_other_load or time.monotonic() >= deadline:
            return load


def interleaved_rounds(names: list[str], run: Callable[[str, int], dict], rounds: int, max_rounds: int,
                       max_other_load: float, wait_seconds: float, label: str = "") -> tuple[list[dict], int]:
    """Rounds that run every name once, in an order rotated each round, until `rounds` of them are valid (or
    `max_rounds` were tried). A round is valid when every run in it had a core to itself (`run_alone`'s verdict).

    Args:
        names: What to measure.
        run: `run(name, round_index)` -> a result with `load` from `run_alone`.
        rounds, max_rounds: Valid rounds wanted; rounds tried at most.
        max_other_load: Passed to `wait_for_quiet` before each round.
        wait_seconds: How long to wait for a quiet machine before each round (0: do not wait).
        label: Printed with each round's verdict.

    Returns:
        Every round (`order`, `valid`, `runs`) and the number of valid ones.
    """
    done, valid = [], 0
    for index in range(max_rounds):
        if valid >= rounds:
            break
        if wait_seconds:
            wait_for_quiet(max_other_load, wait_seconds)
        order = names[index % len(names):] + names[:index % len(names)]
        runs = {name: run(name, index) for name in order}
        is_valid = all(result["load"]["valid"] for result in runs.values())
        valid += is_valid
        done.append({"order": order, "valid": is_valid, "runs": runs})
        loads = ", ".join(f"{result['load']['other_load_cores']:.2f}" for result in runs.values()
                          if result["load"]["other_load_cores"] is not None)
        print(f"{label} round {index + 1}: {'valid' if is_valid else 'contended'} (other load {loads})")
    return done, valid


def median_and_spread(values: list[float]) -> dict:
    """Median, min, max and interquartile range of a list of measurements (never only the best one)."""
    ordered = sorted(values)
    if not ordered:
        return {"median": None, "min": None, "max": None, "iqr": None, "n": 0}
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "iqr": [quartiles[0], quartiles[2]], "n": len(ordered)}


def summarise_profile(prof, top: int = 12) -> dict:
    """The top operators of a finished `torch.profiler.profile` by self CPU time, and the totals of the optimizer
    step and of the `normalizer_update` range (inclusive times), in milliseconds."""
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]

    def inclusive(prefix: str) -> float:
        return sum(e.cpu_time_total for e in events if e.key.startswith(prefix)) / 1e3

    return {"self_cpu_ms": total / 1e3, "optimizer_step_ms": inclusive("Optimizer.step"),
            "normalizer_update_ms": inclusive("normalizer_update"),
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ops]}
