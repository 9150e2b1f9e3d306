"""The embedded default dataset: deterministic preparation, the cache guard, and the regeneration script."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from neuclip_hf.default_data import FASHION_MNIST_CLASSES, NUM_SHARDS, TEST_ID_OFFSET, prepare_default_data

ROOT = Path(__file__).resolve().parents[1]


def read(files):
    return pq.read_table(files).to_pydict()


def test_prepares_deterministically(tmp_path):
    first = prepare_default_data(tmp_path / "a", limit=40)
    second = prepare_default_data(tmp_path / "b", limit=40)
    assert {split: len(files) for split, files in first.items()} == NUM_SHARDS
    for split in ("train", "test"):
        a, b = read(first[split]), read(second[split])
        assert a["caption"] == b["caption"] and a["sample_id"] == b["sample_id"] and a["image"] == b["image"]
        assert len(a["caption"]) == 40
    train, test = read(first["train"]), read(first["test"])
    assert train["sample_id"] == list(range(40)) and test["sample_id"][0] == TEST_ID_OFFSET
    assert len(set(train["caption"])) > 10  # templates and attributes vary the captions
    pairs = zip(train["label"], train["caption"], strict=True)
    assert all(FASHION_MNIST_CLASSES[label] in caption for label, caption in pairs if label != 9)  # "an ankle boot"


def test_reuses_a_current_copy_and_rebuilds_another_limit(tmp_path):
    files = prepare_default_data(tmp_path / "fm", limit=10)
    stamp = Path(files["train"][0]).stat().st_mtime_ns
    assert prepare_default_data(tmp_path / "fm", limit=10) == files
    assert Path(files["train"][0]).stat().st_mtime_ns == stamp  # not rewritten
    prepare_default_data(tmp_path / "fm", limit=20)
    assert json.loads((tmp_path / "fm" / "manifest.json").read_text())["limit"] == 20
    assert len(read(files["train"])["caption"]) == 20


def test_limit_never_writes_into_the_shared_cache():
    with pytest.raises(ValueError, match="needs an explicit out_dir"):
        prepare_default_data(limit=5)


def test_regeneration_script(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_default_data.py"), "--out_dir",
                             str(tmp_path / "fm"), "--limit", "16"], capture_output=True, text=True, check=True)
    assert "train: 8 shards" in result.stdout and "test: 2 shards" in result.stdout
    assert len(read(sorted((tmp_path / "fm" / "train").glob("*.parquet")))["caption"]) == 16
