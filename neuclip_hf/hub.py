"""Sharing on the Hugging Face Hub: full models, LoRA adapters, and the normalizer on its own.

A full model repository holds what `NeuCLIPModel.save_pretrained` writes (`config.json` with an `auto_map`,
`model.safetensors` with the encoders and `normalizer.*`, the model code files for `trust_remote_code=True`), the
processor and tokenizer files, and a model card (`README.md`). It loads as `NeuCLIPModel` through `AutoModel` (after
`import neuclip_hf`, or with `trust_remote_code=True` without the package), as a plain `CLIPModel` (encoders only)
and in the `zero-shot-image-classification` pipeline.

A normalizer repository (or directory) holds only the estimator: `normalizer.safetensors` (its parameters and
buffers, keys relative to `model.normalizer`) and `normalizer_config.json` (the objective, the estimator class, the
embedding size and the estimator's hyper-parameters). `load_normalizer` warm-starts a model's normalizer from such a
repository or from a full model repository, and refuses a different objective or different tensor shapes.

Safety rules, enforced here for every upload:
- only model files are uploaded: safetensors weights, JSON configs, the model code, tokenizer files and the card;
  pickles (`training_args.bin`, `*.pt` optimizer states, ...) never leave the machine, and nothing is unpickled;
- the Hub token is never logged, printed or written: uploads are refused if any text file (or safetensors header)
  contains it, and it is redacted from error messages;
- uploads run from the saved files and never modify them, so a failed push leaves the local checkpoint intact;
  transient failures (network errors, HTTP 408 / 429 / 5xx) are retried with exponential backoff (`RetryPolicy`),
  and a push that still fails raises `HubPushError` naming the repository, the cause and the local folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, get_token, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from .model_card import build_model_card, build_normalizer_card
from .modeling_neuclip import is_peft_model, unwrap_model
from .normalizers import NORMALIZERS, estimator_config, find_normalizer
from .version import __version__

logger = logging.get_logger(__name__)

NORMALIZER_WEIGHTS_NAME = "normalizer.safetensors"
NORMALIZER_CONFIG_NAME = "normalizer_config.json"
NORMALIZER_FORMAT = "neuclip_hf.normalizer"
NORMALIZER_FORMAT_VERSION = 1
NORMALIZER_PREFIX = "normalizer."  # where the normalizer's keys live in a full model's state dict

# Files a push may upload (matched against the file name): weights as safetensors, JSON configs and indexes, the
# model code (`trust_remote_code`), tokenizer files and the model card. Everything else stays local.
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.py", "README.md", "merges.txt", "vocab.txt", "*.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
TEXT_SUFFIXES = (".json", ".py", ".md", ".txt", ".model", ".yaml", ".yml")  # scanned for the token before upload
TENSORBOARD_PREFIX = "events.out.tfevents."  # TensorBoard event files, written under runs/ by report_to=tensorboard
RETRIABLE_STATUS = (408, 429)  # besides every 5xx: request timeout and rate limit

T = TypeVar("T")


# -- errors and retries -----------------------------------------------------------------------------------------
class HubPushError(RuntimeError):
    """A push to the Hub failed; the local files it was pushing are intact.

    Attributes:
        repo_id: The target repository.
        local_dir: The folder whose files were being pushed (still complete).
        status: The HTTP status of the last failure (None for a network error).
        attempts: How many attempts were made.
    """

    def __init__(self, message: str, repo_id: str, local_dir: str | None, status: int | None, attempts: int):
        super().__init__(message)
        self.repo_id, self.local_dir, self.status, self.attempts = repo_id, local_dir, status, attempts


@dataclass
class RetryPolicy:
    """Bounded exponential backoff for Hub calls: waits `initial_delay * factor**k` (at most `max_delay`) between
    attempts.

    Args:
        attempts: Total attempts (1 = no retry).
        initial_delay: Seconds before the first retry.
        max_delay: Upper bound of one wait.
        factor: Growth of the wait per retry.
        sleep: Called with each wait in seconds (inject a recorder in tests to retry instantly).
    """

    attempts: int = 4
    initial_delay: float = 2.0
    max_delay: float = 60.0
    factor: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts={self.attempts} must be >= 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.factor < 1:
            raise ValueError("RetryPolicy needs initial_delay >= 0, max_delay >= 0 and factor >= 1")

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based)."""
        return min(self.max_delay, self.initial_delay * self.factor ** (retry - 1))


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a Hub error (None when there was no HTTP answer)."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) if isinstance(error, HfHubHTTPError) else None


