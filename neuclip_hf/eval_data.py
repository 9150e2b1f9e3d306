"""Evaluation sets as rows of `{"image", "label", "caption"}`: the embedded default, ImageFolder, parquet, webdataset.

A self-contained reader for held-out data (the streaming training input lives in `data.py`). Images and captions
stay undecoded here; the evaluator decodes them with `images.load_image` / `load_caption` so that unreadable
samples are skipped and counted, as in training.

Specs understood by `open_eval_data`:
- None, `"default"` or `"default:<split>"`: the embedded Fashion-MNIST captions (test split by default), which
  has labels and captions, so both zero-shot classification and retrieval apply.
- A directory of class subfolders of images (ImageFolder): zero-shot classification, class names from the folder
  names (`ankle_boot` -> `ankle boot`).
- Parquet files (a file, a directory or a glob): columns `image` (bytes, {bytes, path} or an `Image` feature),
  optional `caption` / `text`, `label` and `class_name`.
- WebDataset tar shards (a file, a directory or a glob): `jpg` / `png` / `webp` ..., `txt` and `cls` members.
"""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from .default_data import FASHION_MNIST_CLASSES, default_data_files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
IMAGE_COLUMNS = ("image", "img", *IMAGE_EXTENSIONS)
CAPTION_COLUMNS = ("caption", "text", "txt")
LABEL_COLUMNS = ("label", "labels", "cls")
CLASS_NAME_COLUMNS = ("class_name", "classname")


@dataclass
class EvalData:
    """A re-iterable evaluation set.

    Attributes:
        rows: Returns a fresh iterator of `{"image", "caption", "has_caption", "label", "class_name"}` dicts
            (absent values None; `has_caption` says whether the source row has a caption column at all).
        class_names: Class names for prompts, when the source defines them.
        description: What was read, for reports.
    """

    rows: Callable[[], Iterator[dict]]
    class_names: list[str] | None = None
    description: str = ""

    def __iter__(self) -> Iterator[dict]:
        return self.rows()


def _first(row: dict, names: Sequence[str]):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


def normalize_row(row: dict) -> dict:
    """Map a source row's columns (`jpg`, `txt`, `cls`, ...) onto `image`, `caption`, `label`, `class_name`."""
    label = _first(row, LABEL_COLUMNS)
    if isinstance(label, (bytes, bytearray)):  # webdataset `.cls` members hold the label as text
        label = label.decode("utf-8", errors="replace").strip()
    label = int(label) if label is not None and str(label).strip().isdigit() else None  # -1 / "" : unlabelled
    return {
        "image": _first(row, IMAGE_COLUMNS),
        "caption": _first(row, CAPTION_COLUMNS),
        "has_caption": any(name in row for name in CAPTION_COLUMNS),  # a caption column, even if this row's is empty
        "label": label,
        "class_name": _first(row, CLASS_NAME_COLUMNS),
    }


def _expand(spec: str | Path | Sequence[str], suffix: str) -> list[str]:
    """Files with `suffix` named by a file, a directory (searched recursively), a glob or a list of those."""
    if isinstance(spec, (list, tuple)):
        return sorted(f for item in spec for f in _expand(item, suffix))
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob(f"*{suffix}"))
    if path.is_file():
        return [str(path)] if path.name.endswith(suffix) else []
    return sorted(f for f in glob.glob(str(spec), recursive=True) if f.endswith(suffix))


