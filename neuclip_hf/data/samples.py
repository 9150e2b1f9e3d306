"""From a raw streamed example to model inputs: column detection, decoding, sample ids, augmentation, batching.

Decoding runs inside DataLoader workers and goes through `images.load_image` / `images.load_caption` (the single
place that knows what a bad image or caption is); a bad sample raises `BadSampleError` and is skipped and counted by
the worker's `BadSampleCounter`. The counts travel with the batches (`data_stats`) and are added up in the main
process (`DataTotals`), where the bad-fraction limit is judged on the totals (`over_bad_limit`): those of the
rank's loader, and in training those of every rank (`NeuCLIPTrainer`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np
import torch
from datasets import Features, Image as ImageFeature
from PIL import Image

from ..images import BAD_SAMPLE_REASONS, BadSampleError, load_caption, load_image, load_json_caption
from .sources import SHARD_COLUMN, SHARD_ERROR_COLUMN, WEBDATASET_CAPTION_FIELDS, WEBDATASET_IMAGE_FIELDS

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "image_path", "file_name", "filename",
                 "file", "path")
CAPTION_COLUMNS = ("caption", "txt", "text", "captions", "title", "description", "sentence", "alt", "json")
JSON_CAPTION_KEYS = ("caption", "text", "txt", "title", "description", "alt")
ID_COLUMNS = ("sample_id", "id", "uid", "key", "image_id", "__key__")
LABEL_COLUMNS = ("label", "labels", "cls")  # evaluation only: integer class labels (webdataset `.cls` members)
CLASS_NAME_COLUMNS = ("class_name", "classname")  # evaluation only: the name of each row's class
WEBDATASET_IMAGE_EXTENSIONS = WEBDATASET_IMAGE_FIELDS
MAX_INT64 = 2**63 - 1
# z of the one-sided bound of the bad fraction (99.5%): the limit stops a run only when the bad fraction is over it
# with this confidence, so an unlucky start on data that is within the limit never stops it.
BAD_FRACTION_CONFIDENCE_Z = 2.576


class DataQualityError(RuntimeError):
    """Too many bad samples: raised by the input pipeline when the bad fraction exceeds `max_bad_fraction`."""


@dataclass(frozen=True)
class Columns:
    """Which fields of a raw example hold the image, the caption and the id.

    Attributes:
        image: Image column (bytes, {"bytes", "path"} dict, or a path string).
        caption: Caption column (str, bytes, a list of captions, or a JSON object / JSON bytes).
        caption_key: Key of the caption inside a JSON caption column (None: the first of `JSON_CAPTION_KEYS`).
        id: Id column (int or string; strings that are not numbers are hashed), or None (content hash).
        keep: Extra columns copied into the batch (e.g. `label` for zero-shot evaluation).
        label: Class-label column (evaluation), or None.
        class_name: Class-name column (evaluation), or None.
        image_fallbacks: Other webdataset image fields (`png` when `image` is `jpg`, ...), read in order when a
            sample has no `image`: a shard may mix extensions sample by sample.
        caption_fallbacks: The other webdataset caption field (`json` when `caption` is `txt`, or the reverse).
        shard_error: The column that marks the unreadable rest of a damaged tar (webdataset), or None.
    """

    image: str
    caption: str | None
    caption_key: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()
    label: str | None = None
    class_name: str | None = None
    image_fallbacks: tuple[str, ...] = ()
    caption_fallbacks: tuple[str, ...] = ()
    shard_error: str | None = None

    @property
    def needed(self) -> list[str]:
        """The columns to read, in order, without duplicates."""
        optional = [name for name in (self.caption, self.id, self.label, self.class_name, self.shard_error) if name]
        return list(dict.fromkeys([self.image, *self.image_fallbacks, *optional, *self.caption_fallbacks,
                                   *self.keep, SHARD_COLUMN]))

    def caption_keys_for(self, column: str) -> tuple[str, ...] | None:
        """The keys to read inside `column` when it is a JSON caption column, else None."""
        if column == self.caption:
            return self.json_caption_keys
        return JSON_CAPTION_KEYS if column.lower().rsplit(".", 1)[-1] == "json" else None

    @property
    def json_caption_keys(self) -> tuple[str, ...] | None:
        """The keys to read inside a JSON caption column (a `.json` webdataset member or a named key), else None."""
        if self.caption_key is not None:
            return (self.caption_key,)
        if self.caption is not None and self.caption.lower().rsplit(".", 1)[-1] == "json":
            return JSON_CAPTION_KEYS
        return None


def _pick(available: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first candidate present (case-insensitive), as spelled in `available`."""
    lowered = {name.lower(): name for name in available}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _webdataset_image(available: Sequence[str]) -> str | None:
    """A webdataset image field (`jpg`, `0.png`, `image.webp`...), preferring the common extensions in order."""
    for extension in WEBDATASET_IMAGE_EXTENSIONS:
        match = next((name for name in available if name.lower().rsplit(".", 1)[-1] == extension), None)
        if match:
            return match
    return None


