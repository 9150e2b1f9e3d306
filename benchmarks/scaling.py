"""Per-rank cost of the batch statistics and the estimator updates against the world size, at a fixed global batch.

Measured here (gloo, one thread per rank, W = 1, 2, 4 processes; 4 ranks share 2 cores, so the per-rank numbers are
CPU seconds of the rank's own process, not wall time):
  - the CPU time of `NormalizerInputs.from_batch` (the rank's L x B statistics and the gather of B-vectors) and of
    `normalizer.update` (NeuCLIP m = 4,096, T_u = 10, d = 512 under each of its three update splits; AmorLIP;
    FastCLIP), medians with spread;
  - their FLOPs per rank (torch's FlopCounterMode) and the bytes the update all-reduces and all-gathers per step;
  - the rank's peak memory (RSS high-water mark above its state before its first step) and the counted bytes of
    its statistics (two L x B fp32 blocks, against the B x B matrix every rank formed before).
Projected (no GPU here): per-rank time at 8 x H100 and 8 nodes x 8 for global batch 4,096 and 32,768 of NeuCLIP's
update under each split, from the counted FLOPs, the element-wise passes over its blocks and prototypes (counted
from the code), the collectives' bytes and stated hardware assumptions, as a share of a ViT-B/32 training step
(43.4 GFLOP per pair, counted in `estimator_overhead`).

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    RESULTS,
    markdown_table,
    median_and_spread,
    save_figure,
    subplots,
    update_readme_section,
    write_json,
)

NAME = "scaling"
EMBED_DIM = 512
# Each measured run: its objective and config overrides. `neuclip` is the default prototype split.
RUNS = {
    "fastclip": ("fastclip", {}),
    "amorlip": ("amorlip", {}),
    "neuclip": ("neuclip", {}),
    "neuclip anchors": ("neuclip", {"neuclip_update_sharding": "anchors"}),
    "neuclip replicated": ("neuclip", {"neuclip_update_sharding": "replicated"}),
}
NEUCLIP_SPLITS = {"prototypes": "neuclip", "anchors": "neuclip anchors", "replicated": "neuclip replicated"}
WORLD_SIZES = (1, 2, 4)
VIT_B32_FLOPS_PER_PAIR = 43.4e9  # forward + backward of both towers, counted in benchmarks/estimator_overhead.py
# Stated assumptions of the projection (H100 SXM, dense): bf16 and TF32 tensor-core peaks, fp32 without tensor cores,
# the MFU a ViT-B/32 CLIP step reaches, the efficiency of the estimator's large fp32 GEMMs, the HBM bandwidth its
# element-wise passes reach (80% of 3.35 TB/s), NCCL bus bandwidth inside one NVLink node and across nodes (400 Gb/s
# InfiniBand per GPU), and a per-collective latency.
H100 = {"bf16_flops": 989e12, "tf32_flops": 495e12, "fp32_flops": 67e12, "encoder_mfu": 0.4, "gemm_efficiency": 0.6,
        "hbm_bytes_per_s": 0.8 * 3.35e12, "nvlink_bus_bytes_per_s": 350e9, "infiniband_bus_bytes_per_s": 45e9,
        "collective_latency_s": 20e-6}
# fp32 element transfers (reads + writes) of the element-wise work per inner step and direction, counted from
# `PrototypeNormalizer.objective_and_gradients` and its fused AdaGrad step: per entry of the (L, m_r) block of scores
# and per entry of the (m_r, d) prototypes, for the large-block way and the small-block way (`radial_from_block`).
# Large block: GEMM write, max, shift, exp, row sum, gradient GEMM read (+2 when the row weights go on the block, d >
# m_r); prototypes: norms, scaled copy and its GEMM read, gradient write, radial dot product, subtraction, scaling,
# AdaGrad (param, grad, sum read; param, sum written). Small block: also the cosine scaling, the shifted copy and its
# division, the row weights, the radial product and sum, the column scaling; prototypes: norms, GEMM read, the scaled
# copy into the gradient, the accumulating GEMM's read and write, AdaGrad.
BLOCK_TRANSFERS = {"large": 8, "small": 22}
PROTOTYPE_TRANSFERS = {"large": 17, "small": 11}
STATISTICS_TRANSFERS = 9  # per entry of the rank's two (L, B) similarity blocks: GEMM write, shift, scale, mask, LSE


def settings(quick: bool) -> dict:
    if quick:
        return {"global_batch": 64, "num_prototypes": 256, "inner_steps": 2, "repeats": 2}
    return {"global_batch": 512, "num_prototypes": 4096, "inner_steps": 10, "repeats": 3}


def build_model(run: str, config: dict):
    from neuclip_hf import NeuCLIPModel
    from neuclip_hf.presets import model_config

    objective, overrides = RUNS[run]
    batch = config["global_batch"]
    model_settings = model_config(
        "tiny", objective=objective, **overrides, projection_dim=EMBED_DIM,
        neuclip_num_prototypes=config["num_prototypes"],
        neuclip_inner_steps=config["inner_steps"], neuclip_restart_period=10**6, fastclip_dataset_size=100 * batch,
        train_num_samples=100 * batch, text_config={"projection_dim": EMBED_DIM},
        vision_config={"projection_dim": EMBED_DIM})
    torch.manual_seed(0)
    return NeuCLIPModel(model_settings)


def measure_rank(run: str, config: dict) -> dict:
    """This rank's costs for one run: statistics and update CPU time, FLOPs, collectives' bytes, memory."""
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from neuclip_hf.distributed import rank_and_world_size
    from neuclip_hf.objectives import ContrastiveBatch, NormalizerInputs

    rank, world_size = rank_and_world_size()
    batch = config["global_batch"]
    rows = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    model = build_model(run, config)
    normalizer = model.normalizer
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(batch, EMBED_DIM, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch, EMBED_DIM, generator=generator), dim=-1)
    ids = torch.arange(batch)
    contrastive = ContrastiveBatch.gather(image[rows], text[rows], model.logit_scale.detach(), ids[rows])
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and batch built, no step run yet
    normalizer.update(NormalizerInputs.from_batch(contrastive, model.config.eps))  # warm-up, step-0 restart
    sent = {"all_reduce": [], "all_gather": []}
    original_all_reduce, original_all_gather = dist.all_reduce, dist.all_gather

    def counting_all_reduce(tensor, *args, **kwargs):  # the bytes an update sends through all-reduce
        sent["all_reduce"].append(tensor.numel() * tensor.element_size())
        return original_all_reduce(tensor, *args, **kwargs)

    def counting_all_gather(outputs, tensor, *args, **kwargs):  # this rank's part of an all-gather (floats only:
        if tensor.is_floating_point():  # not the row counts `gather_no_grad` exchanges first)
            sent["all_gather"].append(tensor.numel() * tensor.element_size())
        return original_all_gather(outputs, tensor, *args, **kwargs)

    statistics_s, update_s = [], []
    for _ in range(config["repeats"]):
        start = time.process_time()
        # A fresh copy of the batch each time: a ContrastiveBatch keeps the blocks it has computed (for the loss).
        inputs = NormalizerInputs.from_batch(dataclasses.replace(contrastive), model.config.eps)
        statistics_s.append(time.process_time() - start)
        start = time.process_time()
        dist.all_reduce, dist.all_gather = counting_all_reduce, counting_all_gather
        try:
            normalizer.update(inputs)
        finally:
            dist.all_reduce, dist.all_gather = original_all_reduce, original_all_gather
        update_s.append(time.process_time() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with FlopCounterMode(display=False) as counter:
        inputs = NormalizerInputs.from_batch(dataclasses.replace(contrastive), model.config.eps)
    statistics_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        normalizer.update(inputs)
    local = rows.stop - rows.start
    return {
        "rank": rank, "world_size": world_size, "local_batch": local,
        "statistics_cpu_s": median_and_spread(statistics_s), "update_cpu_s": median_and_spread(update_s),
        "statistics_flops": statistics_flops, "update_flops": counter.get_total_flops(),
        "update_all_reduce_bytes": sum(sent["all_reduce"]) / config["repeats"],
        "update_all_gather_bytes": sum(sent["all_gather"]) / config["repeats"],
        "peak_rss_increase_mib": (peak_rss - baseline_rss) / 1024,  # ru_maxrss is in KiB on Linux
        "statistics_bytes": 2 * local * batch * 4,  # the two (L, B) fp32 blocks
        "full_matrix_bytes": batch * batch * 4,  # the B x B matrix every rank formed before
    }


def worker(rank: int, world_size: int, port: int, config: dict, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {run: measure_rank(run, config) for run in RUNS}
        Path(out_dir, f"world{world_size}_rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_world(world_size: int, config: dict, timeout: float) -> list[dict]:
    """One spawned gloo run; raises if it does not finish within `timeout` seconds (its processes are killed)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(worker, args=(world_size, port, config, out_dir), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} gloo ranks did not finish within {timeout:.0f} s")
        return [json.loads(Path(out_dir, f"world{world_size}_rank{r}.json").read_text()) for r in range(world_size)]