def parquet_rows(files: list[str]) -> Iterator[dict]:
    """Rows of parquet files through `datasets` (streaming), images left undecoded."""
    dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image):  # decode later, per sample, so a bad image is skipped not fatal
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    for row in dataset:
        yield normalize_row(row)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: `dir/key.ext1.ext2` -> (`dir/key`, `ext1.ext2`)."""
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension.lower()


def webdataset_rows(files: list[str]) -> Iterator[dict]:
    """Samples of WebDataset tar shards: consecutive members sharing a key form one sample."""
    for path in files:
        with tarfile.open(path) as archive:
            key, sample = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_member(member.name)
                if member_key != key and sample:
                    yield normalize_row(sample)
                    sample = {}
                key = member_key
                sample[extension] = archive.extractfile(member).read()
            if sample:
                yield normalize_row(sample)


def image_folder(directory: str | Path) -> EvalData:
    """An ImageFolder tree: one subfolder per class (sorted names -> labels 0, 1, ...), image files inside."""
    directory = Path(directory)
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{directory} has no class subfolders")
    files = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((directory / name).rglob("*"))
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    if not files:
        raise ValueError(f"{directory} has class subfolders but no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def rows() -> Iterator[dict]:
        for path, label in files:
            yield {"image": path, "caption": None, "has_caption": False, "label": label, "class_name": None}

    names = [name.replace("_", " ") for name in classes]
    return EvalData(rows, names, f"imagefolder:{directory} ({len(files)} images, {len(classes)} classes)")


def open_eval_data(
    spec: str | Path | Sequence[str] | None = None, class_names: Sequence[str] | None = None
) -> EvalData:
    """Open an evaluation set (see the module docstring for the specs).

    Args:
        spec: What to read; None is the embedded default's test split.
        class_names: Override the class names (needed for parquet / webdataset labels without a `class_name`).

    Raises:
        ValueError: the spec names nothing readable.
    """
    explicit = list(class_names) if class_names is not None else None
    if spec is None or (isinstance(spec, str) and (spec == "default" or spec.startswith("default:"))):
        split = "test" if spec in (None, "default") else spec.split(":", 1)[1]
        files = default_data_files(split)
        return EvalData(lambda: parquet_rows(files), explicit or list(FASHION_MNIST_CLASSES),
                        f"default:{split} (Fashion-MNIST captions)")
    parquet, tars = _expand(spec, ".parquet"), _expand(spec, ".tar")
    if not parquet and not tars and isinstance(spec, (str, Path)) and Path(spec).is_dir():
        data = image_folder(spec)
        data.class_names = explicit or data.class_names
        return data
    if parquet and tars:
        raise ValueError(f"{spec} mixes parquet and tar files; point it at one format")
    where = spec if isinstance(spec, (str, Path)) else Path(str(spec[0])).parent
    if parquet:
        return EvalData(lambda: parquet_rows(parquet), explicit, f"parquet:{where} ({len(parquet)} files)")
    if tars:
        return EvalData(lambda: webdataset_rows(tars), explicit, f"webdataset:{where} ({len(tars)} shards)")
    raise ValueError(
        f"cannot read evaluation data from {spec!r}: expected 'default', an ImageFolder directory, or parquet / "
        "webdataset (.tar) files"
    )


def as_eval_data(data, class_names: Sequence[str] | None = None) -> EvalData:
    """An `EvalData` from a spec (see `open_eval_data`), an `EvalData`, or any re-iterable of row dicts
    (a `datasets.Dataset`, an `IterableDataset`, a list of dicts) with image / caption / label columns."""
    if isinstance(data, EvalData):
        if class_names is not None:
            data.class_names = list(class_names)
        return data
    if data is None or isinstance(data, (str, Path)) or (
        isinstance(data, (list, tuple)) and data and all(isinstance(item, (str, Path)) for item in data)
    ):
        return open_eval_data(data, class_names)
    if not isinstance(data, Iterable):
        raise TypeError(f"cannot evaluate on a {type(data).__name__}: give a spec string or an iterable of rows")
    if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        for name, feature in (data.features or {}).items():
            if isinstance(feature, datasets.Image):  # decode per sample in the evaluator: bad images are skipped
                data = data.cast_column(name, datasets.Image(decode=False))
    label_feature = (getattr(data, "features", None) or {}).get("label")
    names = list(class_names) if class_names is not None else getattr(label_feature, "names", None)
    return EvalData(lambda: (normalize_row(row) for row in data), names, type(data).__name__)


__all__ = ["EvalData", "as_eval_data", "image_folder", "normalize_row", "open_eval_data"]
