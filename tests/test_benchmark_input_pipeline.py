"""The input-pipeline benchmark's --quick mode runs and writes a well-formed result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # slow tier: a benchmark quick mode

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_and_plot(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--quick", "--out_dir",
                    str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "input_pipeline.json").read_text())
    assert result["benchmark"] == "input_pipeline" and result["quick"] is True
    sizes = {row["image_size"] for row in result["train_step"]}
    assert sizes == {64, 224} and all(row["samples_per_s"] > 0 for row in result["train_step"])
    rows = result["pipeline"]
    assert {(r["source"], r["image_size"], r["workers"]) for r in rows} == {
        (source, size, workers) for source in {r["source"] for r in rows} for size in sizes for workers in (1, 2)}
    assert len({r["source"] for r in rows}) == 2
    for row in rows:
        assert row["samples_per_s"] > 0 and row["samples"] > 0 and row["startup_s"] >= 0
    assert len(result["summary"]) == 4 and all(isinstance(s["target_met"], bool) for s in result["summary"])
    assert (tmp_path / "input_pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