# -- counted FLOPs and bytes, and the projection ------------------------------------------------------------------
def statistics_flops(local: int, batch: int, dim: int) -> float:
    """Two (L, d) x (d, B) products (the rank's similarity blocks)."""
    return 2 * 2 * local * batch * dim


def neuclip_work(split: str, batch: int, world_size: int, rank: int = 0, prototypes: int = 4096) -> tuple[int, int]:
    """(anchor rows, prototype rows) of one rank's NeuCLIP inner step under `split` (rank `rank`'s block)."""
    from neuclip_hf.distributed import row_blocks

    if world_size == 1 or split == "replicated":
        return batch, prototypes
    if split == "anchors":
        block = row_blocks(batch, world_size)[rank]
        return block.stop - block.start, prototypes
    block = row_blocks(prototypes, world_size)[rank]
    return batch, block.stop - block.start


def neuclip_update_flops(anchors: int, prototypes: int, dim: int, inner_steps: int) -> float:
    """Per inner step and direction, the (L, d) x (d, m_r) scores and the (m_r, L) x (L, d) gradient GEMM."""
    return inner_steps * 2 * 2 * (2 * anchors * prototypes * dim)


def neuclip_collective_bytes(split: str, batch: int, world_size: int, prototypes: int, dim: int,
                             inner_steps: int) -> tuple[float, float]:
    """(all-reduced, all-gathered) bytes this rank sends per update: the anchor split all-reduces the (2 m d + 1)
    fp32 gradient buffer per inner step; the prototype split all-reduces 2 B float64 partial sums per inner step and
    all-gathers its block of W1, W2 and their AdaGrad sums (4 d fp32 per row, blocks padded to the largest) once."""
    if world_size == 1 or split == "replicated":
        return 0.0, 0.0
    if split == "anchors":
        return inner_steps * (2 * prototypes * dim + 1) * 4, 0.0
    largest = -(-prototypes // world_size)
    return inner_steps * 2 * batch * 8, largest * 4 * dim * 4


def collective_seconds(kind: str, size_bytes: float, count: int, world_size: int, bus_bytes_per_s: float) -> float:
    """Ring collectives: an all-reduce moves 2 (W - 1) / W of its bytes over the bus, an all-gather (W - 1) of each
    rank's part; plus a latency per collective."""
    if world_size == 1 or count == 0:
        return 0.0
    moved = 2 * (world_size - 1) / world_size * size_bytes if kind == "all_reduce" else (world_size - 1) * size_bytes
    return moved / bus_bytes_per_s + count * H100["collective_latency_s"]


def neuclip_projection(split: str, batch: int, world_size: int, nodes: int, prototypes: int, inner_steps: int,
                       precision: str) -> dict:
    """Projected per-rank seconds of NeuCLIP's update under `split`: GEMMs, element-wise passes, collectives."""
    from neuclip_hf.normalizer_neuclip import radial_from_block

    anchors, rows = neuclip_work(split, batch, world_size, prototypes=prototypes)
    way = "small" if radial_from_block(anchors, EMBED_DIM) else "large"
    block_transfers = BLOCK_TRANSFERS[way] + (2 if way == "large" and EMBED_DIM > rows else 0)
    transfers = 2 * inner_steps * (block_transfers * anchors * rows + PROTOTYPE_TRANSFERS[way] * rows * EMBED_DIM)
    gemm_s = neuclip_update_flops(anchors, rows, EMBED_DIM, inner_steps) / (
        H100[f"{precision}_flops"] * H100["gemm_efficiency"])
    memory_s = transfers * 4 / H100["hbm_bytes_per_s"]
    reduced, gathered = neuclip_collective_bytes(split, batch, world_size, prototypes, EMBED_DIM, inner_steps)
    bus = H100["nvlink_bus_bytes_per_s"] if nodes == 1 else H100["infiniband_bus_bytes_per_s"]
    communication_s = (collective_seconds("all_reduce", reduced, inner_steps if reduced else 0, world_size, bus)
                       + collective_seconds("all_gather", gathered, 1 if gathered else 0, world_size, bus))
    return {"gemm_ms": gemm_s * 1e3, "memory_ms": memory_s * 1e3, "communication_ms": communication_s * 1e3,
            "all_reduce_mib": reduced / 2**20, "all_gather_mib": gathered / 2**20,
            "update_ms": (gemm_s + memory_s + communication_s) * 1e3, "way": way}


def projection(batch: int, world_size: int, prototypes: int = 4096, inner_steps: int = 10, nodes: int = 1) -> dict:
    """One setting's per-rank statistics and NeuCLIP update under each split, against the ViT-B/32 step."""
    local = batch // world_size
    stats = statistics_flops(local, batch, EMBED_DIM)
    encoder_s = local * VIT_B32_FLOPS_PER_PAIR / (H100["bf16_flops"] * H100["encoder_mfu"])
    row = {"global_batch": batch, "world_size": world_size, "nodes": nodes, "local_batch": local,
           "statistics_gflop": stats / 1e9, "statistics_mib": 2 * local * batch * 4 / 2**20,
           "full_matrix_mib": batch * batch * 4 / 2**20, "vit_b32_step_ms": encoder_s * 1e3, "splits": {}}
    for precision in ("tf32", "fp32"):
        statistics_s = (stats / (H100[f"{precision}_flops"] * H100["gemm_efficiency"])
                        + STATISTICS_TRANSFERS * 2 * local * batch * 4 / H100["hbm_bytes_per_s"])
        row[f"statistics_ms_{precision}"] = statistics_s * 1e3
        for split in NEUCLIP_SPLITS:
            update = neuclip_projection(split, batch, world_size, nodes, prototypes, inner_steps, precision)
            # The statistics are the loss's own blocks (shared since `from_batch` reuses them): not the estimator's.
            update["share"] = update["update_ms"] / 1e3 / encoder_s
            row["splits"][f"{split}_{precision}"] = update
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="global batch 64, m = 256, T_u = 2 (a smoke run)")
    parser.add_argument("--out_dir", type=Path, default=RESULTS)
    parser.add_argument("--readme", default=None, help="README to update (default benchmarks/README.md)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per world size before it fails")
    args = parser.parse_args(argv)
    config = settings(args.quick)
    measured = {}
    for world_size in WORLD_SIZES:
        measured[str(world_size)] = run_world(world_size, config, args.timeout)
        print(f"world size {world_size}: done")
    checks = formula_checks(measured, config)
    projected = [projection(batch, 8) for batch in (4096, 32768)]
    projected += [projection(batch, 64, nodes=8) for batch in (4096, 32768)]
    payload = {"quick": args.quick, "settings": config, "measured": measured, "formula_checks": checks,
               "assumptions": H100, "projection": projected}
    write_json(NAME, payload, args.out_dir)
    plot(measured, args.out_dir)
    write_readme(payload, args.readme)
    return payload


