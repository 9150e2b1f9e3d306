"""How accurate is each method's normalizer, and how does its error grow when the batch shrinks or the data grows?

Each method (clip's in-batch estimate, fastclip, amorlip, neuclip) trains its own model on the same data. At four
points of training, with the current encoders, the exact alpha*_i = log(eps + g_i) of 512 probe anchors is computed
against the WHOLE training set and compared with the method's estimate of the same anchors, placed in batches of the
training batch size (`neuclip_hf.diagnostics`: AmorLIP's sum-form estimate is converted to the same quantity,
FastCLIP reads its table, NeuCLIP its prototypes, CLIP the batch). Reported: the mean squared error at global
batch 64, 128 and 256 on 5,000 training pairs, and at batch 128 on 50,000 pairs (10x), on the `mosaic-tones` data
(near-unique captions, see harness.py).

The paper's claim under test: NeuCLIP's error barely grows when the batch halves or the data grows 10x, while the
in-batch and FastCLIP errors grow several-fold.

    python benchmarks/normalizer_accuracy.py [--quick] [--workers 2] [--fresh]
"""

from __future__ import annotations

import argparse
import io
import json
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
from benchmarks.jobs import run_jobs  # noqa: E402
from benchmarks.quality_small_batch import SETTINGS  # noqa: E402

# Variant -> (objective, setting). FastCLIP and AmorLIP run their released settings in true epochs (the reference
# settings of quality_small_batch); NeuCLIP runs three ways: restarts from a bank every 100 steps (quality_small_batch's
# reference), the config default (bank, T_r 500) and the paper's (restarts from the batch, T_r 500). `--tuned` replaces
# the first setting of each method by the one quality_small_batch's sweep chose (results/quality_small_batch.json).
VARIANTS = {
    "clip": ("clip", {"config": {}, "args": {}}),
    "fastclip": ("fastclip", next(iter(SETTINGS["fastclip"].values()))),
    "amorlip": ("amorlip", next(iter(SETTINGS["amorlip"].values()))),
    "neuclip": ("neuclip", SETTINGS["neuclip"]["bank, T_r 100"]),
    "neuclip (T_r 500)": ("neuclip", SETTINGS["neuclip"]["bank, T_r 500"]),
    "neuclip (paper)": ("neuclip", SETTINGS["neuclip"]["paper (batch restarts, T_r 500)"]),
}
METHODS = tuple(VARIANTS)
LABELS = {**{m: m for m in METHODS}, "clip": "in-batch (clip)", "fastclip": "fastclip (release settings)",
          "amorlip": "amorlip (release settings)", "neuclip": "neuclip (bank, T_r 100)",
          "neuclip (T_r 500)": "neuclip (bank, T_r 500)", "neuclip (paper)": "neuclip (paper: batch, T_r 500)"}


def tuned_variants(path: Path) -> tuple[dict, dict]:
    """VARIANTS and LABELS with each method's first entry set to the setting quality_small_batch's sweep chose."""
    sweep = json.loads(path.read_text())["sweep"]
    variants, labels = dict(VARIANTS), dict(LABELS)
    for variant in ("clip", "fastclip", "amorlip", "neuclip"):
        chosen = sweep[variant]["chosen"]
        variants[variant] = (variant, {k: sweep[variant]["settings"][chosen][k] for k in ("config", "args")})
        labels[variant] = f"{variant} ({chosen}, tuned)"
    return variants, labels


def data_for(size: int) -> dict:
    from benchmarks import harness as H

    return H.mosaic_pairs("train", size, variant="tones")


