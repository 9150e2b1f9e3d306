"""Every source type streams through `datasets` into the same batches: webdataset (txt / json captions), parquet,
an image folder with captions files, a Hub-style dataset directory, and the embedded default."""

import json
import pickle
import tarfile

import pytest
import torch
from data_fixtures import (
    IMAGE_SIZE, TEXT_LENGTH, add_member, collect_ids, image_bytes, processor, write_hub_style_dir, write_image_folder,
    write_parquet, write_webdataset,
)
from transformers import HfArgumentParser

import neuclip_hf.data.counting as counting
import neuclip_hf.data.sources as sources
from neuclip_hf import DataArguments, build_eval_dataloader, build_train_dataloader, count_samples
from neuclip_hf.data import (
    find_train_num_samples, hash_id, open_source, sample_count_cache_dir, shard_layout_warning, stable_sample_id,
)


@pytest.fixture(scope="module")
def proc():
    return processor()


def train_loader(proc, spec, batch_size=4, num_workers=0, rank=0, world_size=1, **kwargs):
    return build_train_dataloader(DataArguments(train_data=spec, **kwargs), proc, batch_size, num_workers, rank,
                                  world_size, seed=0)


def check_batch(batch, batch_size):
    assert batch["pixel_values"].shape == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (batch_size, TEXT_LENGTH)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["sample_ids"].dtype == torch.int64
    assert batch["sample_ids"].shape == (batch_size,)
    assert (batch["input_ids"][:, 0] == 49406).all()  # every caption starts with <|startoftext|>
    assert isinstance(batch["data_stats"]["samples_read"], int)


@pytest.mark.parametrize("caption_format", ["txt", "json"])
def test_webdataset_tars(tmp_path, proc, caption_format):
    ids = write_webdataset(tmp_path, shards=2, per_shard=6, caption_format=caption_format)
    loader = train_loader(proc, str(tmp_path / "*.tar"), num_workers=2)
    batches = list(loader)
    assert len(batches) == 2  # 6 samples per worker (one shard each): one full batch of 4 each, remainders dropped
    for batch in batches:
        check_batch(batch, 4)
    got = collect_ids(batches)
    assert len(set(got)) == 8 and set(got) <= set(ids)  # ids are the numeric webdataset keys


def test_webdataset_caption_is_tokenized_from_the_right_field(tmp_path, proc):
    write_webdataset(tmp_path, shards=1, per_shard=4, caption_format="json")
    batch = next(iter(build_eval_dataloader(DataArguments(eval_data=str(tmp_path / "*.tar")), proc, 4)))
    expected = proc.tokenizer("a photo of item 0", padding="max_length", max_length=TEXT_LENGTH)["input_ids"]
    assert batch["input_ids"][0].tolist() == expected
    assert batch["sample_ids"].tolist() == [0, 1, 2, 3]


def test_webdataset_non_numeric_keys_are_hashed(tmp_path, proc):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for seed, key in enumerate(("cat-001", "dog-002")):
            add_member(tar, f"{key}.png", image_bytes(seed))
            add_member(tar, f"{key}.txt", f"a photo of {key}".encode())
    batch = next(iter(build_eval_dataloader(DataArguments(eval_data=str(tmp_path / "a.tar")), proc, 2)))
    assert batch["sample_ids"].tolist() == [hash_id(b"cat-001"), hash_id(b"dog-002")]


def test_sample_id_rules():
    assert stable_sample_id(17) == 17 and stable_sample_id("000123") == 123 and stable_sample_id(b"42") == 42
    assert stable_sample_id("img/7") == hash_id(b"img/7") == stable_sample_id("img/7")  # stable across calls
    assert 0 <= hash_id(b"anything") < 2**63
    assert stable_sample_id(2**70) == hash_id(str(2**70).encode())  # beyond int64: hashed, not overflowed


def test_parquet_shards_keep_id_column(tmp_path, proc):
    ids = write_parquet(tmp_path, shards=2, per_shard=8)
    loader = train_loader(proc, str(tmp_path / "*.parquet"))
    got = collect_ids(loader)
    assert sorted(got) == ids  # 16 samples, batches of 4, nothing dropped
    check_batch(next(iter(loader)), 4)


def test_comma_separated_list_and_overrides(tmp_path, proc):
    write_parquet(tmp_path, shards=2, per_shard=4)
    spec = f"{tmp_path}/part-00000-of-00002.parquet, {tmp_path}/part-00001-of-00002.parquet"
    loader = train_loader(proc, spec, image_column="image", caption_column="caption", id_column="label")
    assert sorted(collect_ids(loader)) == sorted(i % 10 for i in range(8))  # ids from the chosen column