def is_transient(error: BaseException) -> bool:
    """Whether retrying can help: network errors, timeouts, rate limits and server errors (5xx).

    Other 4xx answers (bad token, no permission, invalid card, ...) fail the same way on every attempt.
    """
    if isinstance(error, HfHubHTTPError):  # checked first: it is also an OSError
        status = http_status(error)
        return status is not None and (status >= 500 or status in RETRIABLE_STATUS)
    if isinstance(error, OfflineModeIsEnabled):
        return False
    try:  # huggingface_hub's HTTP client (httpx2 in huggingface_hub 2.x, httpx before)
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        import httpx
    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced (never let a token reach a message or a log)."""
    return text.replace(secret, "<redacted>") if secret else text


def _describe(error: BaseException, secret: str | None) -> str:
    """A one-line cause: the HTTP status and the server's message, or the network error."""
    status = http_status(error)
    if status is not None:
        try:  # httpx raises RuntimeError for a response without its request
            request = error.response.request
            where = f" on {request.method} {request.url.path}"
        except (AttributeError, RuntimeError):
            where = ""
        server = getattr(error, "server_message", None) or ""
        text = f"HTTP {status}{where}" + (f": {server}" if server else "")
    else:
        text = f"{type(error).__name__}: {error}"
    return redact(" ".join(text.split()), secret)[:500]


def call_with_retry(action: Callable[[], T], what: str, repo_id: str, retry: RetryPolicy | None = None,
                    local_dir: str | os.PathLike | None = None, secret: str | None = None) -> T:
    """Run a Hub call, retrying transient failures; raise `HubPushError` when it still fails.

    Args:
        action: The call (re-invoked on each attempt, so it must build fresh request objects).
        what: What is being done, for messages (e.g. "upload of 7 files").
        repo_id: The repository, for messages.
        retry: The backoff policy (default `RetryPolicy()`).
        local_dir: The local folder being pushed, named in the error so the user knows the files are safe.
        secret: The token, redacted from every message.
    """
    retry = retry or RetryPolicy()
    local_dir = None if local_dir is None else os.path.abspath(local_dir)  # a path the user can find again
    for attempt in range(1, retry.attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified below
            transient = is_transient(error)
            # Hub answers, I/O and network errors become a HubPushError; programming errors propagate unchanged.
            if not transient and not isinstance(error, (OSError, ValueError)):
                raise
            cause = _describe(error, secret)
            if transient and attempt < retry.attempts:
                wait = retry.delay(attempt)
                logger.warning(f"{what} to {repo_id} failed ({cause}); retry {attempt}/{retry.attempts - 1} "
                               f"in {wait:.1f} s")
                retry.sleep(wait)
                continue
            tries = f" after {attempt} attempt{'s' if attempt > 1 else ''}"
            hint = "" if transient else " (not retried: retrying does not fix this error)"
            kept = (f" The local files in {local_dir} are intact; push them again later with "
                    f"neuclip_hf.hub.upload_folder({local_dir!r}, {repo_id!r})." if local_dir else "")
            message = f"{what[:1].upper() + what[1:]} to {repo_id} failed{tries}: {cause}{hint}.{kept}"
            raise HubPushError(message, repo_id, local_dir, http_status(error), attempt) from error
    raise AssertionError("unreachable")  # the loop always returns or raises


# -- what gets uploaded -----------------------------------------------------------------------------------------
def upload_files(folder: str | os.PathLike, include_tensorboard: bool = False) -> list[str]:
    """The files of `folder` a push uploads (paths relative to it, sorted): model files only, never pickles.

    Checkpoint sub-folders (`checkpoint-*`), hidden and private files (`.*`, `_*`) and logs are left out; with
    `include_tensorboard`, the TensorBoard event files under `runs/` (`events.out.tfevents.*`) go too, as
    `Trainer` pushes them, so the Hub shows the training curves.
    """
    folder = Path(folder)
    chosen, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        hidden = any(part.startswith((".", "_")) or part.startswith("checkpoint-") for part in relative.parts)
        allowed = any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD_PATTERNS)
        if include_tensorboard and relative.parts[0] == "runs" and path.name.startswith(TENSORBOARD_PREFIX):
            allowed = True
        (chosen if allowed and not hidden else skipped).append(relative.as_posix())
    pickles = [name for name in skipped if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        logger.info(f"not uploaded (pickled or training-only files): {', '.join(pickles[:10])}")
    return chosen


def public_path_in_repo(name: str) -> str:
    """Where a file of the pushed folder goes in the repository: its own relative path, except that TensorBoard's
    event files, whose names carry this machine's host name (`events.out.tfevents.<time>.<host>.<pid>.<n>`, in
    `runs/<time>_<host>/` by transformers' default), get `host` in its place."""
    if not name.startswith("runs/"):
        return name
    return name.replace(socket.gethostname(), "host")


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, shapes, metadata), without reading the tensors."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))  # the format starts with the header size, little-endian u64
        return f.read(min(length, 100 * 1024 * 1024))


