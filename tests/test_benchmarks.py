"""The --quick path of each benchmark runs end to end and writes well-formed results (JSON, plot, README section)."""

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # slow tier: benchmark quick modes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow  # benchmark quick modes: minutes, not seconds


@pytest.fixture
def bench_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUCLIP_BENCH_CACHE", str(tmp_path / "cache"))
    import benchmarks.harness
    import benchmarks.jobs

    monkeypatch.setattr(benchmarks.harness, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(benchmarks.jobs, "CACHE", tmp_path / "cache" / "jobs")
    return tmp_path / "out", tmp_path / "README.md"


def _check(out: Path, readme: Path, name: str, with_plot: bool = True) -> dict:
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["benchmark"] == name and "environment" in payload
    if with_plot:
        assert (out / f"{name}.png").stat().st_size > 1000
    text = readme.read_text()
    assert f"<!-- {name}:start -->" in text and f"## {name}" in text
    return payload


def test_estimator_overhead_quick(bench_dirs):
    from benchmarks import estimator_overhead

    out, readme = bench_dirs
    estimator_overhead.main(["--quick", "--out_dir", str(out), "--readme", str(readme)])
    payload = _check(out, readme, "estimator_overhead")
    objectives = payload["batches"]["256"]["objectives"]
    assert set(objectives) == {"clip", "siglip", "fastclip", "amorlip", "neuclip"}
    assert objectives["clip"]["ratio_to_clip_loss"] == 1.0
    assert objectives["neuclip"]["flops"] > objectives["clip"]["flops"]  # T_u inner steps cost FLOPs
    assert 0 < payload["vit_b32_encoder_step"]["flops_per_sample"]


def test_step_cost_quick(bench_dirs):
    from benchmarks import step_cost

    out, readme = bench_dirs
    step_cost.main(["--quick", "--out_dir", str(out), "--readme", str(readme)])
    payload = _check(out, readme, "step_cost")
    measured = payload["results"]["tiny"]["measurements"]
    assert set(measured) == {"plain", "clip", "siglip", "fastclip", "amorlip", "neuclip"}
    assert all(m["seconds_per_step"] > 0 and m["peak_rss_bytes"] > 0 for m in measured.values())
    memory = {(r["dataset_size"], r["objective"]): r["bytes"] for r in payload["estimator_memory"]}
    # FastCLIP's table grows with the data; NeuCLIP's prototypes do not.
    assert memory[(10**6, "fastclip")] > 50 * memory[(10**4, "fastclip")]
    assert memory[(10**6, "neuclip")] == memory[(10**4, "neuclip")]


def test_quality_small_batch_quick(bench_dirs):
    from benchmarks import quality_small_batch

    out, readme = bench_dirs
    common = ["--quick", "--workers", "0", "--out_dir", str(out), "--readme", str(readme)]
    with pytest.raises(SystemExit, match=r"the sweep has 10 unfinished job\(s\): run --phase sweep first"):
        quality_small_batch.main(["--phase", "seeds", *common])
    payload = quality_small_batch.main(common)  # --quick runs all four phases
    payload = _check(out, readme, "quality_small_batch")
    methods = ("clip", "siglip", "fastclip", "amorlip", "neuclip")
    for method in methods:  # the same budget for every method, best setting chosen from the validation runs
        entry = payload["sweep"][method]
        assert len(entry["settings"]) == 2 and entry["chosen"] in entry["settings"]
        best = max(s["val_r1"] for s in entry["settings"].values())
        assert entry["settings"][entry["chosen"]]["val_r1"] == best
    found = {(r["dataset"], r["method"]) for r in payload["results"]}
    for dataset in ("mosaic-tones", "fashion-mnist", "mosaic-positions"):
        for method in methods:
            assert (dataset, method) in found
    assert {("mosaic-tones", "clip @ 2B"), ("mosaic-tones", "clip @ 4B")} <= found
    for entry in payload["results"] + payload["long"] + payload["probes"]:
        assert 0.0 <= entry["mean"] <= 1.0 and 0.01 - 1e-6 <= entry["temperature_mean"] <= 1.0
        for run in entry["runs"]:  # true epochs: samples seen / training-set size
            assert len(run["curve"]) >= 1 and run["temperature"] > 0
            if entry["dataset"] == "mosaic-tones":
                assert run["epochs"] == pytest.approx(entry["steps"] * entry["batch"] / payload["train_pairs"])
        if entry["dataset"].startswith("mosaic-positions"):
            assert 0.0 <= entry["caption_aware_mean"] <= 1.0
    assert {r["objective"] for r in payload["long"]} == set(methods) and all(r["steps"] == 30 for r in payload["long"])
    probes = {r["kind"] for r in payload["probes"]}
    assert {"best setting", "eps = 1/(B-1)", "gamma 1 (in-batch estimate)",
            "deduplicated captions, best setting"} <= probes
    assert "## quality_small_batch" in readme.read_text() and "caption-aware" in readme.read_text()


def test_normalizer_accuracy_quick(bench_dirs):
    from benchmarks import normalizer_accuracy

    out, readme = bench_dirs
    normalizer_accuracy.main(["--quick", "--workers", "0", "--out_dir", str(out), "--readme", str(readme)])
    payload = _check(out, readme, "normalizer_accuracy")
    assert set(payload["growth"]) == {"clip", "fastclip", "amorlip", "neuclip", "neuclip (T_r 500)", "neuclip (paper)"}
    assert payload["variants"]["fastclip"]["config"]["fastclip_gamma_schedule"] == "stepped"  # released settings
    assert payload["variants"]["amorlip"]["args"]["rho_schedule_unit"] == "epoch"
    for key, result in payload["results"].items():
        assert len(result["history"]) >= 1 and result["final_mse"] >= 0, key


def test_gpu_script_dry_run_on_cpu(bench_dirs):
    from benchmarks import gpu

    out, readme = bench_dirs
    payload = gpu.main(["--quick", "--allow_cpu", "--ddp", "--out_dir", str(out), "--readme", str(readme)])
    kinds = {"plain", "clip", "siglip", "fastclip", "amorlip", "neuclip"}
    assert set(payload["results"]) == kinds and payload["encoder_flops_per_sample"] > 0
    assert all(m["world_size"] == 1 and m["samples_per_second"] > 0 for m in payload["results"].values())
    assert 0 < payload["results"]["neuclip"]["estimator_share"] < 1
    assert "estimator_share" not in payload["results"]["plain"]
    # the 2-process DDP path, with NeuCLIP's anchor split beside its default prototype split
    assert payload["ddp"]["world_size"] == 2 and set(payload["ddp"]["results"]) == kinds | {gpu.ANCHOR_SPLIT}
    assert 0 < payload["ddp"]["results"][gpu.ANCHOR_SPLIT]["estimator_share"] < 1
    assert all(m["world_size"] == 2 for m in payload["ddp"]["results"].values())
    assert set(payload["precision"]) == kinds - {"plain"}
    assert all(c["loss_dtype"] == "float32" and c["estimator_state_fp32"] for c in payload["precision"].values())
    _check(out, readme, "gpu", with_plot=False)
    assert "CPU dry run" in readme.read_text()


def test_openclip_step_quick(bench_dirs):
    from benchmarks import openclip_step

    out, readme = bench_dirs
    payload = openclip_step.main(["--quick", "--out_dir", str(out), "--readme", str(readme)])
    _check(out, readme, "openclip_step")
    setting = payload["settings"]["8"]
    assert len(setting["rounds"]) == 1 and set(setting["rounds"][0]["runs"]) == set(openclip_step.VARIANTS)
    for name, run in setting["rounds"][0]["runs"].items():
        assert len(run["step_seconds"]) == 2 and run["load"]["wall_seconds"] > 0, name
    assert setting["rounds"][0]["runs"]["open_clip"]["versions"]["open_clip"] == openclip_step.OPEN_CLIP_VERSION
    variants = setting["summary"]["variants"]
    assert variants["open_clip"]["throughput_vs_open_clip"]["median"] == 1.0
    assert 0 < variants["NeuCLIP neuclip"]["estimator_share"]["median"] < 1
    assert not payload["timings_valid"] or setting["valid_rounds"] == 1  # quick timings are never recorded as valid


def test_open_clip_imports_with_the_torchvision_stand_in_and_refuses_its_use():
    from benchmarks.openclip_worker import TorchvisionUnavailable, install_torchvision_stand_in

    finder = install_torchvision_stand_in()
    try:
        import torchvision.transforms as transforms
        from torchvision.transforms import InterpolationMode, ToTensor

        with pytest.raises(TorchvisionUnavailable, match="torchvision's torchvision.transforms.Normalize was used"):
            transforms.Normalize(mean=0, std=1)

        class MaybeToTensor(ToTensor):  # open_clip subclasses torchvision classes at import time
            pass

        with pytest.raises(TorchvisionUnavailable):
            MaybeToTensor()
        assert InterpolationMode.BICUBIC is not None  # attribute access at import time works
    finally:  # the rest of the session must not see a torchvision
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def test_training_modes_quick(bench_dirs):
    from benchmarks import training_modes

    out, readme = bench_dirs
    payload = training_modes.main(["--quick", "--out_dir", str(out), "--readme", str(readme)])
    _check(out, readme, "training_modes")
    breaks = payload["graph_breaks"]
    assert set(breaks) == {"clip", "siglip", "fastclip", "amorlip", "neuclip"}
    assert breaks["clip"]["graphs"] == 1 and breaks["clip"]["graph_breaks"] == 0  # clip compiles to one graph
    assert breaks["neuclip"]["graph_breaks"] >= 1
    assert all(row["at"].startswith(("neuclip_hf/", "torch/")) for row in breaks["neuclip"]["break_locations"])
    summary = payload["checkpointing"]["summary"]
    assert set(summary) == {"clip", "clip, checkpointing", "neuclip", "neuclip, checkpointing"}
    assert payload["compile"]["tiny@8"]["ratios"]["clip"]["median"] > 0
    assert payload["timings_valid"] is False  # quick timings are never recorded


def test_scaling_quick(bench_dirs):
    """1, 2 and 4 gloo ranks at a fixed global batch: per-rank work falls as 1/W and matches the projection's
    formulas (the run has a hard timeout per world size)."""
    from benchmarks import scaling

    out, readme = bench_dirs
    payload = scaling.main(["--quick", "--out_dir", str(out), "--readme", str(readme), "--timeout", "300"])
    payload = _check(out, readme, "scaling")
    assert sorted(payload["measured"]) == ["1", "2", "4"]
    for world_size, ranks in payload["measured"].items():
        assert [r["neuclip"]["world_size"] for r in ranks] == [int(world_size)] * int(world_size)
    # Every NeuCLIP split on every rank of every world size (3 splits x 7 ranks).
    assert len(payload["formula_checks"]) == 3 * (1 + 2 + 4)
    for check in payload["formula_checks"]:
        for key in ("update_flops", "statistics_flops", "all_reduce_bytes", "all_gather_bytes"):
            assert check[f"{key}_counted"] == check[f"{key}_formula"], (check, key)
    single = payload["measured"]["1"][0]
    for rank in payload["measured"]["4"]:
        for run in ("neuclip", "neuclip anchors"):  # the split update's work falls as 1/W
            assert rank[run]["update_flops"] * 4 == single[run]["update_flops"]
        assert rank["neuclip replicated"]["update_flops"] == single["neuclip replicated"]["update_flops"]
        assert rank["neuclip"]["update_all_gather_bytes"] > 0 == rank["neuclip anchors"]["update_all_gather_bytes"]
        assert rank["neuclip"]["statistics_bytes"] * 4 == single["neuclip"]["statistics_bytes"]
        assert single["neuclip"]["statistics_bytes"] == single["neuclip"]["full_matrix_bytes"] * 2
    assert [p["global_batch"] for p in payload["projection"][:2]] == [4096, 32768]
    assert set(payload["projection"][0]["splits"]) == {f"{split}_{precision}" for split in
                                                       ("prototypes", "anchors", "replicated")
                                                       for precision in ("tf32", "fp32")}
    assert "uses: **yes**" in readme.read_text()


def test_neuclip_update_quick(bench_dirs):
    from benchmarks import neuclip_update

    out, readme = bench_dirs
    neuclip_update.main(["--label", "after", "--quick", "--repeats", "1", "--out_dir", str(out), "--readme",
                         str(readme)])
    payload = _check(out, readme, "neuclip_update", with_plot=False)
    assert set(payload["runs"]["after"]["batches"]) == {"8", "256"}
    assert payload["settings"] == {"embed_dim": 512, "num_prototypes": 4096, "inner_steps": 10}
