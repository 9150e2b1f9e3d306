"""The embedded default dataset: Fashion-MNIST image-caption pairs as parquet shards.

Source: Debian's `dataset-fashion-mnist` package (MIT, Zalando Research; 60,000 training and 10,000 test images,
28 x 28 grayscale, 10 classes) at /usr/share/datasets/fashion-mnist, or any directory with the four IDX files
(`NEUCLIP_FASHION_MNIST_DIR`). `prepare_default_data` turns them, deterministically, into parquet shards with
columns `image` ({bytes, path}, PNG), `caption`, `label`, `class_name` and `sample_id`, so the default training
run streams through exactly the same code path as a real parquet dataset. Captions vary: several templates
combined with attributes measured on the image itself (tone and fill), so the model cannot memorise ten strings.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

VERSION = "v1"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
NUM_SHARDS = {"train": 8, "test": 2}
TEST_ID_OFFSET = 1_000_000  # test sample ids never collide with training ids

TEMPLATES = (
    "a photo of a {c}.",
    "a {tone} {c}.",
    "a product photo of a {tone} {c}.",
    "a grayscale picture of a {c}.",
    "a {fill} {c} on a black background.",
    "a low resolution photo of the {c}.",
    "a fashion item: a {tone}, {fill} {c}.",
    "a centered image of a {c}.",
    "a catalogue picture showing a {c}.",
    "a small {tone} picture of a {c}.",
)


def source_dir() -> Path:
    return Path(os.environ.get("NEUCLIP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def default_data_dir() -> Path:
    """Where the prepared shards live (`NEUCLIP_DATA_DIR`, else ~/.cache/neuclip_hf)."""
    root = Path(os.environ.get("NEUCLIP_DATA_DIR", Path.home() / ".cache" / "neuclip_hf"))
    return root / f"fashion-mnist-captions-{VERSION}"


def read_idx(path: Path, header: int) -> np.ndarray:
    """An IDX file (gzipped) as uint8: header 16 bytes for images, 8 for labels."""
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def load_fashion_mnist(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) and labels (n,) of a split."""
    directory = directory or source_dir()
    images_file, labels_file = SPLITS[split]
    if not (directory / images_file).exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory} (missing {images_file}). Install it with "
            "`apt-get install dataset-fashion-mnist` or point NEUCLIP_FASHION_MNIST_DIR at the IDX files."
        )
    images = read_idx(directory / images_file, 16).reshape(-1, 28, 28)
    labels = read_idx(directory / labels_file, 8)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels


def caption_for(image: np.ndarray, label: int, rng: np.random.Generator) -> str:
    """A caption from a random template, with tone and fill measured on the image."""
    pixels = image[image > 0]
    tone = "dark" if pixels.size and pixels.mean() < 110 else "light" if pixels.size and pixels.mean() > 160 else "gray"
    fill = "wide" if (image > 0).mean() > 0.55 else "slim" if (image > 0).mean() < 0.3 else "medium-sized"
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = template.format(c=FASHION_MNIST_CLASSES[label], tone=tone, fill=fill)
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)  # "a ankle boot" -> "an ankle boot"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _write_split(split: str, out_dir: Path, source: Path | None, limit: int | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = load_fashion_mnist(split, source)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    rng = np.random.default_rng(0 if split == "train" else 1)
    offset = 0 if split == "train" else TEST_ID_OFFSET
    shards = np.array_split(np.arange(len(images)), NUM_SHARDS[split])
    files = []
    for shard_index, rows in enumerate(shards):
        records = {
            "image": [{"bytes": _png(images[i]), "path": f"{split}-{i:05d}.png"} for i in rows],
            "caption": [caption_for(images[i], int(labels[i]), rng) for i in rows],
            "label": [int(labels[i]) for i in rows],
            "class_name": [FASHION_MNIST_CLASSES[labels[i]] for i in rows],
            "sample_id": [offset + int(i) for i in rows],
        }
        path = out_dir / split / f"{split}-{shard_index:05d}-of-{len(shards):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(records), path)
        files.append(str(path))
    return files


def _read_manifest(out_dir: Path) -> dict | None:
    """The manifest of a prepared directory, or None when absent or unreadable."""
    try:
        return json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_current(manifest: dict | None, limit: int | None) -> bool:
    """A prepared copy can be reused: same format version and the same `limit`."""
    return bool(manifest) and manifest.get("version") == VERSION and manifest.get("limit") == limit


def prepare_default_data(
    out_dir: Path | str | None = None, source: Path | str | None = None, limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Write (once) and return the parquet shards of the default dataset, per split.

    Args:
        out_dir: Target directory (default `default_data_dir()`).
        source: Directory with the Fashion-MNIST IDX files (default `source_dir()`).
        limit: Keep only the first `limit` images of each split (tests). Needs an explicit `out_dir`, so a
            truncated copy never lands in the shared cache.
        overwrite: Rebuild even if the shards exist.

    The shards are written to a temporary directory and renamed into place under a file lock, so an interrupted
    preparation never leaves a half-written dataset behind and concurrent processes (the ranks of a first run)
    prepare it once. A copy of another format version or `limit` is rebuilt.
    """
    if limit is not None and out_dir is None:
        raise ValueError("prepare_default_data(limit=...) needs an explicit out_dir: the shared cache holds full data")
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir()
    if not overwrite and _is_current(_read_manifest(out_dir), limit):
        return _files_of(out_dir)
    from filelock import FileLock  # a dependency of datasets

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if overwrite or not _is_current(_read_manifest(out_dir), limit):  # another process may have finished it
            _prepare_locked(out_dir, Path(source) if source is not None else None, limit)
    return _files_of(out_dir)


def _prepare_locked(out_dir: Path, source: Path | None, limit: int | None) -> None:
    staging = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    files = {split: _write_split(split, staging, source, limit) for split in SPLITS}
    relative = {split: [str(Path(f).relative_to(staging)) for f in paths] for split, paths in files.items()}
    manifest = {"version": VERSION, "limit": limit, "files_relative": relative}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _files_of(out_dir: Path) -> dict[str, list[str]]:
    """Absolute shard paths per split, from the manifest's relative paths (the directory may have moved)."""
    relative = json.loads((out_dir / "manifest.json").read_text())["files_relative"]
    return {split: [str(out_dir / f) for f in paths] for split, paths in relative.items()}


def default_data_files(split: str = "train") -> list[str]:
    """Parquet shards of a split of the default dataset, preparing them on first use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the default dataset has {sorted(SPLITS)}")
    return prepare_default_data()[split]