def formula_checks(measured: dict, config: dict) -> list[dict]:
    """Every measured NeuCLIP rank's counted FLOPs and collective bytes against the formulas the projection uses."""
    rows = []
    for world_size, ranks in measured.items():
        for split, run in NEUCLIP_SPLITS.items():
            for rank_index, rank in enumerate(ranks):
                counted = rank[run]
                anchors, prototype_rows = neuclip_work(split, config["global_batch"], int(world_size), rank_index,
                                                       config["num_prototypes"])
                reduced, gathered = neuclip_collective_bytes(split, config["global_batch"], int(world_size),
                                                             config["num_prototypes"], EMBED_DIM, config["inner_steps"])
                rows.append({
                    "world_size": int(world_size), "rank": rank_index, "split": split,
                    "update_flops_counted": counted["update_flops"],
                    "update_flops_formula": neuclip_update_flops(anchors, prototype_rows, EMBED_DIM,
                                                                 config["inner_steps"]),
                    "statistics_flops_counted": counted["statistics_flops"],
                    "statistics_flops_formula": statistics_flops(counted["local_batch"], config["global_batch"],
                                                                 EMBED_DIM),
                    "all_reduce_bytes_counted": counted["update_all_reduce_bytes"],
                    "all_reduce_bytes_formula": reduced,
                    "all_gather_bytes_counted": counted["update_all_gather_bytes"],
                    "all_gather_bytes_formula": gathered,
                })
    return rows


