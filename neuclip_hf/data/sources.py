"""Where image-text pairs come from: a `--train_data` / `--eval_data` spec resolved into a streaming dataset.

Every source is read by `datasets` in streaming mode (`load_dataset_builder(...).as_streaming_dataset(split)`,
which is exactly what `load_dataset(..., streaming=True)` does), so local shards, a local "Hub-style" dataset
directory and a Hub dataset name share one code path. A spec is one of:

* `None`: the embedded default dataset (Fashion-MNIST captions, parquet shards; see `default_data.py`);
* a glob, a file, or a comma-separated list of them: `.tar` / `.tar.gz` / `.tgz` (webdataset), `.parquet`,
  `.arrow`, or captions files (`.jsonl` / `.json` / `.csv` / `.tsv`) whose image column holds image paths
  relative to the captions file;
* a COCO captions JSON (`images` + `annotations`) or a Karpathy-split JSON (`images` with `sentences`): one row per
  image with the list of its captions (`_caption_annotations`);
* a local directory: with `captions.{jsonl,json,csv,tsv}` at its top level (or one folder down), a folder of
  images with captions files; otherwise a dataset directory resolved by `datasets` itself (parquet / webdataset
  shards under `data/`, an imagefolder with `metadata.jsonl`, a README with `configs:`);
* anything else: a Hub dataset name (`org/name`), resolved by `datasets` exactly like the directory case.

Each example carries the column `__shard__` (the file it was read from), so a bad sample is reported with its
shard. Packaged builders are specialised by swapping the builder instance's class for a subclass that adds that
column (`_with_shard_names`); webdataset tars are read with `RawWebDataset`, which keeps every field as bytes so
that a caption that is not UTF-8 or a JSON that does not parse is a counted bad sample instead of a crash of the
stream (the stock builder decodes `.txt` / `.json` inside the generator).
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features, Image, IterableDataset, List, Value, load_dataset_builder
from datasets.builder import Key
from datasets.load import configure_builder_class
from datasets.packaged_modules.arrow.arrow import Arrow
from datasets.packaged_modules.csv.csv import Csv
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.packaged_modules.json.json import Json
from datasets.packaged_modules.parquet.parquet import Parquet
from datasets.packaged_modules.webdataset.webdataset import IMAGE_EXTENSIONS, WebDataset

from ..default_data import default_data_files

SHARD_COLUMN = "__shard__"
SHARD_ERROR_COLUMN = "__shard_error__"  # set on the one example that stands for the unreadable rest of a tar
# What reading a damaged tar raises: a truncated or corrupt archive (tarfile), a compressed stream that ends early
# (EOFError, zlib / gzip errors) or a duplicated member (ValueError from the webdataset grouping).
DAMAGED_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)
# Members of a webdataset sample that may hold its image / caption: a shard may mix them sample by sample.
WEBDATASET_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_CAPTION_FIELDS = ("txt", "json")
FILE_FORMATS = {  # file name ending -> `datasets` packaged builder
    ".tar": "webdataset", ".tar.gz": "webdataset", ".tgz": "webdataset",
    ".parquet": "parquet", ".arrow": "arrow",
    ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
}
CAPTIONS_FILE_NAMES = ("captions.jsonl", "captions.json", "captions.csv", "captions.tsv")
GLOB_CHARACTERS = set("*?[")
EVAL_SPLITS = ("test", "validation", "valid", "val", "eval")  # conventional evaluation split names, in preference


@dataclass
class Source:
    """A resolved spec: the streaming dataset plus what is needed to describe it and count it.

    Attributes:
        dataset: The streaming dataset, one example per image-text pair, with a `__shard__` column.
        description: Human-readable origin, used in errors and logs.
        builder_name: The `datasets` builder that reads it (`parquet`, `webdataset`, `json`, ...).
        num_examples: Examples in the split when `datasets` knows it from metadata (Hub dataset cards), else None.
        paths_relative_to_shard: Image path strings are relative to the shard's directory (captions files).
        data_files: The files of the split as `datasets` resolved them (local paths, or `hf://` URLs of a Hub
            dataset); empty when the builder has none (e.g. a scripted dataset).
    """

    dataset: IterableDataset
    description: str
    builder_name: str
    num_examples: int | None = None
    paths_relative_to_shard: bool = False
    data_files: tuple[str, ...] = ()


def _file_format(path: str) -> str | None:
    """The builder for a data file, from its name ending (None when unknown)."""
    name = path.lower()
    for ending in sorted(FILE_FORMATS, key=len, reverse=True):  # ".tar.gz" before ".gz"-less ".tar"
        if name.endswith(ending):
            return FILE_FORMATS[ending]
    return None


def _expand(item: str) -> list[str]:
    """The files named by one spec item: a glob (sorted matches) or an existing file."""
    if GLOB_CHARACTERS & set(item):
        matches = sorted(path for path in glob.glob(os.path.expanduser(item), recursive=True) if os.path.isfile(path))
        if not matches:
            raise FileNotFoundError(f"the pattern {item!r} matched no file")
        return matches
    path = os.path.expanduser(item)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {item!r}")
    return [path]


def _captions_files(directory: Path) -> list[str]:
    """Captions files of a folder-of-images source: at the top level, else one folder down (sorted)."""
    for pattern in ("{}", "*/{}"):
        found = sorted(str(p) for name in CAPTIONS_FILE_NAMES for p in directory.glob(pattern.format(name)))
        if found:
            return found
    return []


def _files_source(files: list[str], spec: str) -> tuple[str, dict, bool]:
    """Builder name, builder kwargs and "paths relative to shard" for a list of data files of one format."""
    formats = {path: _file_format(path) for path in files}
    unknown = [path for path, fmt in formats.items() if fmt is None]
    if unknown:
        raise ValueError(
            f"data spec {spec!r}: cannot tell the format of {unknown[:3]}; use one of {sorted(FILE_FORMATS)}"
        )
    kinds = set(formats.values())
    if len(kinds) > 1:
        raise ValueError(f"data spec {spec!r} mixes formats {sorted(kinds)}; give files of a single format")
    kind = kinds.pop()
    kwargs: dict = {"data_files": {"data": files}}
    if kind == "csv" and all(path.lower().endswith(".tsv") for path in files):
        kwargs["sep"] = "\t"  # tab-separated captions files
    return kind, kwargs, kind in ("json", "csv")  # json / csv rows name their images by relative path


def open_source(spec: str | None, split: str | tuple[str, ...] = "train", config_name: str | None = None) -> Source:
    """Resolve a data spec into a streaming `Source` (see the module docstring for the accepted specs).

    Args:
        spec: Glob, file, comma-separated list, local directory, Hub dataset name, or None (embedded default).
        split: Split of a dataset directory / Hub dataset (`train`, `test`, ...), or a tuple of candidates (the
            first one the dataset has is used); for the embedded default, an evaluation name (`test`, `validation`,
            ...) picks its test split and anything else its train split; plain data files have a single split.
        config_name: `datasets` configuration name of a dataset directory / Hub dataset.

    Raises:
        FileNotFoundError: a glob that matched nothing, or a missing file in a list.
        ValueError: unknown or mixed file formats, an unknown split.
    """
    candidates = (split,) if isinstance(split, str) else tuple(split)
    if spec is None:
        default_split = "test" if candidates[0] in EVAL_SPLITS else "train"
        files = default_data_files(default_split)
        return _stream("parquet", {"data_files": {"data": files}}, "data", f"embedded default ({default_split})", False)
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"empty data spec {spec!r}")
    if len(items) == 1 and os.path.isdir(os.path.expanduser(items[0])):
        directory = Path(os.path.expanduser(items[0]))
        captions = _captions_files(directory)
        if captions:  # a folder of images with captions files
            kind, kwargs, relative = _files_source(captions, spec)
            return _stream(kind, kwargs, "data", f"image folder {directory} ({len(captions)} captions files)", relative)
        return _stream(str(directory), {"name": config_name}, candidates, f"dataset directory {directory}", False)
    looks_like_files = len(items) > 1 or GLOB_CHARACTERS & set(items[0]) or _file_format(items[0]) is not None
    if len(items) == 1 and items[0].lower().endswith(".json") and os.path.isfile(os.path.expanduser(items[0])):
        annotated = _caption_annotations(os.path.expanduser(items[0]), candidates)
        if annotated is not None:
            return annotated
    if looks_like_files or os.path.exists(os.path.expanduser(items[0])):
        files = [path for item in items for path in _expand(item)]
        kind, kwargs, relative = _files_source(files, spec)
        return _stream(kind, kwargs, "data", f"{len(files)} {kind} file(s) from {spec!r}", relative)
    item = items[0]
    if os.path.isabs(os.path.expanduser(item)) or item.startswith((".", "~")) or item.count("/") > 1:
        raise FileNotFoundError(f"no such local file or directory: {item}")  # not a Hub name: say so, in one line
    try:  # a Hub dataset name: datasets resolves (and streams) it like a dataset directory
        return _stream(items[0], {"name": config_name}, candidates, f"Hub dataset {items[0]}", False)
    except (FileNotFoundError, ConnectionError, OSError) as error:
        raise FileNotFoundError(
            f"data spec {spec!r} is neither an existing file, glob or directory, nor a loadable Hub dataset "
            f"({type(error).__name__}: {error})"
        ) from error


def _caption_annotations(path: str, splits: tuple[str, ...]) -> Source | None:
    """A COCO captions file (`images` + `annotations`) or a Karpathy-split file (`images` with `sentences`) as one
    row per image with the list of its captions; None for any other JSON (read by the `json` builder).

    Image paths resolve against the file's folder (COCO: `file_name`; Karpathy: `filepath/filename`). A Karpathy
    file is filtered to the first of `splits` its entries use (e.g. `test`), or read whole when none matches.
    """
    with open(path, encoding="utf-8") as handle:
        if handle.read(1) != "{":
            return None
        handle.seek(0)
        try:
            document = json.load(handle)
        except json.JSONDecodeError:
            return None  # e.g. JSON lines with a .json name
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images or not isinstance(images[0], dict):
        return None
    root = os.path.dirname(os.path.abspath(path))
    if "annotations" in document:  # COCO: captions are separate records pointing at image ids
        captions: dict = {}
        for note in document["annotations"]:
            captions.setdefault(note["image_id"], []).append(note["caption"])
        rows = [{"image": os.path.join(root, entry["file_name"]), "caption": captions.get(entry["id"], []),
                 "image_id": str(entry["id"])} for entry in images]
        kind, split = "coco", None
    elif "sentences" in images[0]:  # Karpathy: captions inside each image entry, with a split per image
        present = {entry.get("split") for entry in images}
        split = next((name for name in splits if name in present), None)
        rows = [{"image": os.path.join(root, entry.get("filepath", ""), entry["filename"]),
                 "caption": [sentence["raw"] for sentence in entry["sentences"]],
                 "image_id": str(entry.get("imgid", entry.get("cocoid", index)))}
                for index, entry in enumerate(images) if split is None or entry.get("split") == split]
        kind = "karpathy"
    else:
        return None
    for row in rows:
        row[SHARD_COLUMN] = path
    features = Features({"image": Value("string"), "caption": List(Value("string")), "image_id": Value("string"),
                         SHARD_COLUMN: Value("string")})
    dataset = Dataset.from_list(rows, features=features).to_iterable_dataset()
    where = f" [{split}]" if split else ""
    return Source(dataset, f"{kind} captions file {path}{where} ({len(rows)} images)", kind, len(rows), False, (path,))


def _stream(path: str, kwargs: dict, split: str | tuple[str, ...], description: str, relative: bool) -> Source:
    """Build the `datasets` builder, give it shard names, and stream `split` (the first available candidate)."""
    builder = _with_shard_names(load_dataset_builder(path, **{k: v for k, v in kwargs.items() if v is not None}))
    candidates = (split,) if isinstance(split, str) else split
    available = list(getattr(builder.config, "data_files", None) or builder.info.splits or [])
    # The first candidate the data has; data with a single split (e.g. an image folder) is read whole.
    fallback = available[0] if len(available) == 1 else candidates[0]
    split = next((name for name in candidates if name in available), fallback)
    try:
        dataset = builder.as_streaming_dataset(split=split)
    except ValueError as error:
        raise ValueError(f"{description}: cannot stream split {split!r} (available: {available}): {error}") from None
    splits = builder.info.splits
    num_examples = splits[split].num_examples if splits and split in splits and splits[split].num_examples else None
    data_files = getattr(builder.config, "data_files", None) or {}
    return Source(dataset, f"{description} [{split}]" if len(available) > 1 else description, builder.name,
                  num_examples, relative, tuple(str(f) for f in data_files.get(split, ())))


def _shard_label(shard) -> str:
    """A readable name for what `_generate_shards` yields: a path, or a dict describing part of a file."""
    if isinstance(shard, dict):  # e.g. parquet row groups: {"fragment_data_file": path, "fragment_row_groups": ...}
        shard = next((value for value in shard.values() if isinstance(value, str)), repr(shard))
    return str(shard)


def _shard_labels(builder, gen_kwargs: dict) -> list[str]:
    """Shard names aligned with `Key.original_shard_id` for one call of the builder's generator."""
    accepted = inspect.signature(builder._generate_shards).parameters
    try:
        return [_shard_label(s) for s in builder._generate_shards(**{k: v for k, v in gen_kwargs.items()
                                                                       if k in accepted})]
    except NotImplementedError:
        return []


