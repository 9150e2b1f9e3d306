"""Decoding and validation of one image-caption sample, shared by training input and evaluation.

Bad samples raise `BadSampleError` with a `reason` from `BAD_SAMPLE_REASONS`; callers skip and count them (the
documented policy) instead of crashing a DataLoader worker.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

BAD_SAMPLE_REASONS = (
    "image_missing",
    "image_undecodable",
    "image_truncated",
    "image_too_small",
    "image_too_large",
    "caption_missing",
    "caption_empty",
    "caption_not_utf8",
    "caption_undecodable",  # caption metadata that does not parse (e.g. invalid JSON in a webdataset `.json`)
    "shard_truncated",  # a tar that ends early or is corrupt: counted once, the rest of that shard is skipped
)
DEFAULT_MIN_SIDE = 8
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (about 9.5k x 9.5k)


class BadSampleError(ValueError):
    """A sample that cannot be used; `reason` is one of `BAD_SAMPLE_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in BAD_SAMPLE_REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' Image feature undecoded: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise BadSampleError("image_missing")
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, (str, Path)):
        return Image.open(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise BadSampleError("image_missing", "empty bytes")
        return Image.open(io.BytesIO(bytes(value)))
    raise BadSampleError("image_undecodable", f"unsupported image value of type {type(value).__name__}")


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB from any PIL mode: gray, 16-bit and float are scaled, palette and alpha composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    value, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode an image (bytes, {"bytes", "path"} dict, path, array or PIL image) into an RGB PIL image.

    Args:
        value: The encoded image.
        min_side: Images with a smaller side are bad (`image_too_small`).
        max_pixels: Images with more pixels are bad (`image_too_large`), judged from the header.
        draft_size: Decode JPEGs at the smallest DCT scale (1/8, 1/4, 1/2) that keeps both sides >= this
            (PIL's `draft`): several times faster for photos much larger than the model input; None decodes
            at full size. The size checks use the full (header) size.

    Raises:
        BadSampleError: missing, undecodable or truncated data, a side below `min_side`, or more than `max_pixels`
            pixels (checked from the header, before decoding: decompression bombs are never expanded).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(value)
            width, height = image.size
            if width * height > max_pixels:
                raise BadSampleError("image_too_large", f"{width}x{height} > {max_pixels} pixels")
            if draft_size is not None and min(width, height) >= 2 * draft_size:  # only JPEG decoders act on it
                image.draft(None, (draft_size, draft_size))
            image.load()
    except BadSampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSampleError("image_too_large", str(error)) from None
    except (FileNotFoundError, IsADirectoryError) as error:  # a path column naming a file that is not there
        raise BadSampleError("image_missing", str(error)) from None
    except UnidentifiedImageError as error:
        raise BadSampleError("image_undecodable", str(error)) from None
    except OSError as error:  # PIL reports cut-off files as OSError("image file is truncated ...")
        reason = "image_truncated" if "truncated" in str(error).lower() else "image_undecodable"
        raise BadSampleError(reason, str(error)) from None
    except (ValueError, SyntaxError) as error:
        raise BadSampleError("image_undecodable", str(error)) from None
    if min(width, height) < min_side:
        raise BadSampleError("image_too_small", f"{width}x{height}, minimum side {min_side}")
    return to_rgb(image)


def _text(value) -> str:
    """A caption value as text: str as is, bytes decoded as UTF-8 (raises `BadSampleError` when missing / not UTF-8)."""
    if value is None:
        raise BadSampleError("caption_missing")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSampleError("caption_not_utf8", str(error)) from None
    return value


def load_caption(value) -> str:
    """A stripped caption from str or UTF-8 bytes.

    Raises:
        BadSampleError: missing, empty (after stripping) or not valid UTF-8.
    """
    value = _text(value)
    if not isinstance(value, str):
        raise BadSampleError("caption_missing", f"caption of type {type(value).__name__}")
    caption = value.strip()
    if not caption:
        raise BadSampleError("caption_empty")
    return caption


def load_json_caption(value, keys: Sequence[str]):
    """The caption field of a JSON object given as UTF-8 bytes, text or an already parsed dict.

    Returns the raw field value (text, or a list of captions); pass it on to `load_caption`.

    Args:
        value: The JSON object (e.g. a webdataset `.json` member).
        keys: Candidate keys, in order of preference; the first present is used.

    Raises:
        BadSampleError: missing value or key, not UTF-8, or JSON that does not parse (`caption_undecodable`).
    """
    value = _text(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise BadSampleError("caption_undecodable", f"invalid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadSampleError("caption_missing", f"JSON caption field is a {type(value).__name__}, not an object")
    key = next((k for k in keys if k in value), None)
    if key is None:
        raise BadSampleError("caption_missing", f"none of the keys {list(keys)} in the JSON caption")
    return value[key]