def formulas_agree(checks: list[dict]) -> bool:
    keys = ("update_flops", "statistics_flops", "all_reduce_bytes", "all_gather_bytes")
    return all(c[f"{key}_counted"] == c[f"{key}_formula"] for c in checks for key in keys)


def per_world(measured: dict, run: str, key: str) -> list[float]:
    """The median over ranks of one per-rank number, for each world size."""
    values = []
    for world_size in map(str, WORLD_SIZES):
        per_rank = [r[run][key] for r in measured[world_size]]
        per_rank = [v["median"] if isinstance(v, dict) else v for v in per_rank]
        values.append(statistics.median(per_rank))
    return values


def plot(measured: dict, out_dir: Path) -> None:
    fig, (time_ax, memory_ax) = subplots(2, (10, 4))
    for run in RUNS:
        times = per_world(measured, run, "update_cpu_s")
        time_ax.plot(WORLD_SIZES, times, marker="o", label=run)
    for objective in ("fastclip", "amorlip", "neuclip"):
        memory_ax.plot(WORLD_SIZES, [b / 2**20 for b in per_world(measured, objective, "statistics_bytes")],
                       marker="o", label=f"{objective} statistics (counted)")
    neuclip = per_world(measured, "neuclip", "update_cpu_s")
    time_ax.plot(WORLD_SIZES, [neuclip[0] / w for w in WORLD_SIZES], "k--", label="1/W from W = 1")
    for axis in (time_ax, memory_ax):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("ranks W (fixed global batch)")
        axis.legend(fontsize=7)
    time_ax.set_ylabel("estimator update, CPU s per rank")
    memory_ax.set_ylabel("MiB per rank")
    save_figure(fig, NAME, out_dir)


