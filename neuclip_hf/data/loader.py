"""The training / evaluation input: `DataArguments`, the resumable loader and the bad-sample policy.

Layout of one rank's input (exactly one sharding mechanism, `datasets`' own):

    open_source(spec)                       streaming `datasets.IterableDataset`, one example per pair
      .select_columns(...)                  only image / caption / id / shard (+ kept) columns travel
      .shuffle(seed, buffer_size=1)         only with --shuffle_buffer: shard order, same seed on every rank
      split_dataset_by_node(rank, world)    this rank's shards (or every world-th example, see below)
    ImageTextStream                         in each DataLoader worker: `datasets` gives the worker its shards;
                                            shuffle buffer, decode, skip + count bad samples, augment, tokenize,
                                            make batches
    StreamingDataLoader                     torchdata StatefulDataLoader: per-worker positions in `state_dict()`

Sharding fallbacks of datasets 5.2 (`split_dataset_by_node` and `IterableDataset._iter_pytorch`):
* `num_shards % world_size != 0`: every rank reads every shard and keeps one example out of `world_size`
  (disjoint and complete, but `world_size` times the I/O);
* fewer shards per rank than workers: the extra workers get no shard and stop at once (idle);
* shards per rank not a multiple of the workers: workers get unequal numbers of shards.
`build_train_dataloader` warns (rank 0) with the numbers in each case.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader

from ..arguments import DataArguments
from ..images import BadSampleError
from .counting import count_from_metadata
from .samples import (
    BadSampleCounter,
    BatchEncoder,
    Columns,
    DataQualityError,
    DataTotals,
    SampleDecoder,
    bad_data_message,
    detect_columns,
    image_size_of,
    over_bad_limit,
)
from .sources import EVAL_SPLITS, SHARD_COLUMN, Source, open_source


class _QuietSingleExampleBuffer(logging.Filter):
    """Drops datasets' warning about losing shuffle-buffer content on resume: our `datasets` shuffle has a buffer of
    one example (shard order only) and resumes exactly; the real example buffer is ImageTextStream's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


logging.getLogger("datasets.iterable_dataset").addFilter(_QuietSingleExampleBuffer())

_END = object()  # end-of-iterator marker
END_OF_PASS = "end_of_pass"  # key of the item a worker yields after its last batch of a pass (its last counts)
DEFAULT_TEXT_LENGTH = 77  # OpenAI CLIP's context, when a tokenizer declares no usable model_max_length


def _text_length(args: DataArguments, tokenizer) -> int:
    """Caption length: explicit, else the tokenizer's declared limit (sentinel values mean "none declared")."""
    if args.max_text_length is not None:
        return args.max_text_length
    declared = getattr(tokenizer, "model_max_length", None)
    return int(declared) if declared and declared < 100_000 else DEFAULT_TEXT_LENGTH


def shard_layout_warning(num_shards: int, world_size: int, num_workers: int) -> str | None:
    """What datasets does with this many shards over ranks x workers, when it is not an even split (else None)."""
    workers = max(1, num_workers)
    if num_shards % world_size != 0:
        return (f"{num_shards} shards are not divisible by world_size={world_size}: datasets falls back to example "
                f"striding, every rank reads all {num_shards} shards and keeps every {world_size}-th example "
                f"({world_size}x the I/O). Use a multiple of world_size * num_workers = {world_size * workers} shards.")
    per_rank = num_shards // world_size
    if per_rank < workers:
        return (f"{num_shards} shards over world_size={world_size} leave {per_rank} shard(s) per rank for "
                f"num_workers={num_workers}: {workers - per_rank} worker(s) per rank get no shard and stay idle. "
                f"Use a multiple of world_size * num_workers = {world_size * workers} shards.")
    if per_rank % workers != 0:
        return (f"{per_rank} shards per rank are not divisible by num_workers={num_workers}: workers read "
                f"{per_rank // workers} or {per_rank // workers + 1} shards, so some finish the epoch early. "
                f"Use a multiple of world_size * num_workers = {world_size * workers} shards.")
    return None