def files_containing(folder: str | os.PathLike, names: list[str], secret: str | None) -> list[str]:
    """Which of `names` (relative to `folder`) contain `secret` in their text or safetensors header."""
    if not secret:
        return []
    needle = secret.encode("utf-8")
    found = []
    for name in names:
        path = Path(folder) / name
        if name.endswith(".safetensors"):
            content = _safetensors_header(path)
        elif name.endswith(TEXT_SUFFIXES):
            content = path.read_bytes()
        else:
            continue
        if needle in content:
            found.append(name)
    return found


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool | None = None,
                  revision: str | None = None, commit_message: str = "Upload NeuCLIP model",
                  retry: RetryPolicy | None = None, api: HfApi | None = None, create_repo: bool = True,
                  include_tensorboard: bool = False):
    """Push the model files of `folder` (see `upload_files`) to `repo_id` in one commit; the folder is only read.

    Args:
        folder: A saved model / adapter / normalizer folder (e.g. a training run's `output_dir`).
        repo_id: `namespace/name` on the Hub.
        token: A write token (default: the logged-in token or `HF_TOKEN`).
        private: Create the repository private (no effect if it exists).
        revision: Branch to commit to (default: main).
        commit_message: The commit message.
        retry: Backoff policy for transient failures.
        api: The `HfApi` to use (default: one for the configured endpoint).
        create_repo: Create the repository if it does not exist.
        include_tensorboard: Also upload the TensorBoard event files under `runs/`.

    Returns:
        The `CommitInfo` of the commit.

    Raises:
        HubPushError: the push failed (after retries for transient failures); the folder is intact.
        ValueError: nothing to upload, or a file contains the token (nothing is uploaded then).
    """
    api = api or HfApi()
    secret = token or get_token()
    names = upload_files(folder, include_tensorboard)
    if not names:
        raise ValueError(f"{folder} holds no model files to upload (expected safetensors weights and configs)")
    leaking = files_containing(folder, names, secret)
    if leaking:
        raise ValueError(f"refusing to upload {', '.join(leaking)} from {folder}: the file contains your Hub token")
    card = Path(folder) / "README.md"
    if card.is_file():  # the Hub's own metadata check, so a bad card fails before any upload
        call_with_retry(lambda: ModelCard.load(card).validate(), "model card validation", repo_id, retry, folder,
                        secret)
    if create_repo:
        call_with_retry(lambda: api.create_repo(repo_id, token=token, private=private, exist_ok=True),
                        "repository creation", repo_id, retry, folder, secret)

    def commit():
        # Fresh operations on every attempt: create_commit mutates them.
        operations = [CommitOperationAdd(path_in_repo=public_path_in_repo(name),
                                         path_or_fileobj=str(Path(folder) / name)) for name in names]
        return api.create_commit(repo_id, operations, commit_message=commit_message, token=token, revision=revision)

    info = call_with_retry(commit, f"upload of {len(names)} files", repo_id, retry, folder, secret)
    logger.info(f"pushed {len(names)} files from {folder} to {repo_id}")
    return info


# -- the normalizer on its own ----------------------------------------------------------------------------------
def normalizer_config(model: torch.nn.Module) -> dict[str, Any]:
    """The JSON description of a model's normalizer (what `normalizer_config.json` holds)."""
    core = unwrap_model(model)
    return {
        "format": NORMALIZER_FORMAT,
        "format_version": NORMALIZER_FORMAT_VERSION,
        "objective": core.config.objective,
        "normalizer_class": type(find_normalizer(model)).__name__,
        "projection_dim": core.config.projection_dim,
        "estimator_config": estimator_config(core.config),
        "neuclip_hf_version": __version__,
    }


def save_normalizer(model: torch.nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Write the normalizer's tensors (`normalizer.safetensors`) and description (`normalizer_config.json`).

    Args:
        model: A NeuCLIPModel (optionally DDP / PEFT wrapped).
        directory: Created if needed; other files in it are left alone.

    Returns:
        The two written paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    normalizer = find_normalizer(model)
    # Contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in normalizer.state_dict().items()}
    description = normalizer_config(model)
    weights = directory / NORMALIZER_WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "objective": description["objective"]})
    config = directory / NORMALIZER_CONFIG_NAME
    config.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return [weights, config]


