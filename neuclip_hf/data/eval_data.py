"""Evaluation sets as rows of `{"image", "caption", "label", "class_name"}`, read through the training data's reader.

`open_eval_data(spec)` accepts exactly what `--train_data` accepts (`sources.open_source`: globs, comma-separated
lists, parquet / arrow / webdataset / captions files, local directories, Hub dataset names) and finds the columns
with the same column lists (`samples.detect_columns`), plus:

- None, `"default"` or `"default:<split>"`: the embedded Fashion-MNIST captions (test split by default), which has
  labels and captions, so both zero-shot classification and retrieval apply;
- a directory of class sub-folders of images is an image folder (datasets' `imagefolder`): zero-shot
  classification with class names from the folder names (`ankle_boot` -> `ankle boot`);
- labels come from a label column (`label`, `labels`, or a webdataset `.cls` member), class names from the
  `class_names` argument, the label feature's names, or a `class_name` column.

Images and captions stay undecoded here; the evaluator decodes them (`images.load_image`, `EvalData.caption`) so
that unreadable samples are skipped and counted, as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..default_data import FASHION_MNIST_CLASSES
from .samples import CAPTION_COLUMNS, CLASS_NAME_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, detect_columns, read_caption
from .samples import resolve_image_path
from .sources import EVAL_SPLITS, SHARD_COLUMN, open_source


@dataclass
class EvalData:
    """A re-iterable evaluation set.

    Attributes:
        rows: Returns a fresh iterator of `{"image", "caption", "has_caption", "label", "class_name"}` dicts
            (absent values None; `has_caption` says whether the source has a caption column at all).
        class_names: Class names for prompts, when the source defines them.
        description: What was read, for reports.
        json_caption_keys: The keys to read when the caption column holds JSON (None: plain text).
    """

    rows: Callable[[], Iterator[dict]]
    class_names: list[str] | None = None
    description: str = ""
    json_caption_keys: tuple[str, ...] | None = None

    def __iter__(self) -> Iterator[dict]:
        return self.rows()

    def caption(self, value) -> str:
        """The caption text of a row's raw caption (raises `BadSampleError` for a bad one)."""
        return read_caption(value, self.json_caption_keys)


def _first(row: dict, names: Sequence[str]):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


def parse_label(value) -> int | None:
    """An integer class label from an int, a digit string or the bytes of a webdataset `.cls` member; None (the row
    is unlabelled) for anything else, e.g. -1 or an empty member."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() else None


def normalize_row(row: dict) -> dict:
    """Map a generic row's columns (`jpg`, `txt`, `cls`, ...) onto `image`, `caption`, `label`, `class_name`."""
    return {
        "image": _first(row, IMAGE_COLUMNS),
        "caption": _first(row, CAPTION_COLUMNS),
        "has_caption": any(name in row for name in CAPTION_COLUMNS),  # a caption column, even if this row's is empty
        "label": parse_label(_first(row, LABEL_COLUMNS)),
        "class_name": _first(row, CLASS_NAME_COLUMNS),
    }


def _label_names(feature) -> list[str] | None:
    """Class names of a `ClassLabel` feature, as prompt text (`ankle_boot` -> `ankle boot`)."""
    names = getattr(feature, "names", None)
    return [str(name).replace("_", " ") for name in names] if names else None


def open_eval_data(
    spec: str | Path | Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    split: str | None = None,
    config_name: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> EvalData:
    """Open an evaluation set (see the module docstring for the specs).

    Args:
        spec: What to read, in `--train_data`'s forms; a list of paths is a comma-separated list. None is the
            embedded default's test split.
        class_names: Override the class names (needed for labels without names in the data).
        split: Split of a dataset directory / Hub dataset (default: the first of test, validation, valid, val, eval
            that exists; data with a single split is read whole).
        config_name: `datasets` configuration of a Hub dataset.
        image_column: Image column (default: detected).
        caption_column: Caption column, `<json column>.<key>` for a key inside JSON (default: detected, optional).
        label_column: Class-label column (default: detected, optional).

    Raises:
        ValueError: the spec names nothing readable, or a named column does not exist.
    """
    explicit = list(class_names) if class_names is not None else None
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(item) for item in spec)
    spec = None if spec is None else str(spec)
    default_split = None
    if spec is None or spec == "default" or spec.startswith("default:"):
        default_split = spec.split(":", 1)[1] if spec and ":" in spec else (split or "test")
        spec = None
    try:
        source = open_source(spec, default_split or split or EVAL_SPLITS, config_name)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"cannot read evaluation data from {spec!r}: {error}") from None
    dataset = source.dataset
    names = list(dataset.features) if dataset.features is not None else list(next(iter(dataset)))
    columns = detect_columns(dataset.features, names, source.description, image_column, caption_column,
                             label_column=label_column, evaluation=True)
    dataset = dataset.select_columns([name for name in columns.needed if name in names])
    if dataset.features is not None and isinstance(dataset.features.get(columns.image), datasets.Image):
        dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))  # decoded (and judged) later
    label_feature = (dataset.features or {}).get(columns.label) if columns.label else None
    if default_split is not None:
        description = f"default:{default_split} (Fashion-MNIST captions)"
        names_found = list(FASHION_MNIST_CLASSES)
    else:
        description = f"{source.builder_name}:{spec} ({source.description})"
        names_found = _label_names(label_feature)
    relative = source.paths_relative_to_shard

    def rows() -> Iterator[dict]:
        for row in dataset:
            image = row.get(columns.image)
            yield {
                "image": resolve_image_path(image, row.get(SHARD_COLUMN)) if relative else image,
                "caption": row.get(columns.caption) if columns.caption else None,
                "has_caption": columns.caption is not None,
                "label": parse_label(row.get(columns.label)) if columns.label else None,
                "class_name": row.get(columns.class_name) if columns.class_name else None,
            }

    return EvalData(rows, explicit or names_found, description, columns.json_caption_keys)


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


__all__ = ["EvalData", "as_eval_data", "normalize_row", "open_eval_data", "parse_label"]