@pytest.mark.parametrize("captions_format", ["jsonl", "csv"])
def test_image_folder_with_captions_file(tmp_path, proc, captions_format):
    ids = write_image_folder(tmp_path, count=8, captions_format=captions_format)
    loader = train_loader(proc, str(tmp_path))
    assert sorted(collect_ids(loader)) == ids
    check_batch(next(iter(loader)), 4)


def test_image_folder_subfolders_are_shards(tmp_path, proc):
    ids = write_image_folder(tmp_path, count=4, subfolders=2)
    source = open_source(str(tmp_path))
    assert source.dataset.num_shards == 2
    assert sorted(collect_ids(train_loader(proc, str(tmp_path), num_workers=2))) == ids


def test_hub_style_directory_goes_through_the_hub_code_path(tmp_path, proc, monkeypatch):
    train_ids, test_ids = write_hub_style_dir(tmp_path)
    calls = []
    real = sources.load_dataset_builder
    monkeypatch.setattr(sources, "load_dataset_builder", lambda path, **kw: calls.append(path) or real(path, **kw))
    assert sorted(collect_ids(train_loader(proc, str(tmp_path), batch_size=3))) == train_ids
    assert calls == [str(tmp_path)]  # the directory itself, resolved by datasets (as a Hub name would be)
    assert next(iter(open_source(str(tmp_path)).dataset))["__shard__"].endswith("train-00000-of-00002.parquet")
    eval_loader = build_eval_dataloader(DataArguments(eval_data=str(tmp_path)), proc, batch_size=4)
    assert sorted(collect_ids(eval_loader)) == test_ids  # the "test" split picked for evaluation, last batch kept


def test_hub_style_imagefolder_with_metadata(tmp_path, proc):
    (tmp_path / "train").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "train" / f"{i}.png").write_bytes(image_bytes(i))
        rows.append({"file_name": f"{i}.png", "text": f"a photo of item {i}", "key": f"{i:04d}"})
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_source(str(tmp_path))
    assert source.builder_name == "imagefolder"
    example = next(iter(source.dataset))
    assert example["__shard__"].endswith("metadata.jsonl")  # shard names survive datasets' configured builder
    pickle.loads(pickle.dumps(source.dataset))  # and the dataset stays picklable (spawned DataLoader workers)
    assert sorted(collect_ids(train_loader(proc, str(tmp_path), batch_size=2))) == list(range(6))  # `key` column


def test_unknown_hub_name_is_a_clear_error(proc):
    with pytest.raises(FileNotFoundError, match="neither an existing file, glob or directory"):
        open_source("no-such-org/no-such-dataset-xyz")


def test_eval_loader_keeps_columns_and_last_partial_batch(tmp_path, proc):
    write_parquet(tmp_path, shards=1, per_shard=6)
    loader = build_eval_dataloader(DataArguments(eval_data=str(tmp_path / "*.parquet")), proc, 4,
                                   keep_columns=("label",))
    batches = list(loader)
    assert [len(b["sample_ids"]) for b in batches] == [4, 2]
    assert batches[0]["label"].tolist() == [0, 1, 2, 3]


def test_embedded_default_is_the_parquet_path(tmp_path, proc, monkeypatch):
    from neuclip_hf.default_data import prepare_default_data

    files = prepare_default_data(tmp_path / "fm", limit=24)
    monkeypatch.setattr(sources, "default_data_files", lambda split: files[split])
    batch = next(iter(train_loader(proc, None, batch_size=8)))
    check_batch(batch, 8)
    assert count_samples(DataArguments()) == 24
    test_batch = next(iter(build_eval_dataloader(DataArguments(), proc, 8, keep_columns=("label", "class_name"))))
    assert test_batch["sample_ids"].min() >= 1_000_000  # test ids are offset from training ids
    assert isinstance(test_batch["class_name"][0], str)


def test_count_samples(tmp_path, tmp_hf_home):
    write_webdataset(tmp_path / "wds", shards=3, per_shard=5)
    assert count_samples(DataArguments(train_data=str(tmp_path / "wds" / "*.tar"))) == 15
    with pytest.warns(FutureWarning, match="--dataset_size is deprecated: use --train_num_samples"):
        args = DataArguments(train_data="unused", dataset_size=123)
    assert args.train_num_samples == 123 and count_samples(args) == 123
    assert count_samples(DataArguments(train_data="unused", train_num_samples=77)) == 77
    with pytest.raises(ValueError, match="--dataset_size=5 and --train_num_samples=6 disagree"), pytest.warns(
            FutureWarning):
        DataArguments(dataset_size=5, train_num_samples=6)


def _no_decoding(monkeypatch):
    """Make any image decoding or parquet data read fail: counts must come from metadata only."""
    import PIL.Image
    import pyarrow.parquet as pq

    def refuse(*args, **kwargs):
        raise AssertionError("counting read data, not metadata")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", refuse)


