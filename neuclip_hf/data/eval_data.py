"""Evaluation sets as rows of `{"image", "caption", "label", "class_name"}`, read through the training data's reader.

`open_eval_data(spec)` accepts exactly what `--train_data` accepts (`sources.open_source`: globs, comma-separated
lists, parquet / arrow / webdataset / captions files, local directories, Hub dataset names) and finds the columns
with the same column lists (`samples.detect_columns`), plus:

- None, `"default"` or `"default:<split>"`: the embedded Fashion-MNIST captions (test split by default), which has
  labels and captions, so both zero-shot classification and retrieval apply;
- a directory of class sub-folders of images is an image folder (datasets' `imagefolder`): zero-shot
  classification with class names from the folder names (`ankle_boot` -> `ankle boot`);
- CLIP_benchmark's webdataset layout (the DataComp evaluation sets): `<dir>/<split>/{0..n-1}.tar` with
  `<split>/nshards.txt`, and `classnames.txt`, `zeroshot_classification_templates.txt` (templates with `{c}`) and
  `dataset_type.txt` (`retrieval`: the `txt` member holds one caption per line) next to the shards or one level
  up. A directory, a split directory or the shards themselves can be given;
- COCO captions JSON (`{"images": [...], "annotations": [...]}`) and Karpathy-split JSON (`{"images": [{"filename",
  "sentences": [{"raw"}], "split"}]}`): see `sources.open_source`; images resolve against the JSON's folder;
- labels come from a label column (`label`, `labels`, or a webdataset `.cls` member), class names from the
  `class_names` argument, `classnames.txt`, the label feature's names, or a `class_name` column. A caption column
  may hold a list of captions (COCO / Flickr style): every caption of an image is a positive in retrieval.

Images and captions stay undecoded here; the evaluator decodes them (`images.load_image`, `EvalData.captions`) so
that unreadable samples are skipped and counted, as in training.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from ..default_data import FASHION_MNIST_CLASSES
from ..images import BadSampleError
from .samples import CAPTION_COLUMNS, CLASS_NAME_COLUMNS, IMAGE_COLUMNS, LABEL_COLUMNS, detect_columns, read_caption
from .samples import resolve_image_path
from .sources import EVAL_SPLITS, SHARD_COLUMN, open_source

# CLIP_benchmark's webdataset metadata files (clip_benchmark/datasets/builder.py, build_wds_dataset).
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


@dataclass
class EvalData:
    """A re-iterable evaluation set.

    Attributes:
        rows: Returns a fresh iterator of `{"image", "caption", "has_caption", "label", "class_name"}` dicts
            (absent values None; `has_caption` says whether the source has a caption column at all).
        class_names: Class names for prompts, when the source defines them.
        description: What was read, for reports.
        json_caption_keys: The keys to read when the caption column holds JSON (None: plain text).
        templates: Prompt templates the data ships (`zeroshot_classification_templates.txt`), else None.
        templates_source: Where `templates` came from, for messages.
        caption_lines: Each line of a caption is a caption of its own (CLIP_benchmark retrieval shards).
        class_names_source: Where `class_names` came from (`folder names`, `classnames.txt`, ...), for messages.
        data_class_names: The names the data itself defines (before any given names replaced them), if any.
    """

    rows: Callable[[], Iterator[dict]]
    class_names: list[str] | None = None
    description: str = ""
    json_caption_keys: tuple[str, ...] | None = None
    templates: list[str] | None = None
    templates_source: str | None = None
    caption_lines: bool = False
    class_names_source: str | None = None
    data_class_names: list[str] | None = None

    def __iter__(self) -> Iterator[dict]:
        return self.rows()

    def caption(self, value) -> str:
        """The caption text of a row's raw caption (the first one of a list; raises `BadSampleError`)."""
        return read_caption(value, self.json_caption_keys)

    def captions(self, value) -> list[str]:
        """Every caption of a row: a list of captions (COCO style), or the lines of a CLIP_benchmark retrieval
        caption, else the single caption. Raises `BadSampleError` when one of them is missing or empty."""
        if self.json_caption_keys is not None:
            value = read_caption(value, self.json_caption_keys) if not _is_list(value) else value
        values = list(value) if _is_list(value) else [value]
        if not values:
            raise BadSampleError("caption_missing", "empty caption list")
        texts = [read_caption(item) for item in values]
        if self.caption_lines:
            texts = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
        return texts


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


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


