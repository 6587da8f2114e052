"""Crash-safe training checkpoints.

A checkpoint is one file ``<output_dir>/checkpoints/step-<step>.pt`` written by ``torch.save`` of
plain tensors, numbers, strings, lists and dicts only, and read back with
``torch.load(weights_only=True)`` (no arbitrary pickle code ever runs). Writes are atomic: a
temporary file in the same folder, ``fsync``, then ``os.replace`` (and an ``fsync`` of the folder),
so a crash at any moment leaves either the previous set of complete checkpoints or the new one;
leftover temporary files are removed on the next start. The newest ``keep`` checkpoints are kept.

Contents (see :mod:`visd.training.engine`): ``format``, ``version``, ``config`` (the TrainConfig
JSON), ``world_size``, ``position`` (stage, epoch, batch within the epoch, global and stage step),
``model``, ``momentum`` (or None), ``optimizer``, ``scheduler``, ``scaler`` and ``rng`` (one dict of
tensors per process: python, numpy, torch, CUDA generator states).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visd.errors import CheckpointMismatchError
from visd import _fault

__all__ = [
    "FORMAT",
    "checkpoint_path",
    "atomic_save",
    "load_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "remove_temporaries",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
]

logger = logging.getLogger(__name__)

FORMAT = "visd-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:09d}.pt"


class _HalfwayKill:
    """File wrapper that SIGKILLs the process after ``limit`` bytes (test-only fault injection)."""

    def __init__(self, f, step: int, limit: int = 1 << 16) -> None:
        self.f, self.step, self.limit, self.written = f, step, limit, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += len(data)
        if self.written >= self.limit:
            self.f.flush()
            os.fsync(self.f.fileno())
            _fault.kill_if_armed("checkpoint_write", self.step)
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a folder
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(state: dict[str, Any], path: str | Path, *, step: int = -1) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            target = _HalfwayKill(raw, step) if _fault.armed("checkpoint_write", step) else raw
            torch.save(state, target)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        CheckpointMismatchError: the file is damaged, holds arbitrary Python objects, or is not a
            visd training checkpoint.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointMismatchError(
            f"cannot read training checkpoint {path}: {type(e).__name__}: {str(e)[:200]}. "
            "It is damaged or not a visd checkpoint (only plain tensors and containers are accepted)."
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a visd training checkpoint (format {FORMAT!r} expected)")
    if state.get("version") != VERSION:
        raise CheckpointMismatchError(f"{path} has checkpoint version {state.get('version')}, this visd reads {VERSION}")
    return state


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    old = list_checkpoints(folder)[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".step-") and ".tmp-" in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d unfinished checkpoint files in %s", len(stale), folder)
    return stale


def latest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads (older ones are tried when a newer one is unreadable)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointMismatchError as e:
            logger.warning("skipping unreadable checkpoint: %s", e)
    return None


# -- random number generator states --------------------------------------------------------------
def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The python, numpy, torch (and CUDA, on a CUDA device) generator states as tensors."""
    _, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    cuda = device is not None and device.type == "cuda"
    return {
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if cuda else torch.zeros(0, dtype=torch.uint8),
    }


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    """Restore the states captured by :func:`rng_state`."""
    gauss_flag, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), gauss if gauss_flag else None))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every process's :func:`rng_state`, in rank order (a collective under torchrun)."""
    mine = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    world = dist.get_world_size()
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key, value in mine.items():
        local = value.to(comm)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        for r in range(world):
            out[r][key] = parts[r].cpu()
    return out