def detect_columns(
    features: Features | None, column_names: Sequence[str], description: str, image_column: str | None = None,
    caption_column: str | None = None, id_column: str | None = None, keep_columns: Sequence[str] = (),
    label_column: str | None = None, evaluation: bool = False,
) -> Columns:
    """Find the image, caption and id columns of a source (explicit names win over detection); for evaluation
    also the label and class-name columns, and the caption is optional (classification-only data).

    `caption_column` may name a key inside a JSON column as `<column>.<key>` (e.g. `json.caption`).

    Raises:
        ValueError: a named column that does not exist, or nothing that looks like an image (or, for training, a
            caption); the message lists the available columns.
    """
    available = [name for name in column_names if name not in (SHARD_COLUMN, SHARD_ERROR_COLUMN)]

    def missing(kind: str, name: str | None = None) -> ValueError:
        what = f"{kind} column {name!r} not found" if name else f"no {kind} column detected"
        return ValueError(f"{description}: {what}; available columns: {available}. "
                          f"Use --{kind}_column to name it.")

    if image_column is not None and image_column not in available:
        raise missing("image", image_column)
    image = image_column or _pick(available, IMAGE_COLUMNS) or _webdataset_image(available)
    if image is None and features is not None:  # any column typed as an image
        image = next((name for name in available if isinstance(features.get(name), ImageFeature)), None)
    if image is None:
        raise missing("image")
    caption_key = None
    if caption_column is not None and caption_column not in available:
        column, _, key = caption_column.partition(".")
        if not key or column not in available:
            raise missing("caption", caption_column)
        caption_column, caption_key = column, key
    caption = caption_column or _pick([n for n in available if n != image], CAPTION_COLUMNS)
    if caption is None and not evaluation:
        raise missing("caption")
    if id_column is not None and id_column not in available:
        raise missing("id", id_column)
    sample_id = id_column or _pick([n for n in available if n not in (image, caption)], ID_COLUMNS)
    for name in keep_columns:
        if name not in available:
            raise ValueError(f"{description}: column {name!r} to keep not found; available columns: {available}")
    label = class_name = None
    if evaluation:
        if label_column is not None and label_column not in available:
            raise missing("label", label_column)
        label = label_column or _pick(available, LABEL_COLUMNS)
        class_name = _pick(available, CLASS_NAME_COLUMNS)
    image_fallbacks = caption_fallbacks = ()
    if image_column is None:  # a detected webdataset image field: the other image extensions stand in for it
        image_fallbacks = _same_family(image, available, WEBDATASET_IMAGE_FIELDS)
    if caption_column is None and caption is not None:
        caption_fallbacks = _same_family(caption, available, WEBDATASET_CAPTION_FIELDS)
    shard_error = SHARD_ERROR_COLUMN if SHARD_ERROR_COLUMN in column_names else None
    return Columns(image, caption, caption_key, sample_id, tuple(keep_columns), label, class_name, image_fallbacks,
                   caption_fallbacks, shard_error)