# -- class names given by the user -------------------------------------------------------------------------------
def _name_key(name: str) -> str:
    """A spelling-insensitive key: `T-shirt/top`, `t_shirt_top` and `T shirt top` compare equal."""
    return "".join(character for character in str(name).lower() if character.isalnum())


def map_class_names(given: Sequence[str] | dict, data_names: Sequence[str] | None,
                    data_source: str | None = None) -> list[str]:
    """The prompt name of each label index from names the user gave, checked against the names the data defines.

    Args:
        given: One name per label index (label 0 first), or a mapping `{label: name}` whose keys are label indices
            (ints or digit strings) or the data's own class names (e.g. folder names).
        data_names: The data's class names in label order (sorted folder names for an image folder), if any.
        data_source: Where `data_names` come from, for messages.

    Raises:
        ValueError: a count that does not match the data's classes; a list that names the data's classes in another
            order (ambiguous: the data's order would silently pair images with the wrong names); a mapping key that
            is no label; a label left without a name.
    """
    where = f" ({data_source})" if data_source else ""
    if isinstance(given, dict):
        index_of = {_name_key(name): i for i, name in enumerate(data_names or [])}
        mapped: dict[int, str] = {}
        for key, name in given.items():
            text = str(key).strip()
            if text.isdigit():
                index = int(text)
            elif _name_key(text) in index_of:
                index = index_of[_name_key(text)]
            else:
                raise ValueError(f"class-name mapping key {text!r} is neither a label index nor one of the data's "
                                 f"class names{where}: {list(data_names or [])[:20]}")
            if index in mapped:
                raise ValueError(f"class-name mapping gives label {index} twice ({mapped[index]!r}, {name!r})")
            mapped[index] = str(name).strip()
        count = len(data_names) if data_names else max(mapped) + 1
        missing = [index for index in range(count) if index not in mapped]
        if missing or max(mapped) >= count:
            raise ValueError(f"class-name mapping must name each of the {count} labels 0..{count - 1} exactly; "
                             f"missing {missing[:10]}, out of range {[i for i in mapped if i >= count][:10]}")
        return [mapped[index] for index in range(count)]
    names = [str(name).strip() for name in given]
    if data_names is None:
        return names
    if len(names) != len(data_names):
        raise ValueError(f"{len(names)} class names given but the data has {len(data_names)} classes{where}: "
                         f"{list(data_names)[:20]}")
    given_keys, data_keys = [_name_key(n) for n in names], [_name_key(n) for n in data_names]
    shared = set(given_keys) & set(data_keys)
    if shared and given_keys != data_keys:
        first = next(i for i, (a, b) in enumerate(zip(given_keys, data_keys)) if a != b)
        raise ValueError(
            f"the class names given name the data's classes in another order: label {first} is "
            f"{data_names[first]!r} in the data{where} but {names[first]!r} in the names given. Give the names "
            f"in the data's label order ({', '.join(map(str, data_names))}) or a label:name mapping "
            "(e.g. a file with lines `ankle_boot: ankle boot`)")
    return names


def class_name_mapping_lines(class_names: Sequence[str], data_names: Sequence[str] | None) -> list[str]:
    """`label 0 (data: n01440764) -> tench` lines, to print before evaluating."""
    return [f"label {i}" + (f" ({data_names[i]})" if data_names and str(data_names[i]) != name else "") + f" -> {name}"
            for i, name in enumerate(class_names)]


