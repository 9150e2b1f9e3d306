"""The one reader of image-text data, for training and evaluation: sources (`sources`), column detection,
per-sample decoding and batching (`samples`), the resumable, sharded training loader with its bad-sample policy
(`loader`), and evaluation sets read through the same sources (`eval_data`)."""

from ..arguments import DataArguments
from .eval_data import EvalData, as_eval_data, open_eval_data
from .loader import (
    ImageTextStream,
    StreamingDataLoader,
    build_eval_dataloader,
    build_train_dataloader,
    count_samples,
    find_train_num_samples,
    shard_layout_warning,
)
from .counting import count_parquet_rows, count_tar_samples, sample_count_cache_dir
from .samples import (
    BadSampleCounter,
    Columns,
    DataQualityError,
    accumulate_data_stats,
    detect_columns,
    hash_id,
    random_resized_crop_box,
    stable_sample_id,
)
from .sources import SHARD_COLUMN, Source, open_source

__all__ = [
    "SHARD_COLUMN",
    "BadSampleCounter",
    "Columns",
    "DataArguments",
    "DataQualityError",
    "EvalData",
    "ImageTextStream",
    "Source",
    "StreamingDataLoader",
    "accumulate_data_stats",
    "as_eval_data",
    "build_eval_dataloader",
    "build_train_dataloader",
    "count_parquet_rows",
    "count_samples",
    "count_tar_samples",
    "detect_columns",
    "find_train_num_samples",
    "hash_id",
    "open_eval_data",
    "open_source",
    "random_resized_crop_box",
    "sample_count_cache_dir",
    "shard_layout_warning",
    "stable_sample_id",
]