def _same_family(column: str, available: Sequence[str], family: Sequence[str]) -> tuple[str, ...]:
    """The other fields of `available` whose extension is in `family` (in `family`'s order), when `column` is one."""
    if column.lower().rsplit(".", 1)[-1] not in family:
        return ()
    others = [name for name in available if name != column and name.lower().rsplit(".", 1)[-1] in family]
    return tuple(sorted(others, key=lambda name: family.index(name.lower().rsplit(".", 1)[-1])))


def hash_id(data: bytes) -> int:
    """A stable non-negative 63-bit id (blake2b): equal on every machine, run and Python version."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big") >> 1


def stable_sample_id(value) -> int:
    """The int64 sample id of an id-column value or webdataset key.

    Integers are kept; decimal strings ("000123") become their number; any other string (or an integer beyond
    int64) is hashed with `hash_id`.
    """
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        return value if -MAX_INT64 - 1 <= value <= MAX_INT64 else hash_id(str(value).encode())
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="backslashreplace")
    text = str(value).strip()
    if text.isascii() and text.isdigit() and int(text) <= MAX_INT64:
        return int(text)
    return hash_id(text.encode("utf-8"))


def _content_bytes(value) -> bytes:
    """Bytes identifying a raw image or caption value, for content-hashed ids."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return repr(value).encode("utf-8", errors="backslashreplace")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random crop box (left, top, right, bottom) covering `scale` of the area with aspect ratio in `ratio`.

    The Inception / CLIP training crop: area fraction uniform in `scale`, log-aspect-ratio uniform in `ratio`; after
    `attempts` misses (box does not fit), the largest centred box whose aspect ratio is clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:  # too tall: full width, height from the narrowest allowed ratio
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:  # too wide
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def read_caption(value, json_keys: Sequence[str] | None = None, rng_for=None) -> str:
    """The caption text of a raw caption value: a string, UTF-8 bytes, a JSON object (read at `json_keys`) or a
    list of captions (a random one when `rng_for` gives a generator, else the first).

    Raises:
        BadSampleError: missing, empty, not UTF-8, or JSON that does not parse.
    """
    if json_keys is not None:
        value = load_json_caption(value, json_keys)
    if isinstance(value, (list, tuple, np.ndarray)):  # several captions per image (COCO style)
        if len(value) == 0:
            raise BadSampleError("caption_missing", "empty caption list")
        value = value[int(rng_for().integers(len(value)))] if rng_for is not None else value[0]
    return load_caption(value)


def resolve_image_path(value, shard: str | None):
    """An image path of a captions-file source, resolved against the directory of the file (the shard)."""
    if not shard:
        return value
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(os.path.dirname(shard), value)
    return value


@dataclass
class DecodedSample:
    """One good sample: an RGB image (already cropped to the output size when augmenting), caption and id."""

    image: Image.Image
    caption: str
    sample_id: int
    extra: dict = field(default_factory=dict)


