"""Run independent training jobs in parallel worker processes (one torch thread each), caching each result.

A job is a JSON-able dict; `run_jobs(fn, jobs, workers)` runs `fn(job)` for the jobs whose result is not cached in
`benchmarks/.cache/jobs/<name>/`, and returns all results in job order. Caching makes a rerun after an interruption
(or with one more configuration) cheap; `--fresh` in the scripts clears it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Callable

CACHE = Path(os.environ.get("NEUCLIP_BENCH_CACHE", Path(__file__).parent / ".cache")) / "jobs"


def job_key(job: dict) -> str:
    return hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_one(args):
    fn, job, path = args
    result = fn(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": job, "result": result}))
    os.replace(tmp, path)
    return result


def cached_results(jobs: list[dict], name: str) -> list[dict | None]:
    """The cached result of each job (None where it has not run), without running anything."""
    paths = [CACHE / name / f"{job_key(job)}.json" for job in jobs]
    return [json.loads(path.read_text())["result"] if path.exists() else None for path in paths]


def run_jobs(fn: Callable[[dict], dict], jobs: list[dict], name: str, workers: int = 2,
             fresh: bool = False) -> list[dict]:
    """Results of `fn(job)` for every job (from the cache when available), in order; `workers=0` runs inline."""
    folder = CACHE / name
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    paths = [folder / f"{job_key(job)}.json" for job in jobs]
    todo = [(fn, job, path) for job, path in zip(jobs, paths) if not path.exists()]
    print(f"[{name}] {len(jobs) - len(todo)} cached, {len(todo)} to run on {workers} worker(s)", flush=True)
    if todo and workers <= 0:  # inline, in this process (tests, debugging)
        for item in todo:
            _run_one(item)
    elif todo:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker) as pool:
            for done, _ in enumerate(pool.imap_unordered(_run_one, todo), 1):
                print(f"[{name}] {done}/{len(todo)} done", flush=True)
    return [json.loads(path.read_text())["result"] for path in paths]
