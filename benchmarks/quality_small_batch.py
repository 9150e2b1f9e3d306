"""Which objective trains the best model at a small batch, with every baseline run as its authors run it and tuned
with the same budget?

Protocol (what a careful reviewer expects of a baseline comparison):

1. `sweep`: every method gets the same tuning budget, 9 settings over its own knobs (`SETTINGS`: clip its temperature
   learning rate and init, SigLIP its bias and temperature init, FastCLIP gamma_min, decay epochs, eps, stepped /
   continuous gamma and its temperature gradient, AmorLIP its beta ramp, c_pos and epoch definition, NeuCLIP its
   prototype learning rate and restart period T_r), each trained once (seed 0) for the main run's length on
   mosaic-tones and scored on the validation split (mosaic `val`, built from training images the train split does
   not use). Each method's best setting is picked automatically from these results.
2. `seeds`: each method's best setting with 5 seeds on the test splits of mosaic-tones and Fashion-MNIST, 3 seeds on
   mosaic-positions, and clip at 2x and 4x the batch (5 seeds).
3. `long`: each method's best setting for 3,600 steps (3x the main run, 11.5 epochs), seed 0.
4. `probes` (optional): the mosaic-positions collapse of the global objectives. Candidates: eps = 1/(B - 1), which
   puts a positive-like term back into the normalizer (AmorLIP's analogue: c_pos = 1); deduplicated training
   captions; FastCLIP with gamma = 1 (in-batch estimate only); and the caption-aware metric (a retrieved caption
   identical to the true one counts as a hit), recorded for every mosaic-positions run.

Every schedule runs in true epochs: one epoch is one pass over the training set (20,000 pairs = 312.5 steps of 64),
which the trainer takes from the dataset's length. FastCLIP's gamma decay, AmorLIP's epoch boundaries, beta ramp and
rho blocks follow it; nothing is compressed into the run. Every run records the temperature it ends at.
Datasets (see harness.py): `mosaic-tones` (main; 160k possible captions, nearly all distinct), `mosaic-positions`
(2-4 items without tones, about 8.7k distinct captions among 20k pairs) and the embedded `fashion-mnist` (zero-shot
acc1). Metric on mosaics: held-out retrieval R@1, the mean of both directions.

    python benchmarks/quality_small_batch.py [--phase sweep|seeds|long|probes|all] [--quick] [--workers 2] [--fresh]

Phases after `sweep` read the sweep's results from the job cache (`benchmarks/.cache/jobs/`); an interrupted phase
continues where it stopped. `--phase all` runs sweep, seeds and long (add `--phase probes` for the probes).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    environment,
    markdown_table,
    save_figure,
    subplots,
    update_readme_section,
    write_json,
)
from benchmarks.jobs import cached_results, job_key, run_jobs  # noqa: E402

METHODS = ("clip", "siglip", "fastclip", "amorlip", "neuclip")
PHASES = ("sweep", "seeds", "long", "probes")


def setting(config: dict | None = None, args: dict | None = None) -> dict:
    """A setting: NeuCLIPConfig overrides and NeuCLIPTrainingArguments overrides."""
    return {"config": config or {}, "args": args or {}}


# FastCLIP-v3 as its released CC3M / CC12M scripts run it (docs/baselines.md).
FASTCLIP_RELEASE = {"eps": 1e-14, "fastclip_gamma_min": 0.2, "fastclip_gamma_decay_epochs": 18,
                    "fastclip_gamma_schedule": "stepped", "fastclip_direction_reduction": "mean",
                    "fastclip_temperature_gradient": "release"}
# AmorLIP as its released CC12M script runs it; rho_A +8.5 / -8.5 / -8.5 by epoch blocks is rho 4.25 / -4.25 here.
AMORLIP_RELEASE = {"amorlip_hidden_factor": 1.0, "amorlip_positive_weight": 1e-3, "amorlip_beta_ramp_epochs": 16,
                   "amorlip_ema_decay": 0.92, "amorlip_update_period": 1, "amorlip_estimate_source": "blend"}
AMORLIP_RHO = {"rho_schedule": [4.25, -4.25, -4.25], "rho_schedule_unit": "epoch"}
NEUCLIP_PAPER = {"neuclip_restart_source": "batch", "neuclip_restart_schedule": "constant",
                 "neuclip_restart_period": 500, "neuclip_inner_steps": 10, "neuclip_learning_rate": 0.05}
NEUCLIP_BANK = {**NEUCLIP_PAPER, "neuclip_restart_source": "bank", "neuclip_restart_period": 100}

# The tuning budget: 9 settings per method over its own knobs; the first one is the method's reference setting.
SETTINGS: dict[str, dict[str, dict]] = {
    "clip": {
        "T lr 2e-4 (own constant lr)": setting(),
        "T lr 1e-4": setting(args={"temperature_learning_rate": 1e-4}),
        "T lr 1e-3": setting(args={"temperature_learning_rate": 1e-3}),
        "T lr 5e-3": setting(args={"temperature_learning_rate": 5e-3}),
        "T on the encoder schedule (OpenCLIP)": setting(args={"temperature_learning_rate": None}),
        "T init 0.03": setting({"temperature_init": 0.03}),
        "T init 0.05": setting({"temperature_init": 0.05}),
        "T init 0.1": setting({"temperature_init": 0.1}),
        "T fixed at 0.07": setting({"learn_temperature": False}),
    },
    "siglip": {
        "paper (b -10, T 0.1)": setting(),
        "b -5": setting({"siglip_bias_init": -5.0}),
        "b -2": setting({"siglip_bias_init": -2.0}),
        "T 0.07": setting({"temperature_init": 0.07}),
        "T 0.2": setting({"temperature_init": 0.2}),
        "b -5, T 0.07": setting({"siglip_bias_init": -5.0, "temperature_init": 0.07}),
        "b -5, T 0.2": setting({"siglip_bias_init": -5.0, "temperature_init": 0.2}),
        "b -2, T 0.2": setting({"siglip_bias_init": -2.0, "temperature_init": 0.2}),
        "b -10, T 0.2": setting({"siglip_bias_init": -10.0, "temperature_init": 0.2}),
    },
    "fastclip": {
        "release (gamma -> 0.2 over 18 epochs, eps 1e-14)": setting(FASTCLIP_RELEASE),
        "decay over 2 epochs": setting({**FASTCLIP_RELEASE, "fastclip_gamma_decay_epochs": 2}),
        "decay over 1 epoch": setting({**FASTCLIP_RELEASE, "fastclip_gamma_decay_epochs": 1}),
        "gamma_min 0.5, decay 2": setting({**FASTCLIP_RELEASE, "fastclip_gamma_decay_epochs": 2,
                                           "fastclip_gamma_min": 0.5}),
        "gamma 1 (in-batch estimate)": setting({**FASTCLIP_RELEASE, "fastclip_gamma_min": 1.0}),
        "continuous gamma, decay 2": setting({**FASTCLIP_RELEASE, "fastclip_gamma_decay_epochs": 2,
                                              "fastclip_gamma_schedule": "continuous"}),
        "eps 1e-6": setting({**FASTCLIP_RELEASE, "eps": 1e-6}),
        "written RGCL-g (sum, objective T-gradient)": setting({**FASTCLIP_RELEASE,
                                                               "fastclip_direction_reduction": "sum",
                                                               "fastclip_temperature_gradient": "objective"}),
        "batch-aware rho (B_ref 1024)": setting({**FASTCLIP_RELEASE, "rho_reference_batch": 1024}),
    },
    "amorlip": {
        "release (c_pos 1e-3, ramp 16 epochs, epoch = one pass)": setting(AMORLIP_RELEASE, AMORLIP_RHO),
        "beta ramp 2 epochs": setting({**AMORLIP_RELEASE, "amorlip_beta_ramp_epochs": 2}, AMORLIP_RHO),
        "beta ramp 1 epoch": setting({**AMORLIP_RELEASE, "amorlip_beta_ramp_epochs": 1}, AMORLIP_RHO),
        "c_pos 1 (paper)": setting({**AMORLIP_RELEASE, "amorlip_positive_weight": 1.0}, AMORLIP_RHO),
        "c_pos 1, ramp 2": setting({**AMORLIP_RELEASE, "amorlip_positive_weight": 1.0,
                                    "amorlip_beta_ramp_epochs": 2}, AMORLIP_RHO),
        "epoch = 100 steps, ramp 6": setting({**AMORLIP_RELEASE, "amorlip_epoch_steps": 100,
                                              "amorlip_beta_ramp_epochs": 6}, AMORLIP_RHO),
        "epoch = 50 steps, ramp 12": setting({**AMORLIP_RELEASE, "amorlip_epoch_steps": 50,
                                              "amorlip_beta_ramp_epochs": 12}, AMORLIP_RHO),
        "hidden factor 0.5": setting({**AMORLIP_RELEASE, "amorlip_hidden_factor": 0.5}, AMORLIP_RHO),
        "paper (target network, c_pos 1, f_d 0.5)": setting({**AMORLIP_RELEASE, "amorlip_estimate_source": "target",
                                                             "amorlip_positive_weight": 1.0,
                                                             "amorlip_hidden_factor": 0.5}, AMORLIP_RHO),
    },
    "neuclip": {
        "bank, T_r 100": setting(NEUCLIP_BANK),
        "paper (batch restarts, T_r 500)": setting(NEUCLIP_PAPER),
        "bank, T_r 500": setting({**NEUCLIP_BANK, "neuclip_restart_period": 500}),
        "bank, T_r 50": setting({**NEUCLIP_BANK, "neuclip_restart_period": 50}),
        "bank, T_r 200": setting({**NEUCLIP_BANK, "neuclip_restart_period": 200}),
        "bank, T_r 100, lr 0.01": setting({**NEUCLIP_BANK, "neuclip_learning_rate": 0.01}),
        "bank, T_r 100, lr 0.02": setting({**NEUCLIP_BANK, "neuclip_learning_rate": 0.02}),
        "bank, T_r 100, lr 0.2": setting({**NEUCLIP_BANK, "neuclip_learning_rate": 0.2}),
        "bank, T_r 100, batch-aware rho (B_ref 1024)": setting({**NEUCLIP_BANK, "rho_reference_batch": 1024}),
    },
}

# Seconds per training step at batch 64 on the recorded machine (2 CPU cores, one thread per job), evaluations
# included: the previous full runs (1,200 steps: clip 127 s, siglip 132, fastclip 130, amorlip 141, neuclip 160;
# Fashion-MNIST 500 steps: 61-69 s). Larger batches cost about (B / 64) ** 0.75 as much (clip 2B 196 s, 4B 371 s).
SECONDS_PER_STEP = {"clip": 0.106, "siglip": 0.110, "fastclip": 0.108, "amorlip": 0.118, "neuclip": 0.133}
FASHION_EXTRA = 1.15  # the zero-shot evaluation costs more per step on the shorter Fashion-MNIST runs


def load(dataset: str, split: str, quick: bool) -> dict:
    """A dataset split as tensors; `mosaic-positions-dedup` trains on one pair per distinct caption."""
    from benchmarks import harness as H

    if dataset == "fashion-mnist":
        if split == "train":
            return H.default_pairs("train", 2000 if quick else None)
        return H.default_pairs("test", 500 if quick else 5000)
    dedup = dataset.endswith("-dedup")
    variant = dataset.removesuffix("-dedup").split("-", 1)[1]
    count = {"train": 2000 if quick else 20000, "val": 500 if quick else 2000, "test": 500 if quick else 2000}[split]
    data = H.mosaic_pairs(split, count, variant=variant)
    return H.unique_captions(data) if dedup and split == "train" else data


def train_job(job: dict) -> dict:
    """Train one configuration; evaluate at four points on the job's evaluation split."""
    import torch
    from transformers import TrainerCallback

    from benchmarks import harness as H

    train = load(job["dataset"], "train", job["quick"])
    evaluation = load(job["dataset"], job["eval_split"], job["quick"])
    caption_aware = job["dataset"].startswith("mosaic-positions")

    def metric(model, with_captions: bool = False) -> tuple[float, float | None]:
        if job["dataset"] == "fashion-mnist":
            return H.zero_shot_accuracy(model, evaluation)["acc1"], None
        result = H.retrieval(model, evaluation, caption_aware=with_captions)
        r1 = (result["image_retrieval_recall@1"] + result["text_retrieval_recall@1"]) / 2
        captions = None
        if with_captions:
            captions = (result["caption_image_retrieval_recall@1"] + result["caption_text_retrieval_recall@1"]) / 2
        return r1, captions

    curve = []

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % max(1, job["steps"] // 4) == 0 and state.global_step < job["steps"]:
                curve.append([state.global_step, metric(model)[0]])

    trainer = H.build_trainer(job["objective"], train, job["steps"], job["batch"], seed=job["seed"],
                              learning_rate=job["lr"], callbacks=[Evaluate()], training_args=job["args"],
                              **job["config"])
    start = time.time()
    with redirect_stdout(io.StringIO()):
        trainer.train()
    seconds = time.time() - start
    final, final_captions = metric(trainer.core_model, caption_aware)
    curve.append([job["steps"], final])
    result = {"curve": curve, "final": final, "seconds": seconds, "epochs": trainer.epochs_seen(),
              "temperature": float(torch.exp(-trainer.core_model.logit_scale.detach()))}
    if final_captions is not None:
        result["final_caption_aware"] = final_captions
    return result


def plan(quick: bool, seeds: list[int], long_steps: int) -> dict:
    """Every job of every phase (the seeds, long and probe jobs need the sweep's choice: built later)."""
    batch = 32 if quick else 64
    steps = {"mosaic": 20 if quick else 1200, "fashion-mnist": 20 if quick else 500, "long": long_steps}
    settings = {m: dict(list(SETTINGS[m].items())[:2]) if quick else SETTINGS[m] for m in METHODS}
    return {"batch": batch, "steps": steps, "settings": settings, "seeds": seeds, "lr": 1e-3}


def make_job(p: dict, quick: bool, dataset: str, method: str, name: str, chosen: dict, seed: int,
             eval_split: str = "test", steps: int | None = None, batch: int | None = None, kind: str = "main") -> dict:
    default = p["steps"]["fashion-mnist" if dataset == "fashion-mnist" else "mosaic"]
    return {"dataset": dataset, "objective": method, "setting": name, "config": chosen["config"],
            "args": chosen["args"], "seed": seed, "batch": batch or p["batch"], "steps": steps or default,
            "lr": p["lr"], "eval_split": eval_split, "quick": quick, "kind": kind}


def sweep_jobs(p: dict, quick: bool) -> list[dict]:
    return [make_job(p, quick, "mosaic-tones", method, name, chosen, 0, eval_split="val", kind="sweep")
            for method in METHODS for name, chosen in p["settings"][method].items()]


def choose(p: dict, jobs: list[dict], results: list[dict]) -> dict:
    """The sweep table per method and the best setting (highest validation R@1; the earlier one on ties)."""
    sweep = {m: {"settings": {}, "chosen": None} for m in METHODS}
    for job, result in zip(jobs, results):
        sweep[job["objective"]]["settings"][job["setting"]] = {
            **p["settings"][job["objective"]][job["setting"]], "val_r1": result["final"],
            "temperature": result["temperature"], "curve": result["curve"]}
    for entry in sweep.values():
        entry["chosen"] = max(entry["settings"], key=lambda name: entry["settings"][name]["val_r1"])
    return sweep


def seeds_jobs(p: dict, quick: bool, sweep: dict) -> list[dict]:
    jobs = []
    positions_seeds = p["seeds"][:3]
    for dataset, dataset_seeds in (("mosaic-tones", p["seeds"]), ("fashion-mnist", p["seeds"]),
                                   ("mosaic-positions", positions_seeds)):
        for method in METHODS:
            name = sweep[method]["chosen"]
            for seed in dataset_seeds:
                jobs.append(make_job(p, quick, dataset, method, name, p["settings"][method][name], seed))
    name = sweep["clip"]["chosen"]
    for factor in (2, 4):  # what a bigger in-batch normalizer buys, at equal steps
        for seed in p["seeds"]:
            jobs.append(make_job(p, quick, "mosaic-tones", "clip", name, p["settings"]["clip"][name], seed,
                                 batch=p["batch"] * factor, kind=f"clip @ {factor}B"))
    return jobs


def long_jobs(p: dict, quick: bool, sweep: dict) -> list[dict]:
    return [make_job(p, quick, "mosaic-tones", m, sweep[m]["chosen"], p["settings"][m][sweep[m]["chosen"]], 0,
                     steps=p["steps"]["long"], kind="long") for m in METHODS]


def probe_jobs(p: dict, quick: bool, sweep: dict) -> list[tuple[str, dict]]:
    """(probe label, job) pairs on mosaic-positions; the `best` jobs are the seeds phase's own (shared cache)."""
    batch = p["batch"]
    seeds = p["seeds"][:1] if quick else p["seeds"][:3]
    fastclip_name = sweep["fastclip"]["chosen"]
    fastclip_best = p["settings"]["fastclip"][fastclip_name]
    gamma_one = setting({**fastclip_best["config"], "fastclip_gamma_min": 1.0}, fastclip_best["args"])
    variants = []  # (probe label, method, setting name, setting)
    for method in METHODS:
        name = sweep[method]["chosen"]
        variants.append(("best setting", method, name, p["settings"][method][name]))
    variants.append(("gamma 1 (in-batch estimate)", "fastclip", fastclip_name + ", gamma 1", gamma_one))
    positive_like = []  # eps = 1/(B - 1): log(eps + ghat) = log(1 + (B - 1) ghat) - log(B - 1), InfoNCE's normalizer
    for method in ("fastclip", "neuclip"):
        name = sweep[method]["chosen"]
        chosen = p["settings"][method][name]
        positive_like.append(("eps = 1/(B-1)", method, name + ", eps 1/(B-1)",
                              setting({**chosen["config"], "eps": 1.0 / (batch - 1)}, chosen["args"])))
    name = sweep["amorlip"]["chosen"]
    chosen = p["settings"]["amorlip"][name]
    positive_like.append(("eps = 1/(B-1)", "amorlip", name + ", c_pos 1",
                          setting({**chosen["config"], "amorlip_positive_weight": 1.0}, chosen["args"])))
    pairs = []
    for label, method, name, chosen in variants + positive_like:
        for seed in seeds:
            pairs.append((label, make_job(p, quick, "mosaic-positions", method, name, chosen, seed)))
    for label, method, name, chosen in variants:
        for seed in seeds:
            pairs.append((f"deduplicated captions, {label}",
                          make_job(p, quick, "mosaic-positions-dedup", method, name, chosen, seed)))
    return pairs


def estimate_seconds(jobs: list[dict], cached: list[dict | None], workers: int) -> float:
    """Wall time of the jobs not cached yet on `workers` workers, from SECONDS_PER_STEP."""
    total = 0.0
    for job, result in zip(jobs, cached):
        if result is None:
            per_step = SECONDS_PER_STEP[job["objective"]] * (job["batch"] / 64) ** 0.75
            total += job["steps"] * per_step * (FASHION_EXTRA if job["dataset"] == "fashion-mnist" else 1.0)
    return total / max(1, workers)


def print_estimate(p: dict, quick: bool, jobs_sweep: list[dict], cached_sweep: list, workers: int,
                   fresh: bool) -> None:
    """Print the estimated wall time of every phase's jobs that are not cached yet."""
    done = all(r is not None for r in cached_sweep)
    # Before the sweep has finished, the job counts are those of any choice; nothing after it is cached yet.
    sweep = choose(p, jobs_sweep, cached_sweep) if done else {m: {"chosen": next(iter(p["settings"][m]))}
                                                              for m in METHODS}
    phases = {"sweep": (jobs_sweep, cached_sweep),
              "seeds": (seeds_jobs(p, quick, sweep), "quality-main"),
              "long": (long_jobs(p, quick, sweep), "quality-long"),
              "probes (optional)": ([job for _, job in probe_jobs(p, quick, sweep)], "quality-main")}
    print(f"estimated wall time of the jobs not cached yet, on {workers} worker(s) (per-step cost of the recorded "
          "runs: 2-core CPU, one thread per job):")
    seeds_keys = {job_key(job) for job in phases["seeds"][0]}
    total = 0.0
    for phase, (jobs, cached) in phases.items():
        if isinstance(cached, str):
            cached = cached_results(jobs, cached) if done and not fresh else [None] * len(jobs)
        if phase.startswith("probes"):  # the probes' `best setting` runs are the seeds phase's own
            cached = [{} if job_key(job) in seeds_keys else r for job, r in zip(jobs, cached)]
        seconds = estimate_seconds(jobs, cached, workers)
        total += seconds if phase != "probes (optional)" else 0.0
        print(f"  {phase:<18} {seconds / 3600:6.2f} h  ({sum(r is None for r in cached)} of {len(jobs)} jobs to run)")
    print(f"  sweep + seeds + long: {total / 3600:.2f} h")


def summarise(jobs: list[dict], results: list[dict], labels: list[str] | None = None) -> list[dict]:
    """Runs grouped by (label, dataset, method, setting, batch, steps): mean and std of the metric and of T."""
    from benchmarks.harness import mean_std

    groups: dict[tuple, list] = {}
    for index, (job, result) in enumerate(zip(jobs, results)):
        label = labels[index] if labels else job["kind"]
        key = (label, job["dataset"], job["objective"], job["setting"], job["batch"], job["steps"])
        groups.setdefault(key, []).append({**result, "seed": job["seed"]})
    summary = []
    for (label, dataset, method, name, batch, steps), runs in groups.items():
        mean, std = mean_std([r["final"] for r in runs])
        t_mean, t_std = mean_std([r["temperature"] for r in runs])
        shown = method if label == "main" else label if label.startswith("clip @") else f"{method} ({label})"
        entry = {"kind": label, "dataset": dataset, "method": shown, "objective": method, "setting": name,
                 "batch": batch, "steps": steps, "mean": mean, "std": std, "temperature_mean": t_mean,
                 "temperature_std": t_std, "runs": runs}
        if all("final_caption_aware" in r for r in runs):
            entry["caption_aware_mean"], entry["caption_aware_std"] = mean_std([r["final_caption_aware"] for r in runs])
        summary.append(entry)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=(*PHASES, "all"), default="all",
                        help="which phase to run (all = sweep, seeds, long); the others are read from the cache")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, 20 steps, 2 settings per method, one seed, all four phases (3-4 minutes)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="ignore cached job results")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the test-split runs")
    parser.add_argument("--long_steps", type=int, default=3600, help="steps of the long runs (>= 3,000)")
    parser.add_argument("--estimate_only", action="store_true", help="print the time estimate and stop")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    p = plan(quick, list(range(1 if quick else args.seeds)), 30 if quick else args.long_steps)
    phases = ("sweep", "seeds", "long", "probes") if quick and args.phase == "all" else (
        ("sweep", "seeds", "long") if args.phase == "all" else (args.phase,))
    for dataset in ("mosaic-tones", "mosaic-positions", "mosaic-positions-dedup", "fashion-mnist"):
        for split in ("train", "val", "test") if dataset.startswith("mosaic") else ("train", "test"):
            load(dataset, split, quick)  # build the data caches once, before the parallel jobs

    # 1. The sweep: the same budget for every method, on the validation split.
    jobs_sweep = sweep_jobs(p, quick)
    cached_sweep = [None] * len(jobs_sweep) if args.fresh else cached_results(jobs_sweep, "quality-sweep")
    print_estimate(p, quick, jobs_sweep, cached_sweep, args.workers, args.fresh)
    if args.estimate_only:
        return {}

    if "sweep" in phases:
        results_sweep = run_jobs(train_job, jobs_sweep, "quality-sweep", args.workers, args.fresh)
    else:
        results_sweep = cached_results(jobs_sweep, "quality-sweep")
        missing = sum(r is None for r in results_sweep)
        if missing:
            raise SystemExit(f"the sweep has {missing} unfinished job(s): run --phase sweep first")
    sweep = choose(p, jobs_sweep, results_sweep)
    print("chosen settings: " + "; ".join(f"{m}: {sweep[m]['chosen']}" for m in METHODS))

    # 2-4. Seeds, long runs, probes: run the requested phases, read the others from the cache when complete.
    builders = {"seeds": ("quality-main", lambda: seeds_jobs(p, quick, sweep)),
                "long": ("quality-long", lambda: long_jobs(p, quick, sweep)),
                "probes": ("quality-main", lambda: [job for _, job in probe_jobs(p, quick, sweep)])}
    outcome = {}
    for phase, (cache_name, build) in builders.items():
        jobs = build()
        if phase in phases:
            fresh = args.fresh and phase != "probes"  # the probes share the seeds phase's cache
            outcome[phase] = (jobs, run_jobs(train_job, jobs, cache_name, args.workers, fresh))
        else:
            cached = cached_results(jobs, cache_name)
            outcome[phase] = (jobs, cached) if all(r is not None for r in cached) else None
    payload = {"quick": quick, "batch": p["batch"], "steps": p["steps"], "seeds": p["seeds"], "learning_rate": p["lr"],
               "train_pairs": len(load("mosaic-tones", "train", quick)["sample_ids"]),
               "sweep": {"metric": "val retrieval R@1 (mosaic-tones)", **sweep}}
    if outcome["seeds"]:
        payload["results"] = summarise(*outcome["seeds"])
    if outcome["long"]:
        payload["long"] = summarise(*outcome["long"])
    if outcome["probes"]:
        labels = [label for label, _ in probe_jobs(p, quick, sweep)]
        payload["probes"] = summarise(*outcome["probes"], labels=labels)
    json_path = write_json("quality_small_batch", payload, args.out_dir)
    figure = _plot(payload, args.out_dir)
    body = _readme_body(payload)
    update_readme_section("quality_small_batch", body, args.readme)
    print(body)
    print(f"wrote {json_path} and {figure}")
    return payload


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _readme_body(payload: dict) -> str:
    env = environment()
    steps, batch = payload["steps"], payload["batch"]
    epochs = steps["mosaic"] * batch / payload["train_pairs"]
    sweep_rows = []
    for method in METHODS:
        entry = payload["sweep"][method]
        for name, result in entry["settings"].items():
            sweep_rows.append([method, name, _pct(result["val_r1"]), f"{result['temperature']:.4f}",
                               "chosen" if name == entry["chosen"] else ""])
    text = f"""## quality_small_batch

`python benchmarks/quality_small_batch.py --phase sweep|seeds|long|probes|all` (`--quick`: tiny data, 20 steps, 2
settings per method, one seed). Tiny preset, batch {batch}, encoder lr {payload['learning_rate']}, AdamW, cosine,
temperature lr 2e-4 unless a setting says otherwise, {steps['mosaic']} steps on mosaics ({epochs:.2f} true epochs of
{payload['train_pairs']} pairs), {steps['fashion-mnist']} on Fashion-MNIST. Every schedule in true epochs (FastCLIP's
gamma, AmorLIP's epochs, beta ramp and rho blocks: nothing compressed into the run). FastCLIP and AmorLIP start from
their released settings (docs/baselines.md). Same tuning budget for every method: the settings below, seed 0, scored
on the mosaic-tones validation split; the best of each then runs {len(payload['seeds'])} seed(s) on the test splits
(mosaic-positions: up to 3). Metric: held-out retrieval R@1 (mean of both directions) on the mosaics, zero-shot acc1
on Fashion-MNIST; mean ± std over seeds (in %); T: the temperature the runs end at. Machine: {env['device']}, one
torch thread per run.

Sweep (mosaic-tones, validation split, seed 0, {steps['mosaic']} steps):

{markdown_table(['method', 'setting', 'val R@1 %', 'final T', ''], sweep_rows)}
"""
    if "results" in payload:
        rows = [[r["dataset"], r["method"], r["setting"], r["batch"], len(r["runs"]), _pct(r["mean"], r["std"]),
                 f"{r['temperature_mean']:.4f} ± {r['temperature_std']:.4f}",
                 _pct(r["caption_aware_mean"], r["caption_aware_std"]) if "caption_aware_mean" in r else "",
                 round(sum(x["seconds"] for x in r["runs"]) / len(r["runs"]))] for r in payload["results"]]
        text += "\n" + markdown_table(["dataset", "method", "setting", "batch", "seeds", "held-out metric %",
                                       "final T", "caption-aware R@1 %", "s / run"], rows) + "\n"
    if "long" in payload:
        rows = [[r["objective"], r["setting"], r["steps"], f"{r['runs'][0]['epochs']:.1f}",
                 " -> ".join(_pct(v) for _, v in r["runs"][0]["curve"]), f"{r['temperature_mean']:.4f}"]
                for r in payload["long"]]
        text += f"\nLong runs (mosaic-tones test split, seed 0):\n\n" + markdown_table(
            ["method", "setting", "steps", "epochs", "R@1 % along the run", "final T"], rows) + "\n"
    if "probes" in payload:
        rows = [[r["kind"], r["objective"], r["setting"], len(r["runs"]), _pct(r["mean"], r["std"]),
                 _pct(r["caption_aware_mean"], r["caption_aware_std"]) if "caption_aware_mean" in r else "",
                 f"{r['temperature_mean']:.4f}"] for r in payload["probes"]]
        text += "\nmosaic-positions probes (test split; caption-aware: an identical caption counts as a hit):\n\n" + \
            markdown_table(["probe", "method", "setting", "seeds", "R@1 %", "caption-aware R@1 %", "final T"], rows)
        text += "\n"
    return text + "\n![learning curves](results/quality_small_batch.png)\n"