class SampleDecoder:
    """Turns a raw example into a `DecodedSample` or raises `BadSampleError`.

    Args:
        columns: Where image, caption and id live.
        min_side: Images with a side below this are bad (`image_too_small`).
        max_pixels: Images with more pixels are bad (`image_too_large`; checked from the header).
        image_size: Output side (used by the augmentation crop).
        augment: Random-resized-crop (train only); otherwise the processor's resize + centre crop.
        augment_scale: Area fraction range of the random crop.
        seed: Seed of the augmentation and of the choice among several captions.
        paths_relative_to_shard: Image path strings are relative to the directory of the shard (captions files).
        training: Pick a random caption from a list (else the first).
        jpeg_draft: Decode large JPEGs at a reduced DCT scale that still covers the output size.
    """

    def __init__(self, columns: Columns, min_side: int, max_pixels: int, image_size: int, augment: bool,
                 augment_scale: tuple[float, float], seed: int, paths_relative_to_shard: bool, training: bool,
                 jpeg_draft: bool = True):
        self.columns = columns
        self.json_caption_keys = columns.json_caption_keys
        self.min_side, self.max_pixels, self.image_size = min_side, max_pixels, image_size
        self.augment, self.augment_scale, self.seed = augment, augment_scale, seed
        self.paths_relative_to_shard, self.training = paths_relative_to_shard, training
        # Shortest side the decoded image needs: the output side, or for the random crop (area >= scale[0], aspect
        # ratio >= 3/4) enough that the crop's shorter side still covers the output side.
        needed = image_size / math.sqrt(augment_scale[0] * 3 / 4) if augment else image_size
        self.draft_size = math.ceil(needed) if jpeg_draft else None

    def sample_id(self, example: dict) -> int:
        """The stable id: the id column / webdataset key, else a hash of the raw image and caption."""
        if self.columns.id is not None and example.get(self.columns.id) is not None:
            return stable_sample_id(example[self.columns.id])
        image = self.raw_image(example)
        caption = example.get(self.columns.caption) if self.columns.caption else None
        return hash_id(_content_bytes(image) + b"\0" + _content_bytes(caption))

    def raw_image(self, example: dict):
        """The sample's image value: its image column, else the first image fallback it has (None: none)."""
        for name in (self.columns.image, *self.columns.image_fallbacks):
            if example.get(name) is not None:
                return example[name]
        return None

    def caption(self, example: dict, rng_for) -> str:
        """The caption text of the first caption column the sample has (raises `BadSampleError`)."""
        columns = (self.columns.caption, *self.columns.caption_fallbacks) if self.columns.caption else ()
        column = next((name for name in columns if example.get(name) is not None), self.columns.caption)
        keys = self.json_caption_keys if column == self.columns.caption else self.columns.caption_keys_for(column)
        return read_caption(example.get(column) if column else None, keys, rng_for if self.training else None)

    def image_value(self, value, shard: str | None):
        """Resolve relative image paths of captions-file sources against the shard's directory."""
        return resolve_image_path(value, shard) if self.paths_relative_to_shard else value

    def __call__(self, example: dict, epoch: int) -> DecodedSample:
        if self.columns.shard_error and example.get(self.columns.shard_error):
            raise BadSampleError("shard_truncated", example[self.columns.shard_error])
        sample_id = self.sample_id(example)
        rng = None

        def rng_for() -> np.random.Generator:  # per-sample generator: resuming replays the same crops exactly
            nonlocal rng
            if rng is None:
                rng = np.random.default_rng((self.seed & MAX_INT64, epoch, sample_id & (2**64 - 1)))
            return rng

        caption = self.caption(example, rng_for)
        value = self.image_value(self.raw_image(example), example.get(SHARD_COLUMN))
        image = load_image(value, min_side=self.min_side, max_pixels=self.max_pixels, draft_size=self.draft_size)
        if self.augment:
            box = random_resized_crop_box(*image.size, rng_for(), scale=self.augment_scale)
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        return DecodedSample(image, caption, sample_id, {name: example.get(name) for name in self.columns.keep})


