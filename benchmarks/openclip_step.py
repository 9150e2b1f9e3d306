"""Is a training step here as fast as open_clip's? ViT-B/32 geometry, full step with AdamW, side by side.

Every measurement is a fresh process with one torch thread, timing a whole optimizer step (forward, loss, backward,
AdamW, temperature clamp) on random images and 77-token captions:

  - `open_clip`: open_clip's `ViT-B-32` (`create_model`, no weights) + `ClipLoss` + AdamW with open_clip's parameter
    groups, as its `train_one_epoch` runs them (`openclip_worker.py`);
  - `transformers CLIPModel`: a plain `transformers.Trainer` on `CLIPModel(return_loss=True)`, same geometry;
  - `NeuCLIP clip` / `NeuCLIP neuclip`: `NeuCLIPTrainer` with the clip and neuclip objectives (NeuCLIP m = 4096,
    T_u = 10; its estimator's share of the step is timed inside the step);
  - ablations of `NeuCLIP clip` at the smallest batch, to see where the time goes: eager attention instead of
    SDPA, torch's default (for-loop) AdamW instead of the fused one the Trainer picks, and QuickGELU (OpenAI's
    activation, HF's default) instead of GELU (open_clip's ViT-B-32, this package's `vit-b-32` preset).

Rounds interleave all of them (in a rotating order). A round counts only if every run in it had a core to itself:
the CPU time other processes used during the run (from /proc/stat, less the run's own) stayed under
`--max_other_load` cores. Results are medians over the valid rounds with their spread, and the throughput ratios
are taken within each round (paired), then summarised the same way. A full run that cannot collect `--rounds`
valid rounds within `--max_rounds` records nothing (its rounds go to `benchmarks/.cache/`). `--profile` adds one
profiled step to every run of the first round (top operators by self time, the optimizer step, the estimator).

open_clip is not a dependency of this package: it runs with this interpreter and its torch, from a folder outside
the repository (`--open_clip_dir`, installed there with pip on first use: open_clip_torch 3.3.0, ftfy, wcwidth), or
with another interpreter that has it (`--open_clip_python`). The stand-in for torchvision that `import open_clip`
needs lives in `openclip_worker.py`.

    python benchmarks/openclip_step.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    default_max_other_load,
    environment,
    interleaved_rounds,
    markdown_table,
    median_and_spread,
    run_alone,
    save_figure,
    subplots,
    update_readme_section,
    write_json,
)
from neuclip_hf.presets import PRESETS  # noqa: E402

BENCH = Path(__file__).resolve().parent
OPEN_CLIP_VERSION = "3.3.0"
OPEN_CLIP_PACKAGES = (f"open_clip_torch=={OPEN_CLIP_VERSION}", "ftfy", "wcwidth")
NEUCLIP_OVERRIDES = {"neuclip_num_prototypes": 4096, "neuclip_inner_steps": 10}  # the paper's m and T_u

# name -> how it is measured. `side` is `open_clip`, `plain` (transformers Trainer + CLIPModel) or an objective.
VARIANTS: dict[str, dict] = {
    "open_clip": {"side": "open_clip"},
    "transformers CLIPModel": {"side": "plain"},
    "NeuCLIP clip": {"side": "clip"},
    "NeuCLIP neuclip": {"side": "neuclip", "overrides": NEUCLIP_OVERRIDES, "time_estimator": True},
    "clip, eager attention": {"side": "clip", "overrides": {"attn_implementation": "eager"}, "ablation": True},
    "clip, for-loop AdamW": {"side": "clip", "optim": "adamw_torch", "ablation": True},
    "clip, QuickGELU": {"side": "clip", "ablation": True,
                        "overrides": {"text_config": {"hidden_act": "quick_gelu"},
                                      "vision_config": {"hidden_act": "quick_gelu"}}},
}


REQUIRED = ("open_clip", "NeuCLIP clip", "NeuCLIP neuclip")  # the targets are read from these


def open_clip_geometry(preset: str, text_length: int) -> dict:
    """The open_clip model config (its model_configs JSON layout) of one of this package's presets."""
    values = PRESETS[preset]
    vision, text = values["vision_config"], values["text_config"]
    return {
        "embed_dim": values["projection_dim"],
        "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                       "width": vision["hidden_size"], "patch_size": vision["patch_size"],
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text_cfg": {"context_length": text_length, "vocab_size": text["vocab_size"], "width": text["hidden_size"],
                     "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
                     "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }


def open_clip_command(args) -> tuple[list[str], dict]:
    """The interpreter and environment that run `openclip_worker.py` (installing open_clip on first use)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.open_clip_python:
        return [args.open_clip_python], env
    target = Path(args.open_clip_dir).expanduser()
    if not (target / "open_clip").is_dir():
        print(f"installing {', '.join(OPEN_CLIP_PACKAGES)} into {args.open_clip_dir} (outside the repository) ...")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                               *OPEN_CLIP_PACKAGES], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"could not install open_clip into {target} (pass --open_clip_python or "
                             f"--open_clip_dir):\n{done.stderr[-2000:]}")
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    return [sys.executable], env


def measure_variant(name: str, preset: str, batch: int, steps: int, warmup: int, args, open_clip,
                    profile: bool = False) -> dict:
    """One run of one variant in its own process: its step times and whether it had a core to itself."""
    variant = VARIANTS[name]
    text_length = PRESETS[preset]["text_config"]["max_position_embeddings"]  # 77 at ViT-B/32, as open_clip
    if variant["side"] == "open_clip":
        python, env = open_clip
        spec = {"batch_size": batch, "steps": steps, "warmup": warmup, "threads": 1, "profile": profile}
        if preset == "vit-b-32":
            spec["model_name"] = "ViT-B-32"  # open_clip's own config, GELU
        else:
            spec["geometry"] = open_clip_geometry(preset, text_length)
        command = [*python, str(BENCH / "openclip_worker.py"), json.dumps(spec)]
    else:
        spec = {"kind": variant["side"], "preset": preset, "batch_size": batch, "steps": steps, "warmup": warmup,
                "device": "cpu", "text_length": text_length, "threads": 1, "overrides": variant.get("overrides"),
                "optim": variant.get("optim"), "time_estimator": variant.get("time_estimator", False),
                "profile": profile}
        command = [sys.executable, str(BENCH / "throughput.py"), "--worker", json.dumps(spec)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
    result, load = run_alone(command, env=env, max_other_load=args.max_other_load)
    seconds = statistics.median(result["step_seconds"])
    return {"seconds_per_step": seconds, "step_seconds": result["step_seconds"], "load": load,
            "cpu_seconds_per_step": statistics.median(result["step_cpu_seconds"]),
            "estimator_seconds_per_step": result.get("estimator_seconds_per_step"),
            "peak_rss_bytes": result["peak_rss_bytes"], "profile": result.get("profile"),
            "versions": {k: result[k] for k in ("open_clip", "torch") if k in result}}


def run_setting(preset: str, batch: int, names: list[str], steps: int, warmup: int, args, open_clip) -> dict:
    """Interleaved rounds of every variant at one batch, until enough valid rounds (or the round limit)."""
    rounds, valid = interleaved_rounds(
        names, lambda name, index: measure_variant(name, preset, batch, steps, warmup, args, open_clip,
                                                   profile=args.profile and index == 0),
        args.rounds, args.max_rounds, args.max_other_load, args.wait_for_quiet, label=f"{preset} batch {batch}")
    return {"preset": preset, "batch_size": batch, "steps": steps, "warmup": warmup, "rounds": rounds,
            "valid_rounds": valid, "summary": summarise(rounds, names, batch)}


def summarise(rounds: list[dict], names: list[str], batch: int) -> dict:
    """Medians and spreads over the valid rounds (all rounds when none is valid, flagged), ratios paired by round."""
    used = [r for r in rounds if r["valid"]]
    all_valid = bool(used)
    used = used or rounds
    summary = {"rounds_used": len(used), "from_valid_rounds": all_valid, "variants": {}}
    for name in names:
        seconds = [r["runs"][name]["seconds_per_step"] for r in used]
        entry = {"seconds_per_step": median_and_spread(seconds),
                 "samples_per_second": median_and_spread([batch / s for s in seconds]),
                 "throughput_vs_open_clip": median_and_spread(
                     [r["runs"]["open_clip"]["seconds_per_step"] / r["runs"][name]["seconds_per_step"] for r in used]),
                 "cpu_seconds_per_step": median_and_spread([r["runs"][name]["cpu_seconds_per_step"] for r in used]),
                 "peak_rss_mb": max(r["runs"][name]["peak_rss_bytes"] for r in used) / 2**20}
        if "NeuCLIP clip" in names:
            entry["throughput_vs_clip"] = median_and_spread(
                [r["runs"]["NeuCLIP clip"]["seconds_per_step"] / r["runs"][name]["seconds_per_step"] for r in used])
        estimator = [r["runs"][name]["estimator_seconds_per_step"] for r in used
                     if r["runs"][name]["estimator_seconds_per_step"] is not None]
        if estimator:
            entry["estimator_share"] = median_and_spread(
                [r["runs"][name]["estimator_seconds_per_step"] / r["runs"][name]["seconds_per_step"] for r in used])
        summary["variants"][name] = entry
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, batch 8, one round, 2 steps (a check that "
                                                             "the script runs; its timings are not recorded)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 8 32 (quick: 8)")
    parser.add_argument("--rounds", type=int, default=None, help="valid rounds wanted (default 5; quick 1)")
    parser.add_argument("--max_rounds", type=int, default=None, help="rounds tried at most (default 8; quick 1)")
    parser.add_argument("--max_other_load", type=float, default=default_max_other_load(),
                        help="CPU use of other processes (cores) above which a run does not count")
    parser.add_argument("--wait_for_quiet", type=float, default=None,
                        help="before each round, wait up to this many seconds for the machine to be quiet "
                             "(default 600 full, 0 quick)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help="measure only these (open_clip, NeuCLIP clip and NeuCLIP neuclip are always kept)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step of every variant in the first round")
    parser.add_argument("--open_clip_python", default=None, help="an interpreter that has open_clip")
    parser.add_argument("--open_clip_dir", default=f"~/.cache/neuclip_hf/open_clip-{OPEN_CLIP_VERSION}",
                        help="folder (outside the repository) that holds open_clip for this interpreter")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    preset = "tiny" if args.quick else "vit-b-32"
    batches = args.batches or ([8] if args.quick else [8, 32])
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.max_rounds = max(args.max_rounds or (1 if args.quick else 8), args.rounds)
    args.wait_for_quiet = (0 if args.quick else 600) if args.wait_for_quiet is None else args.wait_for_quiet
    steps, warmup = (2, 1) if args.quick else (3, 1)
    open_clip = open_clip_command(args)
    settings = {}
    for batch in batches:
        # The ablations only at the smallest batch, where the fixed per-step costs weigh most.
        names = [n for n in VARIANTS if (not VARIANTS[n].get("ablation") or batch == min(batches))
                 and (args.variants is None or n in args.variants or n in REQUIRED)]
        settings[str(batch)] = run_setting(preset, batch, names, steps if batch <= 8 else max(steps - 1, 2), warmup,
                                           args, open_clip)
    enough = all(s["valid_rounds"] >= args.rounds for s in settings.values())
    targets = {}
    for batch, setting in settings.items():
        variants = setting["summary"]["variants"]
        targets[f"NeuCLIP clip >= open_clip, batch {batch}"] = \
            variants["NeuCLIP clip"]["throughput_vs_open_clip"]["median"] >= 1.0
        targets[f"NeuCLIP neuclip within 2% of clip, batch {batch}"] = \
            variants["NeuCLIP neuclip"]["throughput_vs_clip"]["median"] >= 0.98
    payload = {"quick": args.quick, "preset": preset, "threads_per_run": 1,
               "text_length": PRESETS[preset]["text_config"]["max_position_embeddings"], "rounds_wanted": args.rounds,
               "max_other_load": args.max_other_load, "timings_valid": enough, "settings": settings,
               "targets": targets}
    # A full run without enough valid rounds records nothing: its rounds go to the ignored cache for inspection.
    out_dir = args.out_dir if enough or args.quick else BENCH / ".cache" / "openclip_step_contended"
    json_path = write_json("openclip_step", payload, out_dir)
    figure = _plot(settings, out_dir)
    if enough or args.quick:
        update_readme_section("openclip_step", _readme(payload, args), args.readme)
    else:
        print(f"only {[s['valid_rounds'] for s in settings.values()]} valid round(s) of {args.rounds}: the machine was "
              "busy, so nothing is recorded (results/ and the README are unchanged); every round is kept in "
              "benchmarks/.cache/openclip_step_contended/. Rerun on a quiet machine.")
    print(f"wrote {json_path.name} and {figure.name}")
    return payload


def _cell(stats: dict, scale: float = 1.0, percent: bool = False, digits: int = 2) -> str:
    """`median (min-max)` of a summary entry."""
    if stats is None or stats.get("median") is None:
        return ""
    if percent:
        return f"{100 * stats['median']:.1f}% ({100 * stats['min']:.1f}-{100 * stats['max']:.1f})"
    return f"{scale * stats['median']:.{digits}f} ({scale * stats['min']:.{digits}f}-{scale * stats['max']:.{digits}f})"


def _readme(payload: dict, args) -> str:
    env = environment()
    header = ["batch", "variant", "ms / step", "samples/s", "throughput vs open_clip", "vs NeuCLIP clip",
              "estimator share", "CPU ms / step", "peak RSS MB"]
    rows, rounds_line = [], []
    for batch, setting in payload["settings"].items():
        summary = setting["summary"]
        rounds_line.append(f"batch {batch}: {summary['rounds_used']} "
                           f"{'valid' if summary['from_valid_rounds'] else 'CONTENDED'} round(s)")
        for name, entry in summary["variants"].items():
            rows.append([batch, name, _cell(entry["seconds_per_step"], 1000, digits=0),
                         _cell(entry["samples_per_second"]), _cell(entry["throughput_vs_open_clip"]),
                         _cell(entry.get("throughput_vs_clip")), _cell(entry.get("estimator_share"), percent=True),
                         _cell(entry["cpu_seconds_per_step"], 1000, digits=0), round(entry["peak_rss_mb"])])
    status = ("" if payload["timings_valid"] else
              "\n**Not a recorded measurement**: a `--quick` run or a run without enough valid rounds (machine busy); "
              "the numbers below only show that the script works.\n")
    targets = "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in payload["targets"].items())
    profiles = _profile_table(payload)
    open_clip_model = ('`create_model("ViT-B-32")`' if payload["preset"] == "vit-b-32" else
                       f"a `CLIP` of the {payload['preset']} geometry")
    return f"""## openclip_step

`python benchmarks/openclip_step.py` (`--quick`: tiny preset, batch 8, one round; `--profile`: top operators).
One full optimizer step (forward, loss, backward, AdamW, temperature clamp) at {payload['preset']} geometry,
{payload['text_length']}-token captions, one torch thread per run, each run in its own process; rounds interleave
every variant in a rotating order and count only if every run had a core to itself (other processes used at most
{payload['max_other_load']:.2f} cores during it). Cells: median over the rounds (min-max); throughput ratios are
paired within each round. open_clip: {open_clip_model} + `ClipLoss` + torch's default AdamW, as its
`train_one_epoch`; ours: `Trainer` / `NeuCLIPTrainer` with their defaults (fused AdamW, SDPA attention, gradient
clipping at 1.0). Rounds: {'; '.join(rounds_line)}. Machine: {env['cpu']}, torch {env['torch']}, transformers
{env.get('transformers')}.
{status}
{markdown_table(header, rows)}

Targets: {targets}.
{profiles}
![throughput relative to open_clip](results/openclip_step.png)
"""


def _profile_table(payload: dict) -> str:
    """Where the time goes: shares of one profiled step per variant (first round; shares, not times)."""
    rows = []
    for batch, setting in payload["settings"].items():
        for name, run in setting["rounds"][0]["runs"].items():
            profile = run.get("profile")
            if not profile:
                continue
            total = profile["self_cpu_ms"]
            top = ", ".join(f"{op['op'].removeprefix('aten::')} {100 * op['self_ms'] / total:.0f}%"
                            for op in profile["top_ops"][:4])
            rows.append([batch, name, f"{100 * profile['optimizer_step_ms'] / total:.1f}%",
                         f"{100 * profile['normalizer_update_ms'] / total:.1f}%", top])
    if not rows:
        return ""
    table = markdown_table(["batch", "variant", "optimizer step", "estimator update", "top operators (self time)"],
                           rows)
    return f"\nOne profiled step per variant (`--profile`, first round), shares of the step's CPU time:\n\n{table}\n"


def _plot(settings: dict, out_dir) -> Path:
    fig, axes = subplots(len(settings), (6 * len(settings), 4))
    for ax, (batch, setting) in zip(axes, settings.items()):
        variants = setting["summary"]["variants"]
        names = list(variants)
        medians = [variants[n]["throughput_vs_open_clip"]["median"] for n in names]
        low = [m - variants[n]["throughput_vs_open_clip"]["min"] for m, n in zip(medians, names)]
        high = [variants[n]["throughput_vs_open_clip"]["max"] - m for m, n in zip(medians, names)]
        ax.barh(range(len(names)), medians, xerr=[low, high], color="tab:blue", capsize=3)
        ax.axvline(1.0, color="gray", linewidth=1)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel("throughput / open_clip (median, min-max)")
        ax.set_title(f"{setting['preset']}, batch {batch}, {setting['summary']['rounds_used']} round(s)")
    return save_figure(fig, "openclip_step", out_dir)


if __name__ == "__main__":
    main()
