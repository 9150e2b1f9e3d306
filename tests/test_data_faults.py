"""Real-world shard faults (issue 12): webdataset shards mixing image / caption extensions sample by sample,
truncated or corrupt tars, mostly-bad shards, and the bad-data limit judged on totals. Each test builds the bad input
and asserts the message and that no good sample is lost."""

import gzip
import io
import json
import tarfile

import pytest
from data_fixtures import add_member, caption, collect_ids, image_bytes, processor, write_webdataset

from neuclip_hf import DataArguments, DataQualityError, accumulate_data_stats, build_train_dataloader
from neuclip_hf.data import count_tar_samples
from neuclip_hf.trainer import EndlessLoader

STRICT = dict(min_image_side=8)


@pytest.fixture(scope="module")
def proc():
    return processor()


def loader_for(proc, spec, batch_size=4, num_workers=0, **kwargs):
    return build_train_dataloader(DataArguments(train_data=spec, **{**STRICT, **kwargs}), proc, batch_size,
                                  num_workers, rank=0, world_size=1, seed=0)


def totals(batches) -> dict:
    total = {}
    for batch in batches:
        accumulate_data_stats(total, batch["data_stats"])
    return total


FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def write_mixed_shard(path, ids, image_ext, caption_ext):
    """A tar whose sample i has its image as `<key>.<image_ext(i)>` and its caption as `<key>.<caption_ext(i)>`."""
    with tarfile.open(path, "w") as tar:
        for i, sample_id in enumerate(ids):
            key = f"{sample_id:08d}"
            ext = image_ext(i)
            add_member(tar, f"{key}.{ext}", image_bytes(sample_id, fmt=FORMATS[ext]))
            if caption_ext(i) == "json":  # img2dataset's metadata JSON, caption among other keys
                add_member(tar, f"{key}.json", json.dumps({"url": "x", "caption": caption(sample_id)}).encode())
            else:
                add_member(tar, f"{key}.txt", caption(sample_id).encode())


def test_a_shard_mixing_image_and_caption_extensions_loses_no_sample(tmp_path, proc):
    # The first 64 samples (the ones the field inference reads) are jpg + txt only; then every extension mixes.
    first = list(range(80))
    write_mixed_shard(tmp_path / "shard-00000.tar", first,
                      lambda i: "jpg" if i < 64 else ("png", "webp", "jpeg", "jpg")[i % 4],
                      lambda i: "txt" if i < 64 else ("json", "txt")[i % 2])
    second = list(range(1000, 1012))  # a shard of png + json only
    write_mixed_shard(tmp_path / "shard-00001.tar", second, lambda i: "png", lambda i: "json")
    batches = list(loader_for(proc, str(tmp_path / "*.tar"), batch_size=4, max_bad_fraction=0.0,
                              bad_check_min_samples=1))
    assert collect_ids(batches) == first + second
    total = totals(batches)
    assert total["samples_read"] == 92 and total["samples_skipped"] == 0
    # The caption of a json sample is its "caption" key (the text of sample 1001 is reproduced exactly).
    batch = next(b for b in batches if 1001 in b["sample_ids"].tolist())
    row = batch["sample_ids"].tolist().index(1001)
    expected = proc.tokenizer(caption(1001), padding="max_length", max_length=batch["input_ids"].shape[1])
    assert batch["input_ids"][row].tolist() == expected["input_ids"]


def _cut_inside_member(path, member_name: str, into_data: int = 100) -> None:
    """Truncate a tar in the middle of the data of `member_name` (a half-downloaded shard)."""
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
    data = path.read_bytes()
    path.write_bytes(data[:member.offset_data + into_data])


def test_a_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, proc):
    ids = write_webdataset(tmp_path, shards=3, per_shard=12)  # ids s*1000 + i
    damaged = tmp_path / "shard-00001.tar"
    _cut_inside_member(damaged, "00001007.jpg")
    assert count_tar_samples(damaged) == 8  # the headers before the cut: samples 0-6 and the cut one
    for workers in (0, 2):  # in the main process and in DataLoader workers (which once died with tarfile.ReadError)
        batches = list(loader_for(proc, str(tmp_path / "*.tar"), batch_size=1, num_workers=workers,
                                  max_bad_fraction=1.0))
        kept = sorted(collect_ids(batches))
        # Every sample before the damage is kept (1000-1006); the cut one and the rest of the shard are lost.
        assert kept == [i for i in ids if i < 1000 or 1000 <= i <= 1006 or i >= 2000], workers
        total = totals(batches)
        assert total["skipped_shard_truncated"] == 1 and total["samples_skipped"] == 1
        assert total["last_bad_shard"].endswith("shard-00001.tar") and total["last_bad_reason"] == "shard_truncated"
        assert "after 7 sample(s); the rest of the shard is skipped" in total["last_bad_detail"]