class BatchEncoder:
    """Processor calls on a list of decoded samples -> the batch dict of tensors the model takes.

    Args:
        processor: A `CLIPProcessor`-like object with `image_processor` and `tokenizer`.
        max_length: Text length (tokens, start and end included); every batch is padded to it.
        augment: Images are already cropped to the output size: only rescale + normalise.
    """

    def __init__(self, processor, max_length: int, augment: bool):
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        # Augmented images are already image_size x image_size: skip the processor's resize / centre crop.
        self.image_kwargs = {"do_resize": False, "do_center_crop": False} if augment else {}

    def __call__(self, samples: list[DecodedSample]) -> dict:
        pixels = self.image_processor([s.image for s in samples], return_tensors="np", **self.image_kwargs)
        text = self.tokenizer([s.caption for s in samples], padding="max_length", truncation=True,
                              max_length=self.max_length, return_tensors="np")
        batch = {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels["pixel_values"], dtype=np.float32)),
            "input_ids": torch.from_numpy(np.asarray(text["input_ids"], dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(text["attention_mask"], dtype=np.int64)),
            "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
        }
        for name in samples[0].extra if samples else ():
            values = [s.extra[name] for s in samples]
            numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                          for v in values)
            batch[name] = torch.tensor(values) if numeric else values
        return batch


def image_size_of(image_processor) -> int:
    """The square output side of a CLIP-style image processor (its centre-crop size)."""
    crop = getattr(image_processor, "crop_size", None) or {}
    size = crop.get("height") or (getattr(image_processor, "size", None) or {}).get("shortest_edge")
    if not size:
        raise ValueError(f"cannot tell the output image size of {type(image_processor).__name__}")
    return int(size)


class BadSampleCounter:
    """One DataLoader worker's samples read and skipped (per reason and per shard) since its last batch.

    `take_delta()` returns them as the batch's `data_stats` and starts over; the totals are kept by the loader in the
    main process (`DataTotals`), which judges the limit.
    """

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.read, self.bad = 0, Counter()
        self.read_by_shard, self.bad_by_shard = Counter(), Counter()
        self.last_shard = self.last_reason = self.last_detail = ""

    def good(self, shard: str | None) -> None:
        self.read += 1
        self.read_by_shard[shard or "<unknown shard>"] += 1

    def skipped(self, error: BadSampleError, shard: str | None) -> None:
        shard = shard or "<unknown shard>"
        self.read += 1
        self.read_by_shard[shard] += 1
        self.bad[error.reason] += 1
        self.bad_by_shard[shard] += 1
        self.last_shard, self.last_reason, self.last_detail = shard, error.reason, str(error)

    def take_delta(self) -> dict:
        """`data_stats` since the previous call: int counters, per-shard counts and the last bad sample."""
        stats = {"samples_read": self.read, "samples_skipped": sum(self.bad.values())}
        stats.update({f"skipped_{reason}": self.bad[reason] for reason in BAD_SAMPLE_REASONS})
        stats["read_by_shard"], stats["bad_by_shard"] = dict(self.read_by_shard), dict(self.bad_by_shard)
        stats["last_bad_shard"], stats["last_bad_reason"] = self.last_shard, self.last_reason
        stats["last_bad_detail"] = self.last_detail
        self._reset()
        return stats


def wilson_lower_bound(bad: float, read: float, z: float = BAD_FRACTION_CONFIDENCE_Z) -> float:
    """Lower end of the Wilson score interval of a fraction `bad / read` (0 when nothing was read)."""
    if read <= 0:
        return 0.0
    p = bad / read
    centre = p + z * z / (2 * read)
    spread = z * math.sqrt(p * (1 - p) / read + z * z / (4 * read * read))
    return max(0.0, (centre - spread) / (1 + z * z / read))


def over_bad_limit(read: float, bad: float, max_bad_fraction: float, min_samples: int) -> bool:
    """Whether a run must stop for bad data: at least `min_samples` read, and the bad fraction over the limit with
    99.5% confidence (the Wilson lower bound above `max_bad_fraction`; any bad sample when the limit is 0)."""
    if read < min_samples or bad <= max_bad_fraction * read or max_bad_fraction >= 1.0:
        return False
    return wilson_lower_bound(bad, read) > max_bad_fraction


def _shard_list(counts: Counter, limit: int = 5) -> str:
    names = ", ".join(f"{os.path.basename(shard) or shard} ({n})" for shard, n in counts.most_common(limit))
    return names + (f" and {len(counts) - limit} more" if len(counts) > limit else "")