class ImageTextStream(torch.utils.data.IterableDataset):
    """One rank's batches, made inside DataLoader workers from a (node-split) streaming dataset.

    Each worker iterates the `datasets` stream (which hands it its own shards), skips and counts bad samples,
    and yields complete batches; with `drop_last`, a worker's last partial batch is dropped (as a torch
    DataLoader does per worker for iterable datasets). Every batch carries the worker's `data_stats` since its
    previous batch, and after its last batch of a pass the worker yields `{"end_of_pass": True, "data_stats": ...}`
    with the rest (what it read after that batch, bad samples included); `StreamingDataLoader` consumes these items.
    The state (`state_dict`) is the stream position after the last yielded item, so resuming neither repeats nor
    skips samples.

    Args:
        dataset: The rank's streaming dataset (already split by node).
        decoder: Raw example -> decoded sample.
        encoder: Decoded samples -> batch of tensors.
        batch_size: Samples per batch.
        drop_last: Drop each worker's final partial batch (training: equal batch sizes on every rank).
        max_bad_fraction: Bad-sample limit (judged by `StreamingDataLoader` on the totals of all workers).
        bad_check_min_samples: Samples read before the limit is judged.
        rank: This process's rank (for messages and the shuffle seed).
        shuffle_buffer: Examples held per worker by the shuffle buffer (0: none). When shuffling, `set_epoch` is
            passed on to `datasets`, whose stream must then shuffle the shard order (see `build_train_dataloader`).
        seed: Seed of the shuffle buffer.
    """

    def __init__(self, dataset, decoder: SampleDecoder, encoder: BatchEncoder, batch_size: int,
                 drop_last: bool, max_bad_fraction: float, bad_check_min_samples: int, rank: int = 0,
                 shuffle_buffer: int = 0, seed: int = 0):
        super().__init__()
        self.dataset, self.decoder, self.encoder = dataset, decoder, encoder
        self.batch_size, self.drop_last, self.rank = batch_size, drop_last, rank
        self.max_bad_fraction, self.bad_check_min_samples = max_bad_fraction, bad_check_min_samples
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0
        self._pending_state: dict | None = None  # loaded, applied when iteration starts
        self._counter: BadSampleCounter | None = None
        self._iterating = False

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` at the next iteration (new augmentation draws; new shard order when shuffling)."""
        self.epoch = int(epoch)
        if self.shuffle_buffer > 0:  # without shuffling the shard order stays fixed across epochs
            self.dataset.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        """Position after the last yielded batch (per worker when called in a worker) + cumulative counts."""
        if not self._iterating:
            return self._pending_state or {"epoch": self.epoch, "stream": None}
        return {"epoch": self.epoch, "stream": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state
        self.set_epoch(state["epoch"])

    def _where(self) -> str:
        info = torch.utils.data.get_worker_info()
        return f"rank {self.rank}, worker {info.id if info else 'main'}"

    def _positioned(self, stream_state: dict | None):
        """The dataset's examples from `stream_state` (None: from the start of the epoch).

        `datasets` keeps a loaded position and re-applies it to every later pass of the same epoch number (and
        without shuffling the epoch number it sees never changes), so the position is cleared once this pass has
        started: it applies to this pass only.
        """
        if stream_state is None:
            yield from self.dataset
            return
        self.dataset.load_state_dict(stream_state)
        iterator = iter(self.dataset)
        try:
            first = next(iterator, _END)  # datasets reads the position when the pass starts
        finally:
            self.dataset.load_state_dict(None)
        if first is not _END:
            yield first
            yield from iterator

    def _examples(self, stream_state: dict | None):
        """Raw examples of this worker, through the shuffle buffer when there is one.

        The buffer is ours (not `datasets`' `shuffle(buffer_size)`): the stream position saved after a batch is the
        position after the last example pulled into the buffer, so a resume loses exactly the buffered examples
        (at most `shuffle_buffer` per worker) and never repeats one. (datasets 5.2's own buffer both loses and
        repeats examples on resume, and its multi-shard buffer cannot be resumed in DataLoader workers at all.)
        """
        if self.shuffle_buffer == 0:
            yield from self._positioned(stream_state)
            return
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng((self.seed & (2**63 - 1), self.epoch, self.rank, info.id if info else 0))
        buffer = []
        for example in self._positioned(stream_state):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(example)
                continue
            index = int(rng.integers(len(buffer)))  # emit a random buffered example, keep the new one in its place
            buffer[index], example = example, buffer[index]
            yield example
        rng.shuffle(buffer)  # end of the stream: drain the buffer in random order
        yield from buffer

    def __iter__(self):
        counter = BadSampleCounter()
        state, self._pending_state = self._pending_state or {}, None
        self._counter, self._iterating = counter, True
        samples = []
        for example in self._examples(state.get("stream")):  # datasets resumes after the last consumed example
            try:
                samples.append(self.decoder(example, self.epoch))
            except BadSampleError as error:
                counter.skipped(error, example.get(SHARD_COLUMN))
                continue
            counter.good(example.get(SHARD_COLUMN))
            if len(samples) == self.batch_size:
                yield self._batch(samples, counter)
                samples = []
        if samples and not self.drop_last:
            yield self._batch(samples, counter)
        yield {END_OF_PASS: True, "data_stats": counter.take_delta()}  # the counts after the last batch

    def _batch(self, samples, counter: BadSampleCounter) -> dict:
        batch = self.encoder(samples)
        batch["data_stats"] = counter.take_delta()
        return batch


def _keep_batch(batch):
    """Collate function of the loader: batches are already made in the workers."""
    return batch


class StreamingDataLoader(StatefulDataLoader):
    """A `StatefulDataLoader` over an `ImageTextStream` (batches come whole from the workers).

    `state_dict()` holds every worker's stream position, the epoch, the layout (rank, world size, workers,
    batch size) and the data totals; `load_state_dict()` before the next `iter()` resumes exactly there, and
    refuses a state saved with another layout (the positions are per rank and per worker); `start_after()` continues
    from the states of another layout at the next epoch. `set_epoch(e)` starts epoch `e` at the next `iter()`.

    Bad data: the workers' counts are added up in `totals` (a `DataTotals`, over the whole run, resumed with the
    position); each batch's `data_stats` holds what the loader received since its previous batch (the workers'
    end-of-pass counts included). While `enforce_bad_limit` is true the loader raises `DataQualityError` when the
    totals are over the limit (`over_bad_limit`); the Trainer turns it off and judges the totals of every rank.

    Args:
        stream: The rank's batches.
        num_workers: DataLoader worker processes.
        layout: `rank`, `world_size`, `num_workers` and `batch_size`, saved with the state and checked on load.
        prefetch_factor: Batches each worker prepares ahead.
    """

    def __init__(self, stream: ImageTextStream, num_workers: int, layout: dict, prefetch_factor: int = 2):
        with warnings.catch_warnings():  # torchdata 0.11's constructor calls the deprecated torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
            super().__init__(stream, batch_size=None, num_workers=num_workers, collate_fn=_keep_batch,
                             prefetch_factor=prefetch_factor if num_workers > 0 else None, persistent_workers=False)
        self.stream = stream
        self.layout = dict(layout)
        self.totals = DataTotals()
        self.enforce_bad_limit = True
        self.batches_this_pass = 0

    def __iter__(self):
        self.batches_this_pass = 0
        unreported: dict = {}
        for item in super().__iter__():
            stats = item.get("data_stats") or {}
            self.totals.add(stats)
            for key, value in stats.items():  # data_stats since the previous batch (end-of-pass items included)
                if isinstance(value, str):
                    unreported[key] = value or unreported.get(key, "")
                elif isinstance(value, dict):
                    merged = unreported.setdefault(key, {})
                    for name, count in value.items():
                        merged[name] = merged.get(name, 0) + count
                else:
                    unreported[key] = unreported.get(key, 0) + value
            self.check_bad_limit()
            if item.get(END_OF_PASS):
                continue
            item["data_stats"], unreported = unreported, {}
            self.batches_this_pass += 1
            yield item

    def check_bad_limit(self) -> None:
        """Raise `DataQualityError` when `enforce_bad_limit` is on and this loader's totals are over the limit."""
        stream = self.stream
        if self.enforce_bad_limit and over_bad_limit(self.totals.read, self.totals.skipped, stream.max_bad_fraction,
                                                     stream.bad_check_min_samples):
            raise DataQualityError(bad_data_message(self.totals.read, self.totals.skipped, stream.max_bad_fraction,
                                                    f"rank {self.layout['rank']}", self.totals.describe()))

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.stream.epoch, "layout": dict(self.layout), "loader": super().state_dict(),
                "totals": self.totals.state_dict()}

    @staticmethod
    def _check_state(state_dict: dict) -> None:
        if not {"epoch", "layout", "loader"} <= set(state_dict) <= {"epoch", "layout", "loader", "totals"}:
            raise ValueError(f"not a StreamingDataLoader state: keys {sorted(state_dict)}, "
                             "expected ['epoch', 'layout', 'loader', 'totals']")

    def start_after(self, saved_states: list[dict], keep_totals: bool) -> int:
        """Continue a run whose data positions were saved with another layout (other ranks or workers), from the
        `state_dict()` of every saved rank: the positions themselves cannot carry over (each is per rank and per
        worker), so this loader starts the epoch after the newest epoch any saved rank had reached (no sample is
        seen twice; the rest of the interrupted epoch is not seen). With `keep_totals` (one rank of the new run) the
        saved ranks' data totals are added into this loader's, so the run-wide bad-sample counts carry over.

        Returns:
            The epoch this loader starts.
        """
        for state in saved_states:
            self._check_state(state)
        epoch = max(int(state["epoch"]) for state in saved_states) + 1
        self.stream.set_epoch(epoch)
        if keep_totals:
            for state in saved_states:
                if "totals" in state:
                    self.totals.merge_state(state["totals"])
        return epoch

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_state(state_dict)
        if state_dict["layout"] != self.layout:
            raise ValueError(f"the data position was saved with {state_dict['layout']} but this loader has "
                             f"{self.layout}; resume with the same ranks, workers and batch size")
        self.stream.set_epoch(state_dict["epoch"])  # before the positions: datasets ignores a state of another epoch
        super().load_state_dict(state_dict["loader"])
        if "totals" in state_dict:
            self.totals.load_state_dict(state_dict["totals"])


def _prepare(args: DataArguments, spec: str | None, split: str | tuple[str, ...], keep_columns=()
             ) -> tuple[Source, Columns]:
    """Open a source, detect its columns and keep only those (undecoded images)."""
    source = open_source(spec, split, args.dataset_config_name)
    dataset = source.dataset
    names = list(dataset.features) if dataset.features is not None else list(next(iter(dataset)))
    columns = detect_columns(dataset.features, names, source.description, args.image_column, args.caption_column,
                             args.id_column, keep_columns)
    dataset = dataset.select_columns([name for name in columns.needed if name in names])
    if dataset.features is not None and isinstance(dataset.features.get(columns.image), ImageFeature):
        dataset = dataset.cast_column(columns.image, ImageFeature(decode=False))  # we decode (and judge) ourselves
    source.dataset = dataset
    return source, columns


def _build(args: DataArguments, spec: str | None, split: str | tuple[str, ...], processor, batch_size: int,
           num_workers: int, rank: int, world_size: int, seed: int, training: bool, keep_columns=()
           ) -> StreamingDataLoader:
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid loader layout: batch_size={batch_size}, num_workers={num_workers}, "
                         f"rank={rank}, world_size={world_size}")
    if num_workers > 0:  # the Rust tokenizer's thread pool and forked workers do not mix; workers are the parallelism
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    source, columns = _prepare(args, spec, split, keep_columns)
    dataset = source.dataset
    shuffle_buffer = args.shuffle_buffer if training else 0
    if shuffle_buffer:
        # Shard order only (the example buffer is ImageTextStream's): reshuffled by set_epoch, the same permutation
        # on every rank (same seed) before the node split, and resumed exactly (buffer of 1, one input shard).
        dataset = dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    message = shard_layout_warning(dataset.num_shards, world_size, num_workers)
    if message and rank == 0:
        warnings.warn(f"{source.description}: {message}", stacklevel=3)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    image_size = image_size_of(processor.image_processor)
    augment = training and args.augment
    decoder = SampleDecoder(columns, args.min_image_side, args.max_image_pixels, image_size, augment,
                            (args.augment_min_scale, 1.0), seed, source.paths_relative_to_shard, training,
                            args.jpeg_draft)
    encoder = BatchEncoder(processor, _text_length(args, processor.tokenizer), augment)
    stream = ImageTextStream(dataset, decoder, encoder, batch_size, drop_last=training,
                             max_bad_fraction=args.max_bad_fraction, bad_check_min_samples=args.bad_check_min_samples,
                             rank=rank, shuffle_buffer=shuffle_buffer, seed=seed)
    layout = {"rank": rank, "world_size": world_size, "num_workers": num_workers, "batch_size": batch_size}
    return StreamingDataLoader(stream, num_workers, layout)


def build_train_dataloader(args: DataArguments, processor, batch_size: int, num_workers: int, rank: int,
                           world_size: int, seed: int) -> StreamingDataLoader:
    """The resumable training loader of one rank.

    Args:
        args: Data arguments.
        processor: `CLIPProcessor` (its image size and tokenizer define the batch).
        batch_size: Samples per batch on this rank (every batch is full: `drop_last`).
        num_workers: DataLoader worker processes (0: decode in the main process).
        rank: This process's rank; world_size: number of processes. Shards are split by `datasets`
            (`split_dataset_by_node`); do not let accelerate shard or dispatch this loader again.
        seed: Shuffle / augmentation seed (the same on every rank).

    Returns:
        A `StreamingDataLoader`; each batch has `pixel_values` (B, 3, S, S) float32, `input_ids` and
        `attention_mask` (B, L) int64, `sample_ids` (B,) int64 and `data_stats` (pop it before the forward).
    """
    return _build(args, args.train_data, args.train_split, processor, batch_size, num_workers, rank, world_size, seed,
                  training=True)


def build_eval_dataloader(args: DataArguments, processor, batch_size: int, num_workers: int = 0, rank: int = 0,
                          world_size: int = 1, keep_columns: tuple[str, ...] = ()) -> StreamingDataLoader:
    """The evaluation loader: `eval_data` (default: the embedded test split), no shuffle / augmentation, and the
    last partial batch kept. `keep_columns` (e.g. `("label",)`) are copied into each batch (tensors when numeric).
    """
    split = args.eval_split or EVAL_SPLITS  # explicit, else the first conventional evaluation split that exists
    return _build(args, args.eval_data, split, processor, batch_size, num_workers, rank, world_size,
                  seed=0, training=False, keep_columns=tuple(keep_columns))


def find_train_num_samples(args: DataArguments) -> int | None:
    """The training-set size n, or None when it cannot be known without downloading the data.

    In order: `--train_num_samples`; local parquet / webdataset files counted from their metadata (footers, tar
    headers; cached, see `counting.py`); the split size a Hub dataset's card declares; other local files
    (captions files, arrow) streamed once without decoding images (every record, bad samples included, so the
    count bounds the number of distinct sample ids). A remote dataset without declared size gives None.
    """
    if args.train_num_samples is not None:
        return args.train_num_samples
    source, columns = _prepare(args, args.train_data, args.train_split)
    counted = count_from_metadata(list(source.data_files), source.builder_name)
    if counted is not None:
        return counted
    if source.num_examples is not None:
        return source.num_examples
    if not source.data_files or not all(os.path.isfile(f) for f in source.data_files):
        return None  # remote: streaming it to count would download it all
    smallest = source.dataset.select_columns([columns.id or columns.caption])  # read as little as possible
    return sum(len(next(iter(batch.values()))) for batch in smallest.iter(batch_size=4096))


def count_samples(args: DataArguments) -> int:
    """The training-set size n (`find_train_num_samples`); raises when it is unknown.

    Raises:
        ValueError: the data is a remote stream without a declared size: set `--train_num_samples`.
    """
    count = find_train_num_samples(args)
    if count is None:
        raise ValueError(
            f"the number of training samples of {args.train_data!r} is unknown (a remote dataset without a declared "
            "split size; counting it would download it all): set --train_num_samples"
        )
    return count
