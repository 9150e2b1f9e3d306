"""How many pairs local training files hold, read from file metadata (no image is decoded), cached on disk.

An epoch is one pass over the training data, so every epoch-based schedule needs this count
(`docs/baselines.md`). Two formats carry it in their metadata:

* parquet: the row count in each file's footer (`pyarrow.parquet.ParquetFile(...).metadata.num_rows`);
* webdataset tars: the sample keys in the member headers (`<key>.<field>` names, grouped as `datasets` groups
  them); members are skipped, never read (a `.tar.gz` is decompressed, not decoded).

A count is cached under `$HF_HOME/neuclip_hf/sample_counts/` (default `~/.cache/huggingface/...`), never next to
the data, keyed by a hash of the file list, sizes and modification times: a changed file is counted again. The
cache files hold the count only (no path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

CACHE_VERSION = 1
logger = logging.getLogger(__name__)
# `<key>.<field>`: the key is the path up to the first dot of the file name (the webdataset convention).
_WEBDATASET_MEMBER = re.compile(r"^((?:.*/|)[^.]+)\.([^/]*)$")


def sample_count_cache_dir() -> Path:
    """Folder of the cached counts: `$HF_HOME/neuclip_hf/sample_counts` (read at call time)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "neuclip_hf" / "sample_counts"


def count_parquet_rows(path: str | os.PathLike) -> int:
    """Rows of a parquet file, from its footer."""
    return pq.ParquetFile(path).metadata.num_rows


def count_tar_samples(path: str | os.PathLike) -> int:
    """Samples of a webdataset tar: runs of members sharing a key, from the headers only.

    Hidden members (a name starting with `.` or `__`) and non-files are ignored, as `datasets` ignores them.
    """
    count, previous = 0, None
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:  # iterating reads the headers and seeks past the contents
                name = os.path.basename(member.name)
                if not member.isreg() or name.startswith((".", "__")):
                    continue
                match = _WEBDATASET_MEMBER.match(member.name)
                if match is None:
                    continue
                key = match.group(1)
                if key != previous:
                    count += 1
                    previous = key
                archive.members = []  # keep memory flat on large shards
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        # A damaged shard: the samples before the damage are what training can read (it counts the damage).
        logger.warning(f"{os.path.basename(path)} is damaged ({type(error).__name__}: {error}): counted the "
                       f"{count} sample(s) before the damage")
    return count


COUNTERS: dict[str, Callable[[str], int]] = {"parquet": count_parquet_rows, "webdataset": count_tar_samples}


def _cache_key(paths: list[str], kind: str) -> str:
    """A hash of the format and each file's absolute path, size and modification time."""
    entries = []
    for path in sorted(paths):
        stat = os.stat(path)
        entries.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"version": CACHE_VERSION, "kind": kind, "files": entries})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_sample_count(paths: list[str], kind: str, count: Callable[[list[str]], int]) -> int:
    """`count(paths)`, computed once per file set (format, paths, sizes, mtimes) and cached on disk.

    Args:
        paths: Local data files.
        kind: A name of the counting method (part of the cache key).
        count: Counts the samples of all the files.
    """
    path = sample_count_cache_dir() / f"{_cache_key(paths, kind)}.json"
    if path.is_file():
        try:
            return int(json.loads(path.read_text())["num_samples"])
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged entry is recounted and rewritten
    total = int(count(paths))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"num_samples": total, "num_files": len(paths), "kind": kind}))
        os.replace(tmp, path)  # atomic: ranks counting at the same time never read half a file
    except OSError:
        pass  # a read-only cache only costs a recount
    return total


def count_from_metadata(paths: list[str], builder_name: str) -> int | None:
    """Samples in local `paths` of a parquet / webdataset source from file metadata (cached), else None.

    Args:
        paths: The source's data files (None is returned if any is not a local file).
        builder_name: The `datasets` builder reading them (`parquet`, `webdataset`, ...).
    """
    counter = COUNTERS.get(builder_name)
    if counter is None or not paths or not all(os.path.isfile(p) for p in paths):
        return None
    return cached_sample_count(paths, builder_name, lambda files: sum(counter(f) for f in files))