@dataclass
class DataTotals:
    """What a loader has read since the run started: samples read and skipped per reason, per shard, the last bad
    sample. Kept in the main process from the batches' `data_stats` and saved with the data position."""

    read: int = 0
    bad: Counter = field(default_factory=Counter)
    read_by_shard: Counter = field(default_factory=Counter)
    bad_by_shard: Counter = field(default_factory=Counter)
    last_bad: str = ""

    @property
    def skipped(self) -> int:
        return sum(self.bad.values())

    def add(self, stats: dict) -> None:
        """Fold one `data_stats` in."""
        self.read += int(stats.get("samples_read", 0))
        for reason in BAD_SAMPLE_REASONS:
            if stats.get(f"skipped_{reason}"):
                self.bad[reason] += int(stats[f"skipped_{reason}"])
        self.read_by_shard.update(stats.get("read_by_shard") or {})
        self.bad_by_shard.update(stats.get("bad_by_shard") or {})
        if stats.get("last_bad_shard"):
            self.last_bad = f"{stats['last_bad_shard']} ({stats.get('last_bad_detail') or stats['last_bad_reason']})"

    def describe(self) -> str:
        """One line: read, from which shards, skipped per reason and where."""
        if self.read == 0:
            return "no sample was read"
        text = f"{self.read} sample(s) read from {len(self.read_by_shard)} shard(s) [{_shard_list(self.read_by_shard)}]"
        if not self.skipped:
            return text + ", none skipped"
        reasons = ", ".join(f"{reason}={n}" for reason, n in self.bad.most_common())
        return (f"{text}, {self.skipped} skipped ({reasons}); bad samples per shard: "
                f"[{_shard_list(self.bad_by_shard)}]; last bad sample in {self.last_bad}")

    def state_dict(self) -> dict:
        return {"read": self.read, "bad": dict(self.bad), "read_by_shard": dict(self.read_by_shard),
                "bad_by_shard": dict(self.bad_by_shard), "last_bad": self.last_bad}

    def merge_state(self, state: dict) -> None:
        """Add another loader's saved totals (`state_dict()`) to these."""
        self.read += int(state["read"])
        self.bad.update(state["bad"])
        self.read_by_shard.update(state["read_by_shard"])
        self.bad_by_shard.update(state["bad_by_shard"])
        self.last_bad = state["last_bad"] or self.last_bad

    def load_state_dict(self, state: dict) -> None:
        self.read, self.bad = int(state["read"]), Counter(state["bad"])
        self.read_by_shard, self.bad_by_shard = Counter(state["read_by_shard"]), Counter(state["bad_by_shard"])
        self.last_bad = state["last_bad"]


def bad_data_message(read: float, bad: float, max_bad_fraction: float, where: str, details: str) -> str:
    """The `DataQualityError` message: the totals, the limit, what was read and skipped, and what to do."""
    return (f"{int(bad)} of {int(read)} samples ({bad / max(read, 1):.2%}) read by {where} were bad, over "
            f"max_bad_fraction={max_bad_fraction:.2%} (99.5% lower bound {wilson_lower_bound(bad, read):.2%}). "
            f"{details}. Repair or remove the shard, or raise --max_bad_fraction.")


def accumulate_data_stats(total: dict, stats: dict) -> dict:
    """Add one batch's `data_stats` into `total` (ints and per-shard counts are summed, the last non-empty strings
    kept); returns it. For loops over a loader outside the Trainer."""
    for key, value in stats.items():
        if isinstance(value, str):
            if value:
                total[key] = value
            else:
                total.setdefault(key, "")
        elif isinstance(value, dict):
            merged = total.setdefault(key, {})
            for name, count in value.items():
                merged[name] = merged.get(name, 0) + int(count)
        else:
            total[key] = total.get(key, 0) + int(value)
    return total
