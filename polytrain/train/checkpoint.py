"""Checkpoints with a checksum, written atomically and loaded without unpickling arbitrary objects."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytrain.train.io import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
# File layout: MAGIC, the SHA-256 of the payload as 64 hex digits, a newline, then the torch.save payload.
_MAGIC = b"POLYTRAIN-CHECKPOINT-1\n"
_DIGEST_LEN = 64


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or incompatible (one-line message)."""


def checkpoint_path(directory: str | Path) -> Path:
    """Where a run directory keeps its latest checkpoint."""
    return Path(directory) / CHECKPOINT_NAME


def older_checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where a run directory keeps the checkpoint of global step `step` once a newer one exists."""
    return Path(directory) / f"checkpoint.{step}.pt"


def checkpoints_newest_first(directory: str | Path) -> list[Path]:
    """checkpoint.pt, then the older checkpoint.STEP.pt by step, newest first (those that exist)."""
    directory = Path(directory)
    older = []
    for path in directory.glob("checkpoint.*.pt"):
        step = path.name[len("checkpoint."):-len(".pt")]
        if step.isdigit():
            older.append((int(step), path))
    newest = [checkpoint_path(directory)] if checkpoint_path(directory).exists() else []
    return newest + [path for _, path in sorted(older, reverse=True)]


def keep_previous(directory: str | Path, step: int, keep: int) -> None:
    """Before a new checkpoint.pt is written: the current one (of global step `step`) stays as
    checkpoint.STEP.pt (a hard link, so there is no moment without it), and only the `keep` - 1 newest older
    ones are kept."""
    newest = checkpoint_path(directory)
    if not newest.exists():
        return
    previous = older_checkpoint_path(directory, step)
    previous.unlink(missing_ok=True)
    try:
        os.link(newest, previous)
    except OSError:  # a file system without hard links
        shutil.copyfile(newest, previous)
    for stale in checkpoints_newest_first(directory)[keep:]:
        stale.unlink(missing_ok=True)


def load_newest_intact(directory: str | Path, quarantine: bool = False
                       ) -> tuple[Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint of run `directory` that loads, its state, and why each newer one was passed over;
    None when there is none. With `quarantine`, the newer ones are renamed to NAME.corrupt once an older one is
    taken (the run continues there, and no later rotation takes them for good ones). With no intact one,
    nothing is renamed and CheckpointError names them all."""
    skipped, corrupt = [], []
    for path in checkpoints_newest_first(directory):
        try:
            state = load_checkpoint(path)
        except CheckpointError as error:
            skipped.append(str(error))
            corrupt.append(path)
            continue
        for bad in corrupt if quarantine else ():
            bad.replace(bad.with_name(bad.name + ".corrupt"))
        return path, state, skipped
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(skipped)}")
    return None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Saves `state` (tensors, numbers, strings, lists, dicts) atomically with its checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(path, _MAGIC + digest + b"\n" + payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint after verifying its checksum; never unpickles arbitrary objects."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by polytrain train --out") from None
    except OSError as error:  # a folder, a path below a file, an unreadable file
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}; expected a file written by "
                              f"polytrain train --out") from None
    header_len = len(_MAGIC) + _DIGEST_LEN + 1
    if not data.startswith(_MAGIC) or len(data) < header_len:
        raise CheckpointError(f"{path} is not a polytrain checkpoint (bad header; truncated or another format)")
    digest, payload = data[len(_MAGIC):header_len - 1], data[header_len:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"corrupt checkpoint {path}: checksum mismatch (truncated or modified); not loaded")
    try:
        with warnings.catch_warnings():  # torch warns of unusual pickle protocols on stderr; the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_failure(error)}; not loaded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: it holds a {type(state).__name__}; expected the "
                              f"dict of a run's state")
    return state


def _load_failure(error: BaseException) -> str:
    """One line of why torch.load refused a payload: weights-only loading's own reason (the unsupported global
    or operation) rather than its advice to load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Weights only load failed"):
        reason = next((line for line in lines[1:] if "nsupported" in line), "an object outside the allowed types")
        return (f"it holds more than tensors, numbers, strings, lists and dicts, refused by weights-only "
                f"loading ({reason.rstrip('.')})")
    return lines[0]


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python global RNG states in a form `weights_only` loading accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores the RNG states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _same(a: Any, b: Any) -> bool:
    """Whether two checkpoint values (tensors, numbers, strings, lists, dicts) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def reshard_error(parts: list[dict], strategy: str, world_size: int) -> str | None:
    """Why the per-rank `parts` of a checkpoint cannot be re-sharded onto `world_size` ranks, or None.

    Policy state that is the same on every rank (none at all, DiLoCo's anchor) is replicated and every new
    rank takes it; state that differs between ranks (compressor residuals, local SGD's models between
    averages) belongs to one rank's data and has no place on another world.
    """
    if len(parts) == world_size or all(_same(p["policy"], parts[0]["policy"]) for p in parts[1:]):
        return None
    return (f"its {strategy} state differs between its {len(parts)} ranks (e.g. compressor residuals, local "
            f"models between averages) and cannot be re-sharded onto {world_size}; resume with --workers "
            f"{len(parts)}")