def _label_for(key, labels: list[str]) -> str:
    shard_id = key.original_shard_id if isinstance(key, Key) else None
    return labels[shard_id] if shard_id is not None and shard_id < len(labels) else "<unknown shard>"


class _ShardNamed:
    """Declares the `__shard__` column once the builder knows its features."""

    def _split_generators(self, dl_manager):
        splits = super()._split_generators(dl_manager)
        if self.info.features is not None:
            self.info.features[SHARD_COLUMN] = Value("string")
        return splits


class _ShardNamedTables(_ShardNamed):
    """Mixin for Arrow-based packaged builders (parquet, json, csv, arrow): adds the `__shard__` column."""

    def _generate_tables(self, **gen_kwargs):
        labels = _shard_labels(self, gen_kwargs)
        for key, table in super()._generate_tables(**gen_kwargs):
            column = pa.array([_label_for(key, labels)] * table.num_rows, pa.string())
            index = table.schema.get_field_index(SHARD_COLUMN)  # the builder's cast may have added it (as nulls)
            table = table.set_column(index, SHARD_COLUMN, column) if index >= 0 else table.append_column(
                SHARD_COLUMN, column)
            yield key, table


class _ShardNamedExamples(_ShardNamed):
    """Mixin for generator-based packaged builders (imagefolder): adds `__shard__` to every example."""

    def _generate_examples(self, **gen_kwargs):
        labels = _shard_labels(self, gen_kwargs)
        for key, example in super()._generate_examples(**gen_kwargs):
            example[SHARD_COLUMN] = _label_for(key, labels)
            yield key, example