def test_counts_come_from_parquet_footers_and_tar_headers(tmp_path, tmp_hf_home, monkeypatch):
    write_parquet(tmp_path / "pq", shards=3, per_shard=7)
    write_webdataset(tmp_path / "wds", shards=2, per_shard=6, caption_format="json")
    with tarfile.open(tmp_path / "wds" / "shard-00001.tar", "a") as tar:  # hidden members are not samples
        add_member(tar, ".DS_Store", b"x")
        add_member(tar, "__meta__.json", b"{}")
    _no_decoding(monkeypatch)
    assert counting.count_parquet_rows(tmp_path / "pq" / "part-00000-of-00003.parquet") == 7
    assert counting.count_tar_samples(tmp_path / "wds" / "shard-00001.tar") == 6
    assert find_train_num_samples(DataArguments(train_data=str(tmp_path / "pq" / "*.parquet"))) == 21
    assert find_train_num_samples(DataArguments(train_data=str(tmp_path / "wds"))) == 12  # a dataset directory


def test_sample_count_cache_is_keyed_by_files_sizes_and_mtimes(tmp_path, tmp_hf_home, monkeypatch):
    write_parquet(tmp_path / "pq", shards=2, per_shard=5)
    args = DataArguments(train_data=str(tmp_path / "pq" / "*.parquet"))
    calls = []
    original = counting.count_parquet_rows
    monkeypatch.setitem(counting.COUNTERS, "parquet", lambda path: calls.append(path) or original(path))
    assert find_train_num_samples(args) == 10 and len(calls) == 2
    assert find_train_num_samples(args) == 10 and len(calls) == 2  # cached: counted once
    cached = list(sample_count_cache_dir().glob("*.json"))
    assert len(cached) == 1 and str(tmp_hf_home) in str(cached[0])  # under HF_HOME, not in the data folder
    assert json.loads(cached[0].read_text()) == {"num_samples": 10, "num_files": 2, "kind": "parquet"}  # no path
    assert not any(p.suffix == ".json" for p in (tmp_path / "pq").iterdir())
    write_parquet(tmp_path / "pq", shards=2, per_shard=6)  # same names, new contents: counted again
    assert find_train_num_samples(args) == 12 and len(calls) == 4


def test_unknown_training_set_size_is_a_clear_error(monkeypatch):
    """A remote stream without a declared split size: no count (it would download everything), a clear error."""
    import neuclip_hf.data.loader as loader

    remote = sources.Source(dataset=None, description="Hub dataset org/web-pairs", builder_name="webdataset",
                            data_files=("hf://datasets/org/web-pairs@main/train-0000.tar",))
    monkeypatch.setattr(loader, "_prepare", lambda args, spec, split: (remote, None))
    args = DataArguments(train_data="org/web-pairs")
    assert find_train_num_samples(args) is None
    with pytest.raises(ValueError, match=r"number of training samples of 'org/web-pairs' is unknown .* "
                                         r"set --train_num_samples"):
        count_samples(args)
    remote.num_examples = 1234  # a dataset card that declares the split size
    assert count_samples(args) == 1234


def test_errors_name_the_problem(tmp_path, proc):
    with pytest.raises(FileNotFoundError, match=r"pattern '.*nothing-\*\.tar' matched no file"):
        open_source(str(tmp_path / "nothing-*.tar"))
    write_parquet(tmp_path, shards=1, per_shard=4)
    with pytest.raises(ValueError, match=r"caption column 'txt' not found; available columns: \['image', 'caption'"):
        train_loader(proc, str(tmp_path / "*.parquet"), caption_column="txt")
    with pytest.raises(ValueError, match="image column 'jpg' not found"):
        train_loader(proc, str(tmp_path / "*.parquet"), image_column="jpg")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "extra.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes formats"):
        open_source(f"{tmp_path}/*.parquet,{tmp_path}/extra.tar")
    with pytest.raises(ValueError, match="shuffle_buffer=-1"):
        DataArguments(shuffle_buffer=-1)


def test_shard_layout_warning_names_the_numbers(tmp_path, proc):
    assert shard_layout_warning(8, 2, 4) is None
    assert "3 shards are not divisible by world_size=2" in shard_layout_warning(3, 2, 1)
    assert "1 worker(s) per rank get no shard" in shard_layout_warning(2, 2, 2)
    assert "read 1 or 2 shards" in shard_layout_warning(6, 2, 2)
    write_parquet(tmp_path, shards=3, per_shard=2)
    with pytest.warns(UserWarning, match="3 shards are not divisible by world_size=2"):
        train_loader(proc, str(tmp_path / "*.parquet"), world_size=2)


def test_data_arguments_parse_from_the_command_line():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--train_data", "a/*.tar", "--shuffle_buffer", "100", "--augment", "--max_text_length", "32"])
    assert args.train_data == "a/*.tar" and args.shuffle_buffer == 100 and args.augment
    assert args.max_text_length == 32 and args.eval_data is None and json.dumps(vars(args))