def _plot(payload: dict, out_dir) -> Path:
    """Learning curves of the test-split comparison per dataset, and of the long runs."""
    panels = {}
    for entry in payload.get("results", []):
        panels.setdefault(entry["dataset"], []).append(entry)
    if "long" in payload:
        panels["long runs (mosaic-tones)"] = payload["long"]
    if not panels:  # only the sweep so far: its validation curves
        panels["sweep (validation)"] = [
            {"method": f"{m}: {payload['sweep'][m]['chosen']}", "batch": payload["batch"],
             "runs": [{"curve": payload["sweep"][m]["settings"][payload["sweep"][m]["chosen"]]["curve"]}]}
            for m in METHODS]
    fig, axes = subplots(len(panels), (5 * len(panels), 4))
    for ax, (title, entries) in zip(axes, panels.items()):
        for entry in entries:
            curves = [r["curve"] for r in entry["runs"]]
            steps = [point[0] for point in curves[0]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
            ax.plot(steps, [100 * m for m in mean], marker="o", label=f"{entry['method']} (B={entry['batch']})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("acc1 %" if title == "fashion-mnist" else "retrieval R@1 %")
        ax.legend(fontsize=7)
    return save_figure(fig, "quality_small_batch", out_dir)


if __name__ == "__main__":
    main()