class ShardNamedParquet(_ShardNamedTables, Parquet):
    """Parquet builder with a `__shard__` column."""


class ShardNamedJson(_ShardNamedTables, Json):
    """JSON / JSON-lines builder with a `__shard__` column."""


class ShardNamedCsv(_ShardNamedTables, Csv):
    """CSV builder with a `__shard__` column."""


class ShardNamedArrow(_ShardNamedTables, Arrow):
    """Arrow-file builder with a `__shard__` column."""


class ShardNamedImageFolder(_ShardNamedExamples, ImageFolder):
    """Imagefolder builder (images + metadata.jsonl/csv) with a `__shard__` column."""


class RawWebDataset(WebDataset):
    """Webdataset builder that keeps every field as raw bytes and tolerates samples with missing fields.

    Differences from the stock builder: no field is decoded (`DECODERS` is empty; captions are decoded by
    `images.load_caption` and JSON by the sample decoder, so bad text is a counted bad sample); features are the
    union of the fields of the first samples (the stock inference raises if one of the first five samples lacks
    a field, e.g. a missing caption); image fields are `Image(decode=False)`; `__shard__` names the tar.
    """

    DECODERS: dict = {}
    NUM_EXAMPLES_FOR_FEATURES_INFERENCE = 64

    def _split_generators(self, dl_manager):
        if not self.info.features:
            self.info.features = self._infer_features(dl_manager)
        return super()._split_generators(dl_manager)

    def _infer_features(self, dl_manager) -> Features:
        """Union of the fields of the first samples of the first tar, image fields as undecoded images.

        When one image extension (`jpg`, `jpeg`, `png`, `webp`) is seen, all four are declared, and both `txt` and
        `json` when one of them is: a shard may mix them sample by sample (img2dataset output does), and a field
        that is not declared would be dropped from every later sample.
        """
        data_files = dl_manager.download(self.config.data_files)
        first_tar = next(iter(data_files.values()))[0]
        samples = islice(self._get_pipeline_from_tar(first_tar, dl_manager.iter_archive(first_tar)),
                         self.NUM_EXAMPLES_FOR_FEATURES_INFERENCE)
        fields: dict = {}
        try:
            for sample in samples:
                fields.update(dict.fromkeys(name for name in sample if not name.startswith("__")))
        except DAMAGED_TAR_ERRORS:
            pass  # a damaged first tar: the fields of the samples before the damage (the reader counts the damage)
        if not fields:
            raise ValueError(f"no webdataset sample found in {first_tar} (expected files named <key>.<field>)")
        for family in (WEBDATASET_IMAGE_FIELDS, WEBDATASET_CAPTION_FIELDS):
            if any(name in fields for name in family):
                fields.update(dict.fromkeys(family))
        features = Features({
            name: Image(decode=False) if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS else Value("binary")
            for name in fields
        })
        features["__key__"] = Value("string")
        features[SHARD_COLUMN] = Value("string")
        features[SHARD_ERROR_COLUMN] = Value("string")
        return features

    def _generate_examples(self, tar_paths, tar_iterators):
        special = ("__key__", SHARD_COLUMN, SHARD_ERROR_COLUMN)
        fields = [name for name in self.info.features if name not in special]
        image_fields = {name for name in fields if isinstance(self.info.features[name], Image)}
        for tar_index, (tar_path, tar_iterator) in enumerate(zip(tar_paths, tar_iterators, strict=True)):
            sample_index = -1
            try:
                for sample_index, sample in enumerate(self._get_pipeline_from_tar(tar_path, tar_iterator)):
                    example = {"__key__": sample["__key__"], SHARD_COLUMN: str(tar_path), SHARD_ERROR_COLUMN: None}
                    for name in fields:  # fields unseen during inference are dropped; missing ones are None
                        value = sample.get(name)
                        if name in image_fields and value is not None:
                            value = {"path": f"{sample['__key__']}.{name}", "bytes": value}
                        example[name] = value
                    yield Key(tar_index, sample_index), example
            except DAMAGED_TAR_ERRORS as error:
                # The samples before the damage were yielded; one example stands for the rest of the tar, which the
                # sample decoder counts as `shard_truncated` (a crash of the DataLoader worker otherwise).
                damaged = {name: None for name in fields}
                damaged.update({"__key__": None, SHARD_COLUMN: str(tar_path),
                                SHARD_ERROR_COLUMN: f"{type(error).__name__}: {error} after {sample_index + 1} "
                                                    "sample(s); the rest of the shard is skipped"})
                yield Key(tar_index, sample_index + 1), damaged


_SHARD_NAMED = {Parquet: ShardNamedParquet, Json: ShardNamedJson, Csv: ShardNamedCsv, Arrow: ShardNamedArrow,
                ImageFolder: ShardNamedImageFolder, WebDataset: RawWebDataset}


def _with_shard_names(builder):
    """Specialise a packaged builder instance in place (same configuration, a subclass adding shard names).

    For a dataset directory or Hub dataset, `datasets` builds a configured subclass of the packaged builder (its
    `BUILDER_CONFIGS` come from the data layout / README); it is rebuilt around our subclass with the same
    configuration, and stays picklable (`datasets` pickles it through its parent class). Builders of other kinds
    are returned unchanged and their examples have no `__shard__` column.
    """
    cls = type(builder)
    specialised = _SHARD_NAMED.get(cls)
    if specialised is None and len(cls.__mro__) > 1 and cls.__mro__[1] in _SHARD_NAMED:  # a configured subclass
        specialised = configure_builder_class(_SHARD_NAMED[cls.__mro__[1]], cls.BUILDER_CONFIGS,
                                              cls.DEFAULT_CONFIG_NAME, builder.dataset_name)
    if specialised is not None:
        builder.__class__ = specialised  # a subclass with no extra state: only the generators change
    return builder
