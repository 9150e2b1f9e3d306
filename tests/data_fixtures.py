"""Tiny on-disk datasets for the input-pipeline tests: webdataset tars, parquet shards, image folders, a Hub-style
dataset directory, and the bad samples the pipeline must skip."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from neuclip_hf.tokenization import build_clip_processor

IMAGE_SIZE = 32  # processor output side used by the tests
TEXT_LENGTH = 16


def processor():
    return build_clip_processor(IMAGE_SIZE, TEXT_LENGTH)


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A random image of `size` (width, height) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def caption(sample_id: int) -> str:
    return f"a photo of item {sample_id}"


# Bad samples, one per reason: (fields overriding a good sample, reason). `None` removes the field.
BAD_SAMPLES = {
    "image_undecodable": {"image": b"this is not an image at all"},
    "image_truncated": {"image": image_bytes(0, (64, 64), "JPEG")[:300]},
    "image_missing": {"image": None},
    "image_too_small": {"image": image_bytes(0, (4, 30))},
    "image_too_large": {"image": image_bytes(0, (300, 300))},  # over the tests' max_image_pixels=50_000
    "caption_missing": {"caption": None},
    "caption_empty": {"caption": "   \n"},
    "caption_not_utf8": {"caption": b"caf\xe9 au lait"},  # Latin-1 bytes
    "caption_undecodable": {"caption": "x", "json_raw": b'{"caption": "unterminated'},  # webdataset .json only
}
JSON_ONLY = {"caption_undecodable"}
TEST_MAX_PIXELS = 50_000


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: Path, shards: int, per_shard: int, caption_format: str = "txt", bad: dict | None = None,
                     image_ext: str = "jpg") -> list[int]:
    """`shards` tars of `per_shard` samples with keys = ids; `bad` maps an id to a BAD_SAMPLES kind.

    Returns the ids of all samples (good and bad). Captions go to `<key>.txt` or `<key>.json` ({"caption": ...}).
    """
    root.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    ids = []
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                sample_id = shard * 1000 + index
                ids.append(sample_id)
                fields = {"image": image_bytes(sample_id, fmt="JPEG" if image_ext == "jpg" else "PNG"),
                          "caption": caption(sample_id)}
                fields.update(BAD_SAMPLES[bad[sample_id]] if sample_id in bad else {})
                key = f"{sample_id:08d}"
                if fields["image"] is not None:
                    add_member(tar, f"{key}.{image_ext}", fields["image"])
                text = fields["caption"]
                if text is not None:
                    if caption_format == "json":  # a JSON object with the caption among other metadata
                        data = fields.get("json_raw") or (
                            b'{"caption": "' + text + b'"}' if isinstance(text, bytes)
                            else json.dumps({"caption": text, "width": 24}).encode())
                    else:
                        data = text.encode() if isinstance(text, str) else text
                    add_member(tar, f"{key}.{caption_format}", data)
                add_member(tar, f"{key}.cls", str(sample_id % 10).encode())
    return ids


def write_parquet(root: Path, shards: int, per_shard: int, bad: dict | None = None, id_offset: int = 0,
                  prefix: str = "part") -> list[int]:
    """Parquet shards with columns image {bytes, path}, caption, label, sample_id."""
    root.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    ids = []
    for shard in range(shards):
        rows = {"image": [], "caption": [], "label": [], "sample_id": []}
        for index in range(per_shard):
            sample_id = id_offset + shard * per_shard + index
            ids.append(sample_id)
            fields = {"image": image_bytes(sample_id), "caption": caption(sample_id)}
            fields.update(BAD_SAMPLES[bad[sample_id]] if sample_id in bad else {})
            text = fields["caption"]
            rows["image"].append(None if fields["image"] is None else {"bytes": fields["image"], "path": None})
            rows["caption"].append(text.decode("latin-1") if isinstance(text, bytes) else text)
            rows["label"].append(sample_id % 10)
            rows["sample_id"].append(sample_id)
        pq.write_table(pa.table(rows), root / f"{prefix}-{shard:05d}-of-{shards:05d}.parquet")
    return ids


def write_image_folder(root: Path, count: int, captions_format: str = "jsonl", subfolders: int = 0) -> list[int]:
    """Image files plus captions files (`file_name`-style relative paths); with `subfolders`, one captions file per
    subfolder (several shards)."""
    ids = []
    groups = [root / f"part{g}" for g in range(subfolders)] if subfolders else [root]
    for group_index, group in enumerate(groups):
        (group / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for index in range(count):
            sample_id = group_index * 1000 + index
            ids.append(sample_id)
            (group / "images" / f"{sample_id}.png").write_bytes(image_bytes(sample_id))
            rows.append({"image": f"images/{sample_id}.png", "caption": caption(sample_id), "id": sample_id})
        if captions_format == "jsonl":
            (group / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            lines = ["image,caption,id"] + [f"{r['image']},{r['caption']},{r['id']}" for r in rows]
            (group / "captions.csv").write_text("\n".join(lines) + "\n")
    return ids


def write_hub_style_dir(root: Path, train_shards: int = 2, per_shard: int = 6) -> tuple[list[int], list[int]]:
    """A dataset directory laid out like a Hub dataset repository: data/train-*.parquet and data/test-*.parquet."""
    train = write_parquet(root / "data", train_shards, per_shard, prefix="train")
    test = write_parquet(root / "data", 1, per_shard, id_offset=10_000, prefix="test")
    (root / "README.md").write_text("---\nlicense: mit\n---\n# tiny test dataset\n")
    return train, test


def collect_ids(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["sample_ids"]]
