"""Complete-checkpoint detection: a checkpoint counts only once its completion marker is written.

The Trainer writes a checkpoint file by file; a kill in the middle leaves a directory that looks like a checkpoint
but lacks, say, the optimizer or the data position. `NeuCLIPTrainer` writes `MARKER` last, after every rank has
written its files, and resumes only from directories that carry it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MARKER = "neuclip_checkpoint.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint whose marker was written (so every file of it is complete)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def write_marker(path: str | os.PathLike, global_step: int, world_size: int) -> None:
    """Mark `path` complete (atomic rename, so the marker itself is never half-written)."""
    path = Path(path)
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"complete": True, "global_step": global_step, "world_size": world_size}))
    os.replace(tmp, path / MARKER)


def marker_global_step(path: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was written at (from its marker)."""
    return int(json.loads((Path(path) / MARKER).read_text())["global_step"])


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-<step>` directories of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, skipping (with their names returned by the caller's log) any
    half-written ones."""
    complete = [p for p in checkpoint_dirs(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """Turn `--resume_from_checkpoint` (a path, True/"true"/"last", or None) into a complete checkpoint path.

    Raises:
        ValueError: an explicit path that is missing or incomplete, or True with no complete checkpoint.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false", "none")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last", "latest")):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            incomplete = [p.name for p in checkpoint_dirs(output_dir)]
            raise ValueError(
                f"--resume_from_checkpoint: no complete checkpoint in {output_dir}"
                + (f" (incomplete, ignored: {', '.join(incomplete)})" if incomplete else "")
            )
        return str(found)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {path} is not a directory")
    if not is_complete_checkpoint(path):
        fallback = last_complete_checkpoint(path.parent)
        hint = f"; the newest complete one is {fallback}" if fallback is not None else ""
        raise ValueError(
            f"--resume_from_checkpoint: {path} is incomplete (no {MARKER}); it was probably interrupted while "
            f"being written{hint}"
        )
    return str(path)


def read_full_weights(checkpoint: str | os.PathLike) -> dict:
    """The full weights a `save_pretrained` wrote into `checkpoint` (`model.safetensors`, or the shards of
    `model.safetensors.index.json`), on the CPU.

    Raises:
        ValueError: the directory has neither file.
    """
    from safetensors.torch import load_file

    single, index = Path(checkpoint) / "model.safetensors", Path(checkpoint) / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single, device="cpu")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict = {}
        for shard in shards:
            weights.update(load_file(Path(checkpoint) / shard, device="cpu"))
        return weights
    raise ValueError(f"{checkpoint} has no model.safetensors (nor its index): no full weights to resume from")