@dataclass
class _SavedNormalizer:
    """Where a saved normalizer's tensors are and what it was trained for."""

    objective: str
    estimator_config: dict[str, Any]
    weight_files: list[Path]
    prefix: str  # key prefix inside the weight files ("" for normalizer.safetensors)


def fetch_repo_file(source: str, filename: str, hub_kwargs: dict) -> Path | None:
    """A file of a local directory or Hub repository (None when the repository has no such file)."""
    local = Path(source)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(source, filename, **hub_kwargs))
    except EntryNotFoundError:
        return None


def _locate_normalizer(source: str, hub_kwargs: dict) -> _SavedNormalizer:
    """Find a normalizer in a normalizer-only or a full-model directory / repository (safetensors only)."""
    description = fetch_repo_file(source, NORMALIZER_CONFIG_NAME, hub_kwargs)
    if description is not None:
        saved = json.loads(description.read_text())
        weights = fetch_repo_file(source, NORMALIZER_WEIGHTS_NAME, hub_kwargs)
        if saved.get("format") != NORMALIZER_FORMAT or weights is None:
            raise ValueError(f"{source} has a {NORMALIZER_CONFIG_NAME} but no valid {NORMALIZER_WEIGHTS_NAME}")
        return _SavedNormalizer(saved["objective"], saved.get("estimator_config", {}), [weights], "")
    config = fetch_repo_file(source, "config.json", hub_kwargs)
    if config is None:
        raise ValueError(f"{source} holds neither a {NORMALIZER_CONFIG_NAME} nor a model config.json")
    values = json.loads(config.read_text())
    if "objective" not in values:
        raise ValueError(f"{source} is a {values.get('model_type', 'non-NeuCLIP')} checkpoint: it holds no normalizer")
    index = fetch_repo_file(source, "model.safetensors.index.json", hub_kwargs)
    if index is not None:  # sharded weights: fetch only the shards holding normalizer tensors
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(NORMALIZER_PREFIX)})
        files = [fetch_repo_file(source, shard, hub_kwargs) for shard in shards]
    else:
        files = [fetch_repo_file(source, "model.safetensors", hub_kwargs)]
    if not files or any(f is None for f in files):
        raise ValueError(f"{source} has no safetensors weights (only safetensors are read, never pickles)")
    objective = values["objective"]
    method = NORMALIZERS.get(objective)  # an unknown objective is refused by the caller (it is not the model's)
    keys = {"eps", *(method.config_keys() if method is not None else ())}
    estimator = {k: v for k, v in values.items() if k in keys}
    return _SavedNormalizer(objective, estimator, files, NORMALIZER_PREFIX)


