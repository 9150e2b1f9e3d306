"""The zero-shot throughput benchmark runs (`--quick`) into a temporary directory and writes well-formed results."""

import json
import runpy
from pathlib import Path

import pytest

from neuclip_hf.default_data import prepare_default_data

pytestmark = pytest.mark.slow  # slow tier: a benchmark quick mode

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_and_plot(tmp_path):
    files = prepare_default_data(out_dir=tmp_path / "data", limit=64)["test"]
    benchmark = runpy.run_path(str(ROOT / "benchmarks" / "zero_shot_throughput.py"))
    benchmark["main"](["--quick", "--num_images", "48", "--data", *files[:1], "--out_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "zero_shot_throughput.json").read_text())
    assert (tmp_path / "out" / "zero_shot_throughput.png").stat().st_size > 0
    assert results["config"]["images"] == 32 and results["config"]["quick"]  # the first shard holds 32 of the 64
    rows = results["results"]
    assert set(rows) == {"pipeline (batch_size=1)", "pipeline (batch_size=64)", "ZeroShotClassifier.predict_proba",
                         "ZeroShotEvaluator", "run_suite (--suite runner)",
                         "recipes/eval.py path (80 templates + retrieval)"}
    assert all(row["images"] == 32 and row["images_per_second"] > 0 for row in rows.values())
    assert rows["ZeroShotClassifier.predict_proba"]["max_abs_prob_diff_vs_pipeline"] < 1e-5  # same answers
    # same predictions; one near-tie (|logit gap| ~1e-7) may flip between the two float paths
    assert abs(rows["ZeroShotEvaluator"]["acc1"] - rows["ZeroShotEvaluator"]["pipeline_acc1"]) <= 1 / 32 + 1e-9
    assert rows["run_suite (--suite runner)"]["acc1"] == rows["ZeroShotEvaluator"]["acc1"]  # one evaluator underneath
    assert isinstance(results["meets_target"], bool)
    assert results["speedup_evaluator_vs_pipeline"] > 1.0  # batched with one classifier beats per-image calls
