#!/usr/bin/env python
"""Regenerate the embedded default dataset (Fashion-MNIST image-caption pairs as parquet shards).

    python scripts/prepare_default_data.py                    # into the cache (NEUCLIP_DATA_DIR or ~/.cache/neuclip_hf)
    python scripts/prepare_default_data.py --out_dir data/fm  # elsewhere; --limit N keeps N images per split

The output is deterministic: the same source files give the same images, captions and sample ids.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's neuclip_hf, not an installed copy

from neuclip_hf.default_data import default_data_dir, prepare_default_data, source_dir  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=Path, default=None, help=f"target directory (default {default_data_dir()})")
    parser.add_argument("--source", type=Path, default=None,
                        help=f"directory with the Fashion-MNIST IDX files (default {source_dir()})")
    parser.add_argument("--limit", type=int, default=None,
                        help="keep the first N images of each split (needs --out_dir)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a current copy exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    files = prepare_default_data(args.out_dir, args.source, args.limit, overwrite=args.overwrite)
    for split, paths in files.items():
        print(f"{split}: {len(paths)} shards in {Path(paths[0]).parent}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return files


if __name__ == "__main__":
    main()