def load_normalizer(model: torch.nn.Module, source: str | os.PathLike, *, revision: str | None = None,
                    token: str | None = None, cache_dir: str | None = None,
                    local_files_only: bool = False) -> dict[str, Any]:
    """Warm-start `model`'s normalizer from a saved one (its parameters, buffers and counters).

    Args:
        model: The NeuCLIPModel (optionally PEFT / DDP wrapped) whose normalizer is overwritten.
        source: A directory or Hub repository holding `normalizer.safetensors` + `normalizer_config.json`, or a
            full NeuCLIP model (`config.json` + `model.safetensors`, whose `normalizer.*` tensors are read).
        revision: Hub revision.
        token: Hub token for private repositories.
        cache_dir: Hub cache folder.
        local_files_only: Do not reach the Hub.

    Returns:
        `{"source", "objective", "tensors", "differences"}`; `differences` maps estimator fields whose saved value
        differs from the model's (the model's values are kept, e.g. a different number of inner steps) to
        `(saved, model)`.

    Raises:
        ValueError: the source was trained for another objective, or its tensors do not have the model's names and
            shapes (e.g. another number of prototypes or embedding size).
    """
    source = str(source)
    hub_kwargs = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
    saved = _locate_normalizer(source, hub_kwargs)
    core, normalizer = unwrap_model(model), find_normalizer(model)
    objective = core.config.objective
    if saved.objective != objective:
        raise ValueError(f"the normalizer in {source} was trained for objective={saved.objective!r}, but this model "
                         f"uses objective={objective!r}: a normalizer only carries over within one objective")
    tensors: dict[str, torch.Tensor] = {}
    for path in saved.weight_files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(saved.prefix):
                    tensors[key[len(saved.prefix):]] = f.get_tensor(key)
    expected = normalizer.state_dict()
    problems = [f"missing {name}" for name in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {name}" for name in sorted(set(tensors) - set(expected))]
    problems += [f"{name}: saved {tuple(tensors[name].shape)}, model {tuple(value.shape)}"
                 for name, value in expected.items() if name in tensors and tensors[name].shape != value.shape]
    if problems:
        mine = estimator_config(core.config)
        hints = {k: (v, mine.get(k)) for k, v in saved.estimator_config.items() if mine.get(k) != v}
        raise ValueError(f"the normalizer in {source} does not fit this model ({'; '.join(problems[:8])}); "
                         f"estimator fields that differ (saved, model): {hints or 'none'}")
    normalizer.load_state_dict(tensors, strict=True)
    normalizer.reset_optimizer_state()  # optimizer statistics belong to the replaced state
    mine = estimator_config(core.config)
    differences = {k: (v, mine.get(k)) for k, v in saved.estimator_config.items() if mine.get(k) != v}
    if differences:
        logger.warning(f"normalizer from {source}: estimator fields differ from this model's, which are kept: "
                       f"{differences}")
    logger.info(f"normalizer warm-started from {source} ({len(tensors)} tensors)")
    return {"source": source, "objective": objective, "tensors": len(tensors), "differences": differences}


def push_normalizer(model: torch.nn.Module, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str = "Upload NeuCLIP normalizer",
                    retry: RetryPolicy | None = None, api: HfApi | None = None, **card_kwargs):
    """Push only the normalizer (weights, description and a short card) to `repo_id`.

    Args:
        model: The NeuCLIPModel (optionally wrapped) whose normalizer is pushed.
        repo_id: `namespace/name` on the Hub.
        token, private, revision, commit_message, retry, api: As in `upload_folder`.
        **card_kwargs: Passed to `model_card.build_normalizer_card` (e.g. `source_model`, `license`).
    """
    with tempfile.TemporaryDirectory(prefix="neuclip-normalizer-") as staging:
        save_normalizer(model, staging)
        build_normalizer_card(model, repo_id=repo_id, **card_kwargs).save(Path(staging) / "README.md")
        return upload_folder(staging, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, retry=retry, api=api)


# -- full models and adapters -----------------------------------------------------------------------------------
def save_for_hub(model: torch.nn.Module, directory: str | os.PathLike, processor=None) -> None:
    """Write what a repository holds: full weights + config + model code, or (PEFT) adapter + normalizer; then the
    processor and tokenizer."""
    model = getattr(model, "module", model)
    model.save_pretrained(directory)  # NeuCLIPModel: config, model.safetensors, code; PEFT: adapter files
    if is_peft_model(model):
        save_normalizer(model, directory)  # the adapter leaves the normalizer out (see neuclip_hf.lora)
    if processor is not None:
        processor.save_pretrained(directory)


def push_to_hub(model: torch.nn.Module, repo_id: str, processor=None, *, card: ModelCard | None = None,
                token: str | None = None, private: bool | None = None, revision: str | None = None,
                commit_message: str = "Upload NeuCLIP model", retry: RetryPolicy | None = None,
                api: HfApi | None = None, **card_kwargs):
    """Push a trained model to the Hub: weights (encoders + normalizer) as safetensors, config, model code,
    processor and tokenizer, and a model card. A PEFT model pushes its adapter and the normalizer.

    The files are staged in a temporary folder, so nothing local is modified.

    Args:
        model: A NeuCLIPModel or a LoRA-wrapped one (`neuclip_hf.lora.apply_lora`).
        repo_id: `namespace/name` on the Hub.
        processor: The `CLIPProcessor` to ship with the model (needed by the pipeline).
        card: A ready model card (default: `model_card.build_model_card(model, **card_kwargs)`).
        token, private, revision, commit_message, retry, api: As in `upload_folder`.
        **card_kwargs: For `build_model_card`: `training` (a `TrainingSummary`), `eval_results` (a metrics dict or
            `ZeroShotEvalCallback.results`), `eval_dataset`, `license`, `tags`, ...

    Returns:
        The `CommitInfo` of the upload.
    """
    with tempfile.TemporaryDirectory(prefix="neuclip-push-") as staging:
        save_for_hub(model, staging, processor)
        card = card or build_model_card(model, repo_id=repo_id, **card_kwargs)
        card.save(Path(staging) / "README.md")
        return upload_folder(staging, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, retry=retry, api=api)


__all__ = [
    "HubPushError",
    "NORMALIZER_CONFIG_NAME",
    "NORMALIZER_WEIGHTS_NAME",
    "RetryPolicy",
    "call_with_retry",
    "is_transient",
    "load_normalizer",
    "normalizer_config",
    "push_normalizer",
    "push_to_hub",
    "save_for_hub",
    "save_normalizer",
    "upload_files",
    "upload_folder",
]