# -- CLIP_benchmark's webdataset layout ---------------------------------------------------------------------------
@dataclass
class WdsMetadata:
    """What a CLIP_benchmark webdataset folder says besides its shards."""

    shards: list[str]
    class_names: list[str] | None = None
    templates: list[str] | None = None
    dataset_type: str = "classification"
    folder: str = ""


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _numbered(path: str) -> tuple:
    """Sort key: shard names by their numbers (`9.tar` before `10.tar`), then by name."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path)))


def _split_shards(folder: Path) -> list[str] | None:
    """The shards of a CLIP_benchmark split folder: `0.tar .. n-1.tar` from `nshards.txt`, else every `.tar`."""
    count_file = folder / NSHARDS_FILE
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{count_file}: expected a positive shard count, got {text[:40]!r}")
        shards = [folder / f"{index}.tar" for index in range(int(text))]
        missing = [str(path) for path in shards if not path.is_file()]
        if missing:
            raise ValueError(f"{count_file} announces {text} shards but {len(missing)} are missing, e.g. {missing[0]}")
        return [str(path) for path in shards]
    tars = sorted((str(path) for path in folder.glob("*.tar")), key=_numbered)
    return tars or None


def find_wds_metadata(spec: str, split: str | None) -> WdsMetadata | None:
    """CLIP_benchmark webdataset metadata for a spec (a dataset folder, a split folder, or shard files), else None.

    The metadata files are looked for next to the shards, then one level up (`<dir>/<split>/*.tar` with
    `<dir>/classnames.txt`); a folder counts as CLIP_benchmark's layout when it has `nshards.txt` or one of the
    metadata files.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    shards: list[str] | None = None
    if len(items) == 1 and os.path.isdir(os.path.expanduser(items[0])):
        folder = Path(os.path.expanduser(items[0]))
        for candidate in ([folder / split] if split else [folder / name for name in EVAL_SPLITS]) + [folder]:
            if candidate.is_dir() and (shards := _split_shards(candidate)):
                break
        if not shards:
            return None
    elif all(item.lower().endswith(".tar") for item in items):
        found = {path for item in items for path in glob.glob(os.path.expanduser(item)) if os.path.isfile(path)}
        shards = sorted(found, key=_numbered)
        if not shards:
            return None  # the generic reader reports the missing files
    else:
        return None
    shard_dir = Path(shards[0]).parent
    markers = (CLASSNAMES_FILE, TEMPLATES_FILE, DATASET_TYPE_FILE)
    folder = next((d for d in (shard_dir, shard_dir.parent) if any((d / name).is_file() for name in markers)), None)
    if folder is None and not (shard_dir / NSHARDS_FILE).is_file():
        return None  # plain webdataset shards: the generic reader handles them
    folder = folder or shard_dir.parent
    dataset_type = (_read_lines(folder / DATASET_TYPE_FILE) or ["classification"])[0].lower() \
        if (folder / DATASET_TYPE_FILE).is_file() else "classification"
    if dataset_type == "multilabel":
        raise ValueError(f"{folder}: multilabel datasets (.npy targets, mean average precision) are not supported")
    class_names = _read_lines(folder / CLASSNAMES_FILE) if (folder / CLASSNAMES_FILE).is_file() else None
    templates = _read_lines(folder / TEMPLATES_FILE) if (folder / TEMPLATES_FILE).is_file() else None
    return WdsMetadata(shards, class_names, templates, dataset_type, str(folder))


