"""What do gradient checkpointing and torch.compile buy on a training step, and where does compile break the graph?

Side by side in one run, each measurement in its own process with one torch thread:
  - `--activation_checkpointing` (transformers' activation checkpointing of every encoder layer): peak resident memory
    of a full NeuCLIPTrainer step with and without it at ViT-B/32 geometry (224 px, 77-token captions), and the
    step-time ratio it costs (the layers' forward runs twice);
  - `--torch_compile` (inductor, through the Trainer / accelerate): the graphs and graph breaks of the training
    forward of every objective (`torch._dynamo.explain`, tiny preset: the towers' structure does not change them),
    and the step-time ratio of the compiled step on this CPU, compile time kept apart.

Timings come from interleaved rounds that count only when every run had a core to itself (`openclip_step.py`
explains the rule); memory does not depend on the machine's load. The bf16-autocast step is checked in
`tests/test_training_modes.py` (CPU) and on a GPU by `gpu.py`.

    python benchmarks/training_modes.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
from neuclip_hf import OBJECTIVES, NeuCLIPModel  # noqa: E402
from neuclip_hf.presets import PRESETS, model_config  # noqa: E402

NEUCLIP_OVERRIDES = {"neuclip_num_prototypes": 4096}
PARTS = ("graph_breaks", "checkpointing", "compile")


def graph_breaks(objective: str, preset: str = "tiny", batch_size: int = 8) -> dict:
    """Dynamo's graphs and graph breaks of one training forward (estimator update and loss included)."""
    from benchmarks.throughput import SyntheticPairs

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    config = model_config(preset, objective=objective, fastclip_dataset_size=64, train_num_samples=64,
                          neuclip_num_prototypes=64)
    model = NeuCLIPModel(config).train()
    data = SyntheticPairs(config, batch_size)
    batch = {"pixel_values": data.pixels, "input_ids": data.ids, "sample_ids": torch.arange(batch_size)}
    explanation = torch._dynamo.explain(model)(**batch, return_loss=True, update_normalizer=True)
    where = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        location = f"{_relative(frame.filename)}:{frame.lineno}" if frame is not None else "?"
        where.append({"reason": reason.reason.splitlines()[0], "at": location})
    counted = torch._dynamo.utils.counters["graph_break"]
    reasons = Counter({key.splitlines()[0]: count for key, count in counted.items()})
    return {"objective": objective, "graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "break_reasons": dict(reasons.most_common()), "break_locations": _unique(where)}


def _relative(path: str) -> str:
    """A source path relative to the repository or to site-packages (no local absolute path is recorded)."""
    path = Path(path)
    for base in (ROOT, Path(torch.__file__).parents[1]):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return path.name


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = (row["reason"], row["at"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def measure(spec: dict, max_other_load: float) -> dict:
    """One `throughput.measure` run in its own process (one thread), with its load verdict."""
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--worker", json.dumps(spec)]
    result, load = run_alone(command, env=dict(os.environ, OMP_NUM_THREADS="1"), max_other_load=max_other_load)
    result["load"] = load
    return result


def paired_rounds(variants: dict[str, dict], rounds: int, max_rounds: int, args) -> dict:
    """Interleaved rounds of `variants` (name -> measure spec) until `rounds` valid ones (or `max_rounds`)."""
    names = list(variants)
    done, valid = interleaved_rounds(names, lambda name, _: measure(variants[name], args.max_other_load), rounds,
                                     max_rounds, args.max_other_load, args.wait_for_quiet)
    used = [r for r in done if r["valid"]] or done
    summary = {name: {"seconds_per_step": median_and_spread([r["runs"][name]["seconds_per_step"] for r in used]),
                      "first_step_seconds": median_and_spread([r["runs"][name]["first_step_seconds"] for r in used]),
                      "peak_rss_mb": median_and_spread([r["runs"][name]["peak_rss_bytes"] / 2**20 for r in used])}
               for name in names}
    return {"rounds": done, "valid_rounds": valid, "from_valid_rounds": any(r["valid"] for r in done),
            "summary": summary, "names": names}


def ratio(setting: dict, numerator: str, denominator: str) -> dict:
    """Per-round time ratio numerator / denominator, summarised (paired within rounds)."""
    used = [r for r in setting["rounds"] if r["valid"]] or setting["rounds"]
    return median_and_spread([r["runs"][numerator]["seconds_per_step"] / r["runs"][denominator]["seconds_per_step"]
                              for r in used])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, one round, 2 steps (a check that the "
                                                             "script runs; its timings are not recorded)")
    parser.add_argument("--rounds", type=int, default=None, help="valid rounds wanted (default 3; quick 1)")
    parser.add_argument("--max_rounds", type=int, default=None, help="rounds tried at most (default 8; quick 1)")
    parser.add_argument("--max_other_load", type=float, default=default_max_other_load())
    parser.add_argument("--wait_for_quiet", type=float, default=None, help="seconds (default 600 full, 0 quick)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="what to run (default all); memory and graph breaks do not depend on the machine's load")
    parser.add_argument("--out_dir", default=None)
    parser.add_argument("--readme", default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    max_rounds = max(args.max_rounds or (1 if args.quick else 8), rounds)
    args.wait_for_quiet = (0 if args.quick else 600) if args.wait_for_quiet is None else args.wait_for_quiet

    breaks = {}
    if "graph_breaks" in args.parts:
        print("graph breaks (torch._dynamo.explain) ...")
        breaks = {objective: graph_breaks(objective) for objective in OBJECTIVES}

    # Gradient checkpointing: memory at ViT-B/32 geometry (the tiny preset in --quick), clip and neuclip.
    preset = "tiny" if args.quick else "vit-b-32"
    text_length = PRESETS[preset]["text_config"]["max_position_embeddings"]
    memory_batch = 8 if args.quick else 32
    base = {"preset": preset, "batch_size": memory_batch, "steps": 1 if args.quick else 2, "warmup": 1,
            "device": "cpu", "text_length": text_length, "threads": 1}
    checkpointing_variants = {}
    for objective in ("clip", "neuclip"):
        overrides = NEUCLIP_OVERRIDES if objective == "neuclip" and not args.quick else None
        for flag in (False, True):
            checkpointing_variants[f"{objective}{', checkpointing' if flag else ''}"] = {
                **base, "kind": objective, "overrides": overrides, **({"gradient_checkpointing": True} if flag else {})}
    checkpointing = None
    if "checkpointing" in args.parts:
        print(f"gradient checkpointing, {preset} batch {memory_batch} ...")
        checkpointing = paired_rounds(checkpointing_variants, rounds, max_rounds, args)

    # torch.compile: step-time ratio on this CPU (inductor), tiny preset at batch 128 and ViT-B/32 at batch 8.
    compile_settings = [("tiny", 8 if args.quick else 128)] + ([] if args.quick else [("vit-b-32", 8)])
    compile_settings = compile_settings if "compile" in args.parts else []
    compiled = {}
    for compile_preset, batch in compile_settings:
        spec = {"preset": compile_preset, "batch_size": batch, "steps": 2 if args.quick else 5,
                "warmup": 2, "device": "cpu", "threads": 1,
                "text_length": PRESETS[compile_preset]["text_config"]["max_position_embeddings"]}
        variants = {}
        for objective in ("clip",) if args.quick else ("clip", "neuclip"):
            overrides = NEUCLIP_OVERRIDES if objective == "neuclip" and compile_preset == "vit-b-32" else None
            variants[objective] = {**spec, "kind": objective, "overrides": overrides}
            variants[f"{objective}, compiled"] = {**spec, "kind": objective, "overrides": overrides,
                                                  "torch_compile": True}
        print(f"torch.compile, {compile_preset} batch {batch} ...")
        compiled[f"{compile_preset}@{batch}"] = paired_rounds(variants, rounds, max_rounds, args)

    payload = {"quick": args.quick, "parts": args.parts, "max_other_load": args.max_other_load,
               "graph_breaks": breaks, "checkpointing": None, "compile": compiled}
    if checkpointing is not None:
        checkpointing["ratios"] = {
            objective: {"step_time": ratio(checkpointing, f"{objective}, checkpointing", objective),
                        "peak_rss": _rss_ratio(checkpointing, f"{objective}, checkpointing", objective)}
            for objective in ("clip", "neuclip")}
        payload["checkpointing"] = {"preset": preset, "batch_size": memory_batch, **checkpointing}
    for setting in compiled.values():
        setting["ratios"] = {name: ratio(setting, f"{name}, compiled", name)
                             for name in setting["names"] if not name.endswith("compiled")}
    timed = [payload["checkpointing"]] * (checkpointing is not None) + list(compiled.values())
    payload["timings_valid"] = bool(timed) and all(s["from_valid_rounds"] for s in timed) and not args.quick
    json_path = write_json("training_modes", payload, args.out_dir)
    figure = _plot(payload, args.out_dir)
    update_readme_section("training_modes", _readme(payload), args.readme)
    print(f"wrote {json_path} and {figure}")
    return payload


def _rss_ratio(setting: dict, numerator: str, denominator: str) -> dict:
    used = [r for r in setting["rounds"] if r["valid"]] or setting["rounds"]
    return median_and_spread([r["runs"][numerator]["peak_rss_bytes"] / r["runs"][denominator]["peak_rss_bytes"]
                              for r in used])


def _spread(stats: dict, digits: int = 2, scale: float = 1.0) -> str:
    if stats["n"] == 1:
        return f"{scale * stats['median']:.{digits}f}"
    return f"{scale * stats['median']:.{digits}f} ({scale * stats['min']:.{digits}f}-{scale * stats['max']:.{digits}f})"


def _checkpointing_block(check: dict | None) -> str:
    if check is None:
        return "**Gradient checkpointing**: not run (`--parts`)."
    memory_rows = [[name, _spread(entry["peak_rss_mb"], 0), _spread(entry["seconds_per_step"], 0, 1000)]
                   for name, entry in check["summary"].items()]
    ratio_rows = [[objective, _spread(r["peak_rss"]), _spread(r["step_time"])]
                  for objective, r in check["ratios"].items()]
    return f"""**Gradient checkpointing** (`--activation_checkpointing`, every encoder layer recomputed in the backward),
{check['preset']} geometry, batch {check['batch_size']}, full NeuCLIPTrainer step with fused AdamW; rounds:
{'valid' if check['from_valid_rounds'] else 'CONTENDED (step times not a measurement)'}:

{markdown_table(['variant', 'peak RSS MB', 'ms / step'], memory_rows)}

{markdown_table(['objective', 'peak RSS with / without', 'step time with / without'], ratio_rows)}"""


def _compile_block(compiled: dict) -> str:
    if not compiled:
        return "**torch.compile step time**: not run (`--parts`)."
    rows = []
    for key, setting in compiled.items():
        for name, stats in setting["ratios"].items():
            first = setting["summary"][f"{name}, compiled"]["first_step_seconds"]
            rows.append([key, name, _spread(stats), _spread(first, 1),
                         "valid" if setting["from_valid_rounds"] else "CONTENDED"])
    header = ["preset @ batch", "objective", "compiled / eager step time", "first step s (compile)", "rounds"]
    return f"""**torch.compile** (`--torch_compile`, inductor, through the Trainer): step time of the compiled step over
the eager one after 2 warm-up steps (compile time is the first step's):

{markdown_table(header, rows)}"""


def _breaks_block(breaks: dict) -> str:
    if not breaks:
        return "**Graph breaks**: not run (`--parts`)."
    rows = []
    for objective, entry in breaks.items():
        reasons = "; ".join(f"{reason} (x{count})" for reason, count in entry["break_reasons"].items())
        rows.append([objective, entry["graphs"], entry["graph_breaks"], reasons])
    locations = sorted({f"`{row['at']}`: {row['reason']}" for entry in breaks.values()
                        for row in entry["break_locations"]})
    return f"""Graphs and graph breaks of the training forward (`torch._dynamo.explain`, estimator update and loss
included):

{markdown_table(['objective', 'graphs', 'graph breaks', 'break reasons (count)'], rows)}

Where they break: {'; '.join(locations) or 'nowhere'}."""


def _readme(payload: dict) -> str:
    env = environment()
    status = ("" if payload["timings_valid"] else
              "\n**Timings not recorded**: a `--quick` run, a partial run, or rounds without a core to themselves (the "
              "machine was busy); the memory columns and the graph breaks do not depend on the load.\n")
    return f"""## training_modes

`python benchmarks/training_modes.py` (`--quick`: tiny preset, one round). Each run is a fresh process with one torch
thread; rounds interleave the variants and timings count only from rounds where every run had a core to itself
(other processes <= {payload['max_other_load']:.2f} cores). Cells: median (min-max) over the rounds used.
Machine: {env['cpu']}, torch {env['torch']}, transformers {env.get('transformers')}.
{status}
{_checkpointing_block(payload['checkpointing'])}

{_compile_block(payload['compile'])}

{_breaks_block(payload['graph_breaks'])}

![checkpointing memory and compile ratios](results/training_modes.png)
"""


def _plot(payload: dict, out_dir) -> Path:
    fig, axes = subplots(2, (11, 4))
    if payload["checkpointing"] is not None:
        summary = payload["checkpointing"]["summary"]
        names = list(summary)
        axes[0].bar(range(len(names)), [summary[n]["peak_rss_mb"]["median"] for n in names], color="tab:blue")
        axes[0].set_xticks(range(len(names)), names, rotation=20)
        check = payload["checkpointing"]
        axes[0].set_title(f"peak RSS MB, {check['preset']} batch {check['batch_size']}")
    labels, values = [], []
    for key, setting in payload["compile"].items():
        for name, stats in setting["ratios"].items():
            labels.append(f"{name}\n{key}")
            values.append(stats["median"])
    axes[1].bar(range(len(values)), values, color="tab:orange")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[1].set_xticks(range(len(labels)), labels)
    axes[1].set_title("compiled / eager step time")
    return save_figure(fig, "training_modes", out_dir)


if __name__ == "__main__":
    main()
