"""Sharding: every sample is read by exactly one rank and worker per pass, with 2 real processes and in the
datasets fallback (shards not divisible by the world size)."""

import json
import pickle
import socket

import pytest
import torch.multiprocessing as mp
from data_dist_workers import read_rank_ids
from data_fixtures import collect_ids, processor, write_parquet, write_webdataset

from neuclip_hf import DataArguments, build_eval_dataloader, build_train_dataloader

pytestmark = pytest.mark.slow  # slow tier: multi-process runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_complete_shares(tmp_path):
    ids = write_webdataset(tmp_path / "wds", shards=4, per_shard=8)  # 4 shards = 2 ranks x 2 workers, 8 = 2 batches
    spec = str(tmp_path / "wds" / "*.tar")
    mp.spawn(read_rank_ids, args=(2, free_port(), spec, str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "ids.json").read_text())
    assert result["world_size"] == 2
    rank0, rank1 = result["ids_per_rank"]
    assert len(rank0) == len(rank1) == 16
    assert not set(rank0) & set(rank1)  # no sample on both ranks
    assert sorted(rank0 + rank1) == sorted(ids)  # and none missing


def test_example_striding_fallback_is_disjoint_and_complete(tmp_path):
    ids = write_parquet(tmp_path, shards=3, per_shard=7)  # 3 shards over 2 ranks: datasets strides examples
    args = DataArguments(eval_data=str(tmp_path / "*.parquet"))
    with pytest.warns(UserWarning, match="3 shards are not divisible by world_size=2: datasets falls back"):
        shares = [collect_ids(build_eval_dataloader(args, processor(), 2, num_workers=2, rank=r, world_size=2))
                  for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == ids


def test_loader_state_and_stream_are_portable(tmp_path):
    write_parquet(tmp_path, shards=2, per_shard=4)
    loader = build_train_dataloader(DataArguments(train_data=str(tmp_path / "*.parquet")), processor(), 2, 2, 0, 1, 0)
    iterator = iter(loader)
    next(iterator)
    json.dumps(loader.state_dict())  # checkpointable as JSON (or torch.save)
    pickle.loads(pickle.dumps(loader.stream))  # picklable: works with the spawn start method too