def test_a_truncated_gzipped_tar_is_counted_not_a_crash(tmp_path, proc):
    write_webdataset(tmp_path / "raw", shards=2, per_shard=12)
    for shard in (0, 1):
        data = gzip.compress((tmp_path / "raw" / f"shard-{shard:05d}.tar").read_bytes())
        (tmp_path / f"shard-{shard:05d}.tar.gz").write_bytes(data if shard == 0 else data[:len(data) // 2])
    assert count_tar_samples(tmp_path / "shard-00000.tar.gz") == 12
    assert 0 < count_tar_samples(tmp_path / "shard-00001.tar.gz") < 12  # what is before the damage
    loader = loader_for(proc, str(tmp_path / "*.tar.gz"), batch_size=1, num_workers=1, max_bad_fraction=1.0)
    batches = list(loader)
    kept = collect_ids(batches)
    assert kept[:12] == list(range(12))  # the whole good shard
    tail = kept[12:]
    assert 0 < len(tail) < 12 and tail == list(range(1000, 1000 + len(tail)))  # a prefix of the damaged one
    # The damage is the last thing the pass reads (after the last batch): the loader's totals hold it, by shard.
    assert loader.totals.bad == {"shard_truncated": 1} and loader.totals.read == len(kept) + 1
    assert dict(loader.totals.bad_by_shard) == {str(tmp_path / "shard-00001.tar.gz"): 1}
    assert "shard-00001.tar.gz (shard_truncated: ReadError: unexpected end of data after" in loader.totals.last_bad


def test_a_damaged_shard_over_the_limit_stops_with_the_bad_data_message(tmp_path, proc):
    write_webdataset(tmp_path, shards=1, per_shard=12)
    _cut_inside_member(tmp_path / "shard-00000.tar", "00000003.jpg")
    with pytest.raises(DataQualityError) as error:
        list(loader_for(proc, str(tmp_path / "*.tar"), batch_size=1, max_bad_fraction=0.0, bad_check_min_samples=1))
    message = str(error.value)
    assert "1 of 4 samples (25.00%) read by rank 0 were bad" in message
    assert "shard_truncated=1" in message and "shard-00000.tar (1)" in message


def test_a_mostly_bad_shard_ends_with_the_accounting(tmp_path, proc):
    bad = {i: ("image_undecodable" if i % 2 else "image_missing") for i in range(20) if i not in (4, 11)}
    write_webdataset(tmp_path, shards=1, per_shard=20, bad=bad)  # 90% bad: 2 good samples, batches of 4
    spec = str(tmp_path / "*.tar")
    # Within the limit: the pass yields no batch, and the error says what was read and skipped, and where.
    with pytest.raises(RuntimeError) as error:
        next(iter(EndlessLoader(loader_for(proc, spec, batch_size=4, max_bad_fraction=1.0))))
    message = str(error.value)
    assert message.startswith("the training data yields no batch on rank 0: 20 sample(s) read from 1 shard(s) "
                              "[shard-00000.tar (20)], 18 skipped (image_missing=9, image_undecodable=9); bad "
                              "samples per shard: [shard-00000.tar (18)]; last bad sample in ")
    assert "needs at least batch_size=4 good samples per pass" in message
    # With the default limit (1%), the same data is a bad-data error, even before bad_check_min_samples are read.
    with pytest.raises(DataQualityError, match=r"18 of 20 samples \(90.00%\) read by rank 0 were bad, over "
                                               r"max_bad_fraction=1.00% .*image_missing=9, image_undecodable=9"):
        next(iter(EndlessLoader(loader_for(proc, spec, batch_size=4))))
    # The 2 good samples are read (one partial batch when it is kept).
    assert collect_ids(loader_for(proc, spec, batch_size=4, max_bad_fraction=1.0)) == []


def _trainer_on(tmp_path, spec, proc, **data_kwargs):
    from hub_helpers import hub_model

    from neuclip_hf.trainer import NeuCLIPTrainer, NeuCLIPTrainingArguments

    data_args = DataArguments(train_data=spec, max_text_length=16, **data_kwargs)
    args = NeuCLIPTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                                    logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                                    save_strategy="no", warmup_steps=0, dataloader_num_workers=2)
    factory = lambda: build_train_dataloader(data_args, proc, 4, 2, rank=0, world_size=1, seed=0)  # noqa: E731
    return NeuCLIPTrainer(model=hub_model(objective="clip"), args=args, train_loader_factory=factory)


def test_the_limit_judges_the_totals_of_every_worker_and_logs_running_totals(tmp_path, proc):
    """Two bad samples at the very start of worker 0's shard (2 of its first 6 samples: 33%) once stopped the run;
    judged on the totals of both workers with the 99.5% bound (2 of 48 overall) it trains, and every logged line
    holds the running totals of the run, not the counts of its logging window."""
    write_webdataset(tmp_path / "data", shards=2, per_shard=24, bad={0: "image_undecodable", 1: "image_undecodable"})
    spec = str(tmp_path / "data" / "*.tar")
    trainer = _trainer_on(tmp_path, spec, proc, max_bad_fraction=0.05, bad_check_min_samples=8)
    trainer.train()
    lines = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in lines] == [2, 4, 6, 8]
    read = [h["data_samples_read"] for h in lines]
    assert read == sorted(read) and read[-1] >= 8 * 4 + 2  # cumulative: 32 good samples trained + the 2 bad ones
    assert [h["data_skipped_image_undecodable"] for h in lines] == [2, 2, 2, 2]
    # The same data with no bad sample allowed stops once 8 samples were read, on the totals of both workers.
    strict = _trainer_on(tmp_path / "strict", spec, proc, max_bad_fraction=0.0, bad_check_min_samples=8)
    with pytest.raises(DataQualityError, match=r"2 of 10 samples \(20.00%\) read by all 1 rank\(s\) were bad, over "
                                               r"max_bad_fraction=0.00% .*image_undecodable=2; on rank 0: 10 "
                                               r"sample\(s\) read from 2 shard\(s\)"):
        strict.train()
