"""The per-organ embedding file: what the diagnosis pipeline exports and the linear probe reads.

Format (safetensors):

* one tensor ``embeddings``: float32, shape (N_scans, N_organs, D); a row of NaN where an organ was not
  scored in a scan;
* metadata ``scans``: a JSON list of N_scans scan ids (strings, distinct), ``organs``: a JSON list of
  N_organs organ names (distinct), ``format``: ``"visd.embeddings/1"`` (optional when reading).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visd._io import atomic_write_bytes
from visd.errors import InputError, did_you_mean

__all__ = ["EMBEDDINGS_FORMAT", "Embeddings", "load_embeddings", "save_embeddings"]

logger = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "visd.embeddings/1"
_TENSOR = "embeddings"


@dataclass(frozen=True)
class Embeddings:
    """Per-organ embeddings of a set of scans.

    ``embeddings``: (N_scans, N_organs, D) float32, NaN rows where an organ was not scored;
    ``scans[i]`` and ``organs[o]`` name axis 0 and axis 1.
    """

    embeddings: np.ndarray
    scans: tuple[str, ...]
    organs: tuple[str, ...]

    def organ(self, name: str) -> np.ndarray:
        """(N_scans, D) embeddings of one organ."""
        if name not in self.organs:
            raise InputError(
                f"unknown organ {name!r} in the embedding file. Expected one of {list(self.organs)}."
                f"{did_you_mean(name, self.organs)}"
            )
        return self.embeddings[:, self.organs.index(name), :]


def _check(embeddings: np.ndarray, scans: Sequence[str], organs: Sequence[str], where: str) -> None:
    if embeddings.ndim != 3:
        raise InputError(
            f"{where}: embeddings must have 3 axes (N_scans, N_organs, D): got shape {embeddings.shape}. "
            "Stack one (N_organs, D) array per scan."
        )
    n, o, _ = embeddings.shape
    if len(scans) != n or len(organs) != o:
        raise InputError(
            f"{where}: embeddings of shape {embeddings.shape} do not fit {len(scans)} scan ids and "
            f"{len(organs)} organ names. Expected len(scans) == N_scans and len(organs) == N_organs."
        )
    for what, names in (("scan ids", scans), ("organ names", organs)):
        if not all(isinstance(s, str) for s in names):
            raise InputError(f"{where}: {what} must be strings: got {list(names)[:3]}. Convert them with str().")
        seen: set[str] = set()
        dup = [s for s in names if s in seen or seen.add(s)]
        if dup:
            raise InputError(f"{where}: {what} must be distinct: {dup[:5]} repeat. Remove the duplicates.")


def save_embeddings(
    path: str | Path, embeddings, scans: Sequence[str], organs: Sequence[str]
) -> Path:
    """Write an embedding file atomically.

    Args:
        path: destination ``.safetensors`` file (its folder is created).
        embeddings: (N_scans, N_organs, D) array or torch tensor, cast to float32; NaN rows for organs
            that were not scored.
        scans: N_scans distinct scan ids. organs: N_organs distinct organ names.
    """
    from safetensors.numpy import save

    if hasattr(embeddings, "detach"):  # a torch tensor, without importing torch here
        embeddings = embeddings.detach().cpu().float().numpy()
    array = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    scans, organs = list(scans), list(organs)
    _check(array, scans, organs, f"save_embeddings({str(path)!r})")
    metadata = {"scans": json.dumps(scans), "organs": json.dumps(organs), "format": EMBEDDINGS_FORMAT}
    written = atomic_write_bytes(path, save({_TENSOR: array}, metadata=metadata))
    logger.info("wrote embeddings %s of %d scans x %d organs to %s", array.shape, *array.shape[:2], written)
    return written


def load_embeddings(path: str | Path) -> Embeddings:
    """Read and validate an embedding file written by :func:`save_embeddings`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"embedding file not found: {str(path)!r}. Expected a .safetensors file from visd.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
            if _TENSOR not in keys:
                raise InputError(
                    f"embedding file {str(path)!r} has no tensor {_TENSOR!r}: it holds {keys[:5]}. "
                    "Expected a file written by visd.evaluation.save_embeddings."
                )
            array = f.get_tensor(_TENSOR)
    except SafetensorError as e:
        raise InputError(f"cannot read embedding file {str(path)!r}: {e}. Expected a safetensors file.") from e
    fmt = metadata.get("format", EMBEDDINGS_FORMAT)
    if fmt != EMBEDDINGS_FORMAT:
        raise InputError(
            f"embedding file {str(path)!r} has format {fmt!r}. Expected {EMBEDDINGS_FORMAT!r}; upgrade visd."
        )
    names = {}
    for key in ("scans", "organs"):
        if key not in metadata:
            raise InputError(
                f"embedding file {str(path)!r} lacks the metadata entry {key!r}: it has {sorted(metadata)}. "
                "Expected JSON lists 'scans' and 'organs'. Re-export it with save_embeddings."
            )
        try:
            names[key] = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            raise InputError(
                f"embedding file {str(path)!r}: metadata {key!r} is not JSON: {metadata[key][:60]!r}. "
                "Expected a JSON list of strings."
            ) from e
        if not isinstance(names[key], list):
            raise InputError(
                f"embedding file {str(path)!r}: metadata {key!r} is {type(names[key]).__name__}, "
                "expected a JSON list of strings."
            )
    array = np.asarray(array, dtype=np.float32)
    _check(array, names["scans"], names["organs"], f"embedding file {str(path)!r}")
    return Embeddings(embeddings=array, scans=tuple(names["scans"]), organs=tuple(names["organs"]))