def projection_reading(projected: list[dict]) -> str:
    """The projection's verdict on the <= 1% target, written from the numbers (so it follows them)."""
    lines = []
    for row in projected:
        splits = row["splits"]
        best = min(NEUCLIP_SPLITS, key=lambda split: splits[f"{split}_tf32"]["share"])
        prototypes = splits["prototypes_tf32"]
        verdict = "meets" if prototypes["share"] <= 0.01 else "misses"
        lines.append(
            f"- B = {row['global_batch']:,} on {row['world_size']} GPUs ({row['nodes']} node"
            f"{'s' if row['nodes'] > 1 else ''}): the prototype split {verdict} the target at "
            f"{prototypes['share']:.1%} (GEMMs {prototypes['gemm_ms']:.2f} ms, element-wise passes "
            f"{prototypes['memory_ms']:.2f} ms, collectives {prototypes['communication_ms']:.2f} ms, of a "
            f"{row['vit_b32_step_ms']:.0f} ms step); cheapest split: {best} "
            f"({splits[f'{best}_tf32']['share']:.1%}).")
    return "\n".join(lines)


def write_readme(payload: dict, readme: str | None = None) -> None:
    config, measured = payload["settings"], payload["measured"]
    rows = []
    for run in RUNS:
        for world_size in map(str, WORLD_SIZES):
            ranks = [r[run] for r in measured[world_size]]
            update = ranks[0]["update_cpu_s"]
            rows.append([run, world_size, ranks[0]["local_batch"],
                         f"{statistics.median(r['update_cpu_s']['median'] for r in ranks) * 1e3:.0f} "
                         f"({update['min'] * 1e3:.0f}-{update['max'] * 1e3:.0f})",
                         f"{statistics.median(r['statistics_cpu_s']['median'] for r in ranks) * 1e3:.1f}",
                         f"{ranks[0]['update_flops'] / 1e9:.2f}",
                         f"{ranks[0]['update_all_reduce_bytes'] / 2**20:.2f} / "
                         f"{ranks[0]['update_all_gather_bytes'] / 2**20:.2f}",
                         f"{ranks[0]['statistics_bytes'] / 2**20:.2f} / {ranks[0]['full_matrix_bytes'] / 2**20:.2f}",
                         f"{max(r['peak_rss_increase_mib'] for r in ranks):.0f}"])
    measured_table = markdown_table(
        ["run", "ranks", "local batch", "update CPU ms per rank (rank 0 min-max)", "statistics CPU ms",
         "update GFLOP per rank (rank 0)", "update all-reduce / all-gather MiB", "statistics MiB per rank / B x B before",
         "peak RSS increase MiB (max rank)"], rows)

    def cell(p: dict, key: str) -> str:
        split = p["splits"][key]
        return (f"{split['update_ms']:.2f} ms / {split['share']:.1%}"
                + (f" ({split['all_reduce_mib']:.2f} + {split['all_gather_mib']:.0f} MiB)"
                   if split["all_reduce_mib"] or split["all_gather_mib"] else ""))

    projected = markdown_table(
        ["global batch", "GPUs", "local batch", "ViT-B/32 step ms", "statistics MiB per rank (B x B before)",
         "prototypes (default), TF32", "prototypes, plain fp32", "anchors, TF32", "replicated, TF32"],
        [[p["global_batch"], f"{p['world_size']} ({p['nodes']} node{'s' if p['nodes'] > 1 else ''})",
          p["local_batch"], f"{p['vit_b32_step_ms']:.0f}", f"{p['statistics_mib']:.0f} ({p['full_matrix_mib']:.0f})",
          cell(p, "prototypes_tf32"), cell(p, "prototypes_fp32"), cell(p, "anchors_tf32"), cell(p, "replicated_tf32")]
         for p in payload["projection"]])
    assumptions = payload["assumptions"]
    body = f"""## {NAME}

`python benchmarks/scaling.py` (`--quick`: a smoke run). Global batch {config['global_batch']} split over 1, 2 and 4
gloo processes (one thread each; d = {EMBED_DIM}, NeuCLIP m = {config['num_prototypes']}, T_u =
{config['inner_steps']}; `neuclip` is the default prototype split, `neuclip anchors` and `neuclip replicated` the
other `neuclip_update_sharding` choices). Per-rank numbers are CPU seconds of the rank's own process (4 ranks share 2
cores, so wall time would measure the sharing), medians of {config['repeats']} updates, the median over ranks (rank
0's min-max in brackets); FLOPs counted by torch's FlopCounterMode; collectives' bytes counted as this rank sends them
(floats only); statistics memory counted (two L x B fp32 blocks) beside the B x B matrix every rank formed before;
peak memory as the RSS high-water mark above the rank's state before its first step (which includes the optimizer
state and NeuCLIP's m x d restart copies; ru_maxrss is per process, so rank 0 of a one-process run also holds what
its first allocations reserve).

{measured_table}

The counted FLOPs and collective bytes of every NeuCLIP rank under every split equal the formulas the projection
uses: **{'yes' if formulas_agree(payload['formula_checks']) else 'NO'}** (`formula_checks` in the JSON).

Projection to H100s (not measured: no GPU here). Per rank, NeuCLIP's update as a share of the ViT-B/32 step (bf16
peak {assumptions['bf16_flops'] / 1e12:.0f} TFLOP/s at {assumptions['encoder_mfu']:.0%} MFU, {VIT_B32_FLOPS_PER_PAIR / 1e9:.1f} GFLOP per pair). The batch statistics it
reads are the loss's own similarity blocks, formed once per step for both, so they are not counted (`statistics_ms`
in the JSON is what forming them costs the loss). The update's time: the counted GEMM FLOPs at {assumptions['gemm_efficiency']:.0%} of
{assumptions['tf32_flops'] / 1e12:.0f} TFLOP/s (TF32, `--tf32 True`) or {assumptions['fp32_flops'] / 1e12:.0f}
TFLOP/s (plain fp32, torch's default); the element-wise passes counted from the code ({BLOCK_TRANSFERS['large']} fp32
transfers per block entry and {PROTOTYPE_TRANSFERS['large']} per prototype entry per inner step and direction, or
{BLOCK_TRANSFERS['small']} and {PROTOTYPE_TRANSFERS['small']} for small per-rank batches) at
{assumptions['hbm_bytes_per_s'] / 1e12:.2f} TB/s; ring collectives at {assumptions['nvlink_bus_bytes_per_s'] / 1e9:.0f}
GB/s bus bandwidth in one NVLink node and {assumptions['infiniband_bus_bytes_per_s'] / 1e9:.0f} GB/s across nodes,
plus {assumptions['collective_latency_s'] * 1e6:.0f} us per collective, nothing overlapped. Cells: update ms /
share (MiB this rank all-reduces + its part of the all-gather, per update).

{projected}

Against the <= 1% target (TF32):
{projection_reading(payload['projection'])}

Reading: the statistics' and the update's FLOPs per rank fall as 1/W under the prototype and anchor splits (the
replicated update's do not); the CPU time per rank falls less (4 ranks on 2 shared cores). The prototype split's
collectives are small (2 B float64 per inner step, one all-gather of 4 m d / W floats per update) where the anchor
split all-reduces 2 m d floats per inner step, which dominates across nodes. See `docs/scale.md`. Results:
`results/scaling.json`, plot `results/scaling.png`.
"""
    update_readme_section(NAME, body, readme)


if __name__ == "__main__":
    main()