def accuracy_job(job: dict) -> dict:
    """Train one method and measure its estimator's error against the exact normalizer four times."""
    from neuclip_hf.diagnostics import NormaliserDiagnosticsCallback

    from benchmarks import harness as H

    data = data_for(job["size"])  # its length is the epoch: every schedule runs in true epochs
    trainer = H.build_trainer(job["method"], data, job["steps"], job["batch"], seed=job["seed"],
                              training_args=job["args"], **job["config"])
    diagnostics = NormaliserDiagnosticsCallback(data, every_steps=max(1, job["steps"] // 4), num_probes=job["probes"],
                                                batch_size=job["batch"]).attach(trainer)
    start = time.time()
    with redirect_stdout(io.StringIO()):
        trainer.train()
    return {"history": diagnostics.history, "seconds": time.time() - start}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and few steps (about a minute)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    parser.add_argument("--tuned", nargs="?", const=str(Path(__file__).parent / "results" / "quality_small_batch.json"),
                        default=None, help="use the settings quality_small_batch's sweep chose (its results JSON)")
    args = parser.parse_args(argv)
    variants, labels = tuned_variants(Path(args.tuned)) if args.tuned else (VARIANTS, LABELS)
    quick = args.quick
    base = 300 if quick else 5000
    steps, probes = (12 if quick else 600), (64 if quick else 512)
    settings = [(base, 64), (base, 128), (base, 256), (10 * base, 128)]
    if quick:
        settings = [(base, 32), (base, 64), (10 * base, 64)]
    for size in {s for s, _ in settings}:
        data_for(size)  # build the caches once, before the parallel jobs
    jobs, job_variants = [], []
    for size, batch in settings:
        for variant, (objective, chosen) in variants.items():
            jobs.append({"method": objective, "size": size, "batch": batch, "steps": steps, "probes": probes,
                         "seed": 0, "quick": quick, "config": chosen["config"], "args": chosen["args"]})
            job_variants.append(variant)
    results = run_jobs(accuracy_job, jobs, "normalizer-accuracy", args.workers, args.fresh)

    table = {}
    for variant, job, result in zip(job_variants, jobs, results):
        history = result["history"]
        table[(variant, job["size"], job["batch"])] = {
            "final_mse": history[-1]["mse"],
            "mean_mse": sum(h["mse"] for h in history) / len(history),
            "final_in_batch_mse": history[-1]["in_batch_mse"],
            "history": history,
            "seconds": result["seconds"],
        }
    small_batch, large_batch = settings[0][1], settings[1][1]
    big = settings[-1]
    rows, growth = [], {}
    for method in METHODS:
        row = [labels[method]]
        for size, batch in settings:
            row.append(f"{table[(method, size, batch)]['mean_mse']:.3f}")
        halving = table[(method, base, small_batch)]["mean_mse"] / table[(method, base, large_batch)]["mean_mse"]
        tenfold = table[(method, big[0], big[1])]["mean_mse"] / table[(method, base, big[1])]["mean_mse"]
        growth[method] = {"batch_halved": halving, "data_10x": tenfold}
        rows += [row + [f"x{halving:.2f}", f"x{tenfold:.2f}"]]
    neuclip, fastclip, clip = (table[(m, base, small_batch)]["mean_mse"] for m in ("neuclip", "fastclip", "clip"))
    targets = {"neuclip_mse <= 0.5 x fastclip (smallest batch)": neuclip <= 0.5 * fastclip,
               "neuclip_mse <= 0.2 x in-batch (smallest batch)": neuclip <= 0.2 * clip}
    payload = {"quick": quick, "data": "mosaic-tones", "steps": steps, "probes": probes, "settings": settings,
               "variants": {v: {"objective": o, **chosen} for v, (o, chosen) in variants.items()},
               "results": {f"{m}/n={s}/B={b}": v for (m, s, b), v in table.items()}, "growth": growth,
               "targets": targets}
    json_path = write_json("normalizer_accuracy", payload, args.out_dir)
    figure = _plot(table, settings, base, labels, args.out_dir)
    header = ["method"] + [f"n={s}, B={b}" for s, b in settings] + [f"B {large_batch}->{small_batch}",
                                                                    f"n {base}->{big[0]}"]
    env = environment()
    body = f"""## normalizer_accuracy

`python benchmarks/normalizer_accuracy.py` (`--quick`: 300/3,000 pairs, 12 steps). Each method trains its own tiny
model for {steps} steps on mosaic-tones pairs; at 4 points the exact log(eps + g_i) of {probes} probe anchors is
computed against the whole training set with the current encoders and compared with the method's estimate (anchors
placed in training-size batches). Mean squared error averaged over the 4 points (columns), and its growth when the
batch halves and when the training set grows 10x (last columns). Every schedule runs in true epochs (one epoch = one
pass over the n training pairs): FastCLIP and AmorLIP with their released settings (gamma 1 -> 0.2 over 18 epochs,
stepped; AmorLIP's epoch = one pass, beta ramp 16 epochs, c_pos 1e-3, rho blocks), or with `--tuned` the settings
`quality_small_batch`'s sweep chose. NeuCLIP runs with restarts from a bank of recent embeddings every 100 steps,
the config default (bank, T_r = 500) and the paper's (restarts from the batch, T_r = 500). Machine:
{env['device']}, one thread per run.

{markdown_table(header, rows)}

Targets at the smallest batch: {', '.join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items())}.

![error vs step and batch](results/normalizer_accuracy.png)
"""
    update_readme_section("normalizer_accuracy", body, args.readme)
    print(markdown_table(header, rows))
    print(f"wrote {json_path} and {figure}")
    return payload


def _plot(table: dict, settings: list, base: int, labels: dict, out_dir) -> Path:
    fig, axes = subplots(3, (15, 4))
    reference_batch = settings[1][1]
    batches = [b for s, b in settings if s == base]
    for method in METHODS:
        history = table[(method, base, reference_batch)]["history"]
        axes[0].plot([h["step"] for h in history], [h["mse"] for h in history], marker="o", label=labels[method])
        axes[1].plot(batches, [table[(method, base, b)]["mean_mse"] for b in batches], marker="o", label=labels[method])
    big = settings[-1]
    x = range(len(METHODS))
    axes[2].bar([i - 0.2 for i in x], [table[(m, base, big[1])]["mean_mse"] for m in METHODS], 0.4, label=f"n={base}")
    axes[2].bar([i + 0.2 for i in x], [table[(m, big[0], big[1])]["mean_mse"] for m in METHODS], 0.4,
                label=f"n={big[0]}")
    axes[2].set_xticks(list(x), [labels[m] for m in METHODS])
    axes[0].set(title=f"MSE vs step (n={base}, B={reference_batch})", xlabel="step", yscale="log")
    axes[1].set(title=f"MSE vs global batch (n={base})", xlabel="batch", xscale="log", yscale="log")
    axes[2].set(title=f"MSE at B={big[1]}: data x10", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_figure(fig, "normalizer_accuracy", out_dir)


if __name__ == "__main__":
    main()
