"""From a raw streamed example to model inputs: column detection, decoding, sample ids, augmentation, batching.

Everything here runs inside DataLoader workers. Decoding goes through `images.load_image` / `images.load_caption`
(the single place that knows what a bad image or caption is); a bad sample raises `BadSampleError` and is skipped
and counted by `BadSampleCounter`, which also enforces the bad-fraction limit.
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
from .sources import SHARD_COLUMN

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "image_path", "file_name", "filename",
                 "file", "path")
CAPTION_COLUMNS = ("caption", "txt", "text", "captions", "title", "description", "sentence", "alt", "json")
JSON_CAPTION_KEYS = ("caption", "text", "txt", "title", "description", "alt")
ID_COLUMNS = ("sample_id", "id", "uid", "key", "image_id", "__key__")
LABEL_COLUMNS = ("label", "labels", "cls")  # evaluation only: integer class labels (webdataset `.cls` members)
CLASS_NAME_COLUMNS = ("class_name", "classname")  # evaluation only: the name of each row's class
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_INT64 = 2**63 - 1


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
    """

    image: str
    caption: str | None
    caption_key: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()
    label: str | None = None
    class_name: str | None = None

    @property
    def needed(self) -> list[str]:
        """The columns to read, in order, without duplicates."""
        optional = [name for name in (self.caption, self.id, self.label, self.class_name) if name]
        return list(dict.fromkeys([self.image, *optional, *self.keep, SHARD_COLUMN]))

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
    available = [name for name in column_names if name != SHARD_COLUMN]

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
    return Columns(image, caption, caption_key, sample_id, tuple(keep_columns), label, class_name)


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
        image, caption = example.get(self.columns.image), example.get(self.columns.caption)
        return hash_id(_content_bytes(image) + b"\0" + _content_bytes(caption))

    def caption(self, value, rng_for) -> str:
        """The caption text from a string / bytes / JSON / list value (raises `BadSampleError`)."""
        return read_caption(value, self.json_caption_keys, rng_for if self.training else None)

    def image_value(self, value, shard: str | None):
        """Resolve relative image paths of captions-file sources against the shard's directory."""
        return resolve_image_path(value, shard) if self.paths_relative_to_shard else value

    def __call__(self, example: dict, epoch: int) -> DecodedSample:
        sample_id = self.sample_id(example)
        rng = None

        def rng_for() -> np.random.Generator:  # per-sample generator: resuming replays the same crops exactly
            nonlocal rng
            if rng is None:
                rng = np.random.default_rng((self.seed & MAX_INT64, epoch, sample_id & (2**64 - 1)))
            return rng

        caption = self.caption(example.get(self.columns.caption), rng_for)
        value = self.image_value(example.get(self.columns.image), example.get(SHARD_COLUMN))
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
    """Samples read and skipped per reason, in total (for the limit) and since the last batch (`data_stats`).

    Args:
        max_bad_fraction: Above this fraction of bad samples, raise `DataQualityError`.
        min_samples: Judge the fraction only after this many samples (one early bad sample must not abort).
        where: Who reads (e.g. "rank 0, worker 1"), for the error message.
    """

    def __init__(self, max_bad_fraction: float, min_samples: int, where: str = ""):
        self.max_bad_fraction, self.min_samples, self.where = max_bad_fraction, min_samples, where
        self.read, self.bad, self.bad_by_shard = 0, Counter(), Counter()
        self.last_shard = self.last_reason = self.last_detail = ""
        self._delta_read, self._delta_bad = 0, Counter()
        self._delta_last_shard = self._delta_last_reason = ""

    def good(self) -> None:
        self.read += 1
        self._delta_read += 1
        if self.read == self.min_samples:  # the fraction may already be over the limit when judging starts
            self.check()

    def skipped(self, error: BadSampleError, shard: str | None) -> None:
        shard = shard or "<unknown shard>"
        self.read += 1
        self._delta_read += 1
        self.bad[error.reason] += 1
        self._delta_bad[error.reason] += 1
        self.bad_by_shard[shard] += 1
        self.last_shard, self.last_reason, self.last_detail = shard, error.reason, str(error)
        self._delta_last_shard, self._delta_last_reason = shard, error.reason
        self.check()

    def check(self) -> None:
        """Raise `DataQualityError` when enough samples were read and the bad fraction is over the limit."""
        total_bad = sum(self.bad.values())
        if self.read < self.min_samples or total_bad <= self.max_bad_fraction * self.read:
            return
        worst, worst_count = self.bad_by_shard.most_common(1)[0]
        reasons = ", ".join(f"{reason}={n}" for reason, n in self.bad.most_common())
        raise DataQualityError(
            f"{total_bad} of {self.read} samples ({total_bad / self.read:.2%}) read by {self.where or 'the loader'} "
            f"were bad, over max_bad_fraction={self.max_bad_fraction:.2%} ({reasons}). Most bad samples in shard "
            f"{worst} ({worst_count}); last bad sample in shard {self.last_shard} ({self.last_detail}). "
            "Repair or remove the shard, or raise --max_bad_fraction."
        )

    def take_delta(self) -> dict:
        """`data_stats` since the previous call: int counters plus the shard and reason of the last bad sample."""
        stats = {"samples_read": self._delta_read, "samples_skipped": sum(self._delta_bad.values())}
        stats.update({f"skipped_{reason}": self._delta_bad[reason] for reason in BAD_SAMPLE_REASONS})
        stats["last_bad_shard"], stats["last_bad_reason"] = self._delta_last_shard, self._delta_last_reason
        self._delta_read, self._delta_bad = 0, Counter()
        self._delta_last_shard = self._delta_last_reason = ""
        return stats

    def state_dict(self) -> dict:
        """Cumulative counts (restored on resume, so the limit keeps judging the whole run)."""
        return {"read": self.read, "bad": dict(self.bad), "bad_by_shard": dict(self.bad_by_shard),
                "last": [self.last_shard, self.last_reason, self.last_detail]}

    def load_state_dict(self, state: dict) -> None:
        self.read = int(state["read"])
        self.bad, self.bad_by_shard = Counter(state["bad"]), Counter(state["bad_by_shard"])
        self.last_shard, self.last_reason, self.last_detail = state["last"]


def accumulate_data_stats(total: dict, stats: dict) -> dict:
    """Add one batch's `data_stats` into `total` (ints are summed, the last non-empty strings kept); returns it.

    For loops over `build_train_dataloader` outside the Trainer (NeuCLIPTrainer folds the same counts into a
    tensor that it all-reduces across ranks).
    """
    for key, value in stats.items():
        if isinstance(value, str):
            if value:
                total[key] = value
            else:
                total.setdefault(key, "")
        else:
            total[key] = total.get(key, 0) + int(value)
    return total
