"""Evaluation data opens through the training reader: the same spec grammar, the same column lists, the split."""

import json

import pytest
from data_fixtures import caption, write_hub_style_dir, write_image_folder, write_parquet, write_webdataset

from neuclip_hf.data import open_eval_data
from neuclip_hf.images import BadSampleError


def _rows(data):
    return list(data)


def test_comma_separated_shards_and_globs_as_for_training(tmp_path):
    ids = write_webdataset(tmp_path / "wds", shards=3, per_shard=2)
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    data = open_eval_data(f"{shards[0]},{shards[2]}")
    rows = _rows(data)
    assert len(rows) == 4 and data.description.startswith("webdataset:")
    assert [data.caption(r["caption"]) for r in rows] == [caption(i) for i in ids[:2] + ids[4:]]
    assert [r["label"] for r in rows] == [i % 10 for i in ids[:2] + ids[4:]]  # `.cls` members
    assert len(_rows(open_eval_data(str(tmp_path / "wds" / "shard-0000[01].tar")))) == 4


def test_dataset_directory_split_is_honoured(tmp_path):
    train, test = write_hub_style_dir(tmp_path / "hub")
    by_default = [r["label"] for r in open_eval_data(str(tmp_path / "hub"))]  # the first evaluation split: test
    assert by_default == [i % 10 for i in test]
    train_rows = _rows(open_eval_data(str(tmp_path / "hub"), split="train"))
    assert len(train_rows) == len(train)
    with pytest.raises(ValueError, match="cannot read evaluation data .* split 'valid'"):
        open_eval_data(str(tmp_path / "hub"), split="valid")


def test_json_caption_key_and_explicit_columns(tmp_path):
    write_webdataset(tmp_path / "wds", shards=1, per_shard=3, caption_format="json")
    data = open_eval_data(str(tmp_path / "wds" / "*.tar"), caption_column="json.caption", label_column="cls")
    assert [data.caption(r["caption"]) for r in data] == [caption(i) for i in range(3)]
    with pytest.raises(ValueError, match="label column 'nope' not found"):
        open_eval_data(str(tmp_path / "wds" / "*.tar"), label_column="nope")
    broken = open_eval_data(str(tmp_path / "wds" / "*.tar"), caption_column="json.missing")
    with pytest.raises(BadSampleError, match="none of the keys"):
        broken.caption(next(iter(broken))["caption"])


def test_captions_files_with_relative_image_paths(tmp_path):
    write_image_folder(tmp_path / "folder", count=3)
    rows = _rows(open_eval_data(str(tmp_path / "folder")))
    assert len(rows) == 3 and all(str(tmp_path) in r["image"] for r in rows)  # resolved against the file
    assert all(r["label"] is None and r["has_caption"] for r in rows)


def test_parquet_labels_with_class_names_given_by_the_caller(tmp_path):
    write_parquet(tmp_path / "pq", shards=1, per_shard=4)
    data = open_eval_data(str(tmp_path / "pq" / "*.parquet"), class_names=[str(i) for i in range(10)])
    rows = _rows(data)
    assert data.class_names[:2] == ["0", "1"] and [r["label"] for r in rows] == [0, 1, 2, 3]
    assert json.dumps(data.description)  # a plain string for reports