# -- opening --------------------------------------------------------------------------------------------------------
def open_eval_data(
    spec: str | Path | Sequence[str] | None = None,
    class_names: Sequence[str] | dict | None = None,
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
        class_names: Prompt names per label (needed for labels without names in the data): a list in label order
            or a `{label index or data class name: name}` mapping, checked by `map_class_names` against the names
            the data defines (a list naming the data's classes in another order is refused).
        split: Split of a dataset directory / Hub dataset / CLIP_benchmark folder / Karpathy JSON (default: the
            first of test, validation, valid, val, eval that exists; data with a single split is read whole).
        config_name: `datasets` configuration of a Hub dataset.
        image_column: Image column (default: detected).
        caption_column: Caption column, `<json column>.<key>` for a key inside JSON (default: detected, optional).
        label_column: Class-label column (default: detected, optional).

    Raises:
        ValueError: the spec names nothing readable, or a named column does not exist.
    """
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(item) for item in spec)
    spec = None if spec is None else str(spec)
    default_split = None
    if spec is None or spec == "default" or spec.startswith("default:"):
        default_split = spec.split(":", 1)[1] if spec and ":" in spec else (split or "test")
        spec = None
    metadata = None
    if spec is not None:
        try:
            metadata = find_wds_metadata(spec, split)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read evaluation data from {spec!r}: {error}") from None
    try:
        source = open_source(",".join(metadata.shards) if metadata else spec, default_split or split or EVAL_SPLITS,
                             config_name)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"cannot read evaluation data from {spec!r}: {error}") from None
    dataset = source.dataset
    names = list(dataset.features) if dataset.features is not None else list(next(iter(dataset)))
    columns = detect_columns(dataset.features, names, source.description, image_column, caption_column,
                             label_column=label_column, evaluation=True)
    # A webdataset sample may carry its image under any image extension (CLIP_benchmark reads the first of
    # webp, png, jpg, jpeg that a sample has): the other image fields are fallbacks of the detected one.
    image_fields = [columns.image] + [name for name in names if name != columns.image
                                      and name.rsplit(".", 1)[-1].lower() in WDS_IMAGE_EXTENSIONS]
    dataset = dataset.select_columns([name for name in dict.fromkeys(columns.needed + image_fields) if name in names])
    for name in image_fields:
        if dataset.features is not None and isinstance(dataset.features.get(name), datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))  # decoded (and judged) later
    label_feature = (dataset.features or {}).get(columns.label) if columns.label else None
    names_source = None
    if default_split is not None:
        description = f"default:{default_split} (Fashion-MNIST captions)"
        names_found, names_source = list(FASHION_MNIST_CLASSES), "the embedded Fashion-MNIST classes"
    elif metadata is not None:
        description = f"clip_benchmark:{metadata.folder} ({len(metadata.shards)} shard(s), {metadata.dataset_type})"
        names_found = metadata.class_names
        names_source = f"{Path(metadata.folder) / CLASSNAMES_FILE}" if names_found else None
    else:
        description = f"{source.builder_name}:{spec} ({source.description})"
        names_found = _label_names(label_feature)
        if names_found:
            names_source = "the sorted folder names" if source.builder_name == "imagefolder" else \
                "the label feature's names"
    data_names = names_found
    explicit = map_class_names(class_names, data_names, names_source) if class_names is not None else None
    relative = source.paths_relative_to_shard

    def rows() -> Iterator[dict]:
        for row in dataset:
            image = next((row[name] for name in image_fields if row.get(name) is not None), None)
            yield {
                "image": resolve_image_path(image, row.get(SHARD_COLUMN)) if relative else image,
                "caption": row.get(columns.caption) if columns.caption else None,
                "has_caption": columns.caption is not None,
                "label": parse_label(row.get(columns.label)) if columns.label else None,
                "class_name": row.get(columns.class_name) if columns.class_name else None,
            }

    return EvalData(
        rows, explicit or names_found, description, columns.json_caption_keys,
        templates=metadata.templates if metadata else None,
        templates_source=str(Path(metadata.folder) / TEMPLATES_FILE) if metadata and metadata.templates else None,
        caption_lines=bool(metadata and metadata.dataset_type == "retrieval"),
        class_names_source="given" if explicit else names_source,
        data_class_names=list(data_names) if data_names else None,
    )


def as_eval_data(data, class_names: Sequence[str] | None = None) -> EvalData:
    """An `EvalData` from a spec (see `open_eval_data`), an `EvalData`, or any re-iterable of row dicts
    (a `datasets.Dataset`, an `IterableDataset`, a list of dicts) with image / caption / label columns."""
    if isinstance(data, EvalData):
        if class_names is not None:
            data.class_names, data.class_names_source = list(class_names), "given"
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
    return EvalData(lambda: (normalize_row(row) for row in data), names, type(data).__name__,
                    class_names_source="given" if class_names is not None else None)


__all__ = ["EvalData", "WdsMetadata", "as_eval_data", "class_name_mapping_lines", "find_wds_metadata",
           "map_class_names", "normalize_row", "open_eval_data", "parse_label"]
