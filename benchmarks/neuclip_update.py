"""What NeuCLIP's estimator update costs per training step, and how much of it does not depend on the batch.

Times `PrototypeNormalizer.update` alone (m = 4,096 prototypes, T_u = 10 inner AdaGrad steps, d = 512, as the paper)
on frozen unit embeddings at several global batch sizes, in one process with one thread. Work that does not scale
with the batch (the m x d passes over the prototypes and AdaGrad's state in every inner step) shows up as the time
at the smallest batch. Each `--label` is stored beside the others in `results/neuclip_update.json`, so a run of an
older checkout (label `before`) and of this one (label `after`) sit side by side in the README table;
runs of one label add up, so alternating rounds of the two checkouts share the machine's load fairly.

    OMP_NUM_THREADS=1 python benchmarks/neuclip_update.py --label after [--quick] [--batches 8 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    environment,
    markdown_table,
    median_and_spread,
    update_readme_section,
)
from neuclip_hf.normalizers import build_normalizer  # noqa: E402
from neuclip_hf.objectives import NormalizerInputs  # noqa: E402
from neuclip_hf.presets import model_config  # noqa: E402

EMBED_DIM, PROTOTYPES, INNER_STEPS = 512, 4096, 10
NAME = "neuclip_update"


def update_times(batch_size: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` updates (after one warm-up) on one fixed batch; no restart inside the timed ones."""
    import time

    config = model_config("tiny", objective="neuclip", projection_dim=EMBED_DIM, neuclip_num_prototypes=PROTOTYPES,
                          neuclip_inner_steps=INNER_STEPS, neuclip_restart_period=10**6,
                          text_config={"projection_dim": EMBED_DIM}, vision_config={"projection_dim": EMBED_DIM})
    normalizer = build_normalizer(config)
    normalizer.reset_parameters()
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(batch_size, EMBED_DIM, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch_size, EMBED_DIM, generator=generator), dim=-1)
    inputs = NormalizerInputs.from_embeddings(image, text, torch.tensor(0.07), 1e-6)
    normalizer.update(inputs)  # warm-up (and the step-0 restart)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        normalizer.update(inputs)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this run in the results (e.g. before / after)")
    parser.add_argument("--quick", action="store_true", help="batches 8 and 256, 3 repeats")
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--readme", default=None, help="README to update (default benchmarks/README.md)")
    parser.add_argument("--batches", type=int, nargs="*", help="global batch sizes (default: 8 256 1024)")
    parser.add_argument("--description", help="what code this label times (kept with the label, shown in the README)")
    parser.add_argument("--repeats", type=int, help="timed updates per batch size in this run (default 5, quick 3)")
    args = parser.parse_args(argv)
    batches = args.batches or ([8, 256] if args.quick else [8, 256, 1024])
    repeats = args.repeats or (3 if args.quick else 5)
    path = Path(args.out_dir) / f"{NAME}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"benchmark": NAME, "runs": {}}
    run = payload["runs"].setdefault(args.label, {"batches": {}})  # batches not run now keep their earlier numbers
    run["environment"] = environment()
    if args.description:
        run["description"] = args.description
    for batch_size in batches:
        # Runs of the same label add up, so labels can be run in alternating rounds under the same load.
        times = run["batches"].get(str(batch_size), {}).get("seconds", []) + update_times(batch_size, repeats)
        run["batches"][str(batch_size)] = {"seconds": times, **median_and_spread(times)}
        print(f"{args.label} batch {batch_size}: median {run['batches'][str(batch_size)]['median'] * 1e3:.1f} ms")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload["environment"] = run["environment"]  # of the latest run; each run keeps its own
    payload["settings"] = {"embed_dim": EMBED_DIM, "num_prototypes": PROTOTYPES, "inner_steps": INNER_STEPS}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    write_readme(payload, args.readme)
    return payload


def write_readme(payload: dict, readme: str | None = None) -> None:
    rows = []
    for label, run in payload["runs"].items():
        for batch, stats in run["batches"].items():
            rows.append([label, batch, f"{stats['median'] * 1e3:.0f}",
                         f"{stats['iqr'][0] * 1e3:.0f}-{stats['iqr'][1] * 1e3:.0f}",
                         f"{stats['min'] * 1e3:.0f}-{stats['max'] * 1e3:.0f}", stats["n"]])
    labels = "\n".join(f"- `{label}`: {run.get('description', '(no description recorded)')}"
                       for label, run in payload["runs"].items())
    body = (
        f"## {NAME}\n\n`OMP_NUM_THREADS=1 python benchmarks/neuclip_update.py --label <name>`. NeuCLIP's estimator update "
        f"alone (m = {PROTOTYPES}, T_u = {INNER_STEPS}, d = {EMBED_DIM}) on one thread, per training step. Labels that "
        "are compared ran in alternating rounds of their two checkouts; see `docs/scale.md` for what changed.\n\n"
        + labels + "\n\n"
        + markdown_table(["code", "global batch", "median ms", "IQR ms", "min-max ms", "runs"], rows)
        + "\n\nResults: `results/neuclip_update.json`."
    )
    update_readme_section(NAME, body, readme)


if __name__ == "__main__":
    main()
