"""The on-disk embedding index: per-organ embeddings with scan ids, appendable, readable with standard tools.

Layout of an index folder::

    archive/
      index.json                 {"format": "visd.index/1", "dim": E, "organs": [...], "model": "...",
                                  "shards": ["shard-00000", ...], "approximate": false}
      shard-00000.safetensors    tensor "embeddings": (n, E) float32, L2-normalised, one row per (scan, organ)
      shard-00000.csv            n rows: scan, organ, image (the source path, may be empty)
      ...

Each :meth:`ScanIndex.add` writes one new shard pair, then rewrites ``index.json`` atomically; the shards
listed there are the index, so a crash mid-append leaves the index as it was (a stray shard file is
overwritten by the next append). Open a shard with ``safetensors.numpy.load_file`` and its table with
``pandas.read_csv``; row ``i`` of the CSV is row ``i`` of the tensor. Scan ids are distinct across the
index; an organ that was not scored in a scan has no row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from visd._io import atomic_write_bytes, atomic_write_text
from visd.errors import InputError, did_you_mean

__all__ = ["INDEX_FORMAT", "ScanIndex"]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "visd.index/1"
_MANIFEST = "index.json"
_TENSOR = "embeddings"
_COLUMNS = ("scan", "organ", "image")


class ScanIndex:
    """An index folder of per-organ scan embeddings (see the module docstring for the format).

    Create one with :meth:`create`, open one with :meth:`open`; :meth:`add` appends scans and
    :meth:`rows` / :meth:`vectors` read them back.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self._manifest = manifest
        self._cache: tuple[pd.DataFrame, np.ndarray] | None = None

    # -- creating and opening ---------------------------------------------------------------------
    @classmethod
    def create(
        cls, folder: str | Path, organs: Sequence[str], dim: int, *, model: str | None = None,
        approximate: bool = False,
    ) -> "ScanIndex":
        """A new, empty index in ``folder`` (created; it must not hold an index yet)."""
        folder = Path(folder)
        if (folder / _MANIFEST).exists():
            raise InputError(
                f"{folder} already holds an index. Open it with ScanIndex.open to append, or choose another folder."
            )
        manifest = {"format": INDEX_FORMAT, "dim": int(dim), "organs": list(organs), "model": model,
                    "shards": [], "approximate": bool(approximate)}
        index = cls(folder, manifest)
        index._commit()
        return index

    @classmethod
    def open(cls, folder: str | Path) -> "ScanIndex":
        """Open an existing index folder."""
        folder = Path(folder)
        path = folder / _MANIFEST
        if not path.is_file():
            raise InputError(
                f"no visd index in {str(folder)!r}: {_MANIFEST} is missing. Build one with "
                "`visd index --out FOLDER` (or visd.retrieval.index_embeddings)."
            )
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read {path}: {e}. Expected the JSON file written by visd index.") from e
        if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise InputError(f"{path} has format {found!r}. Expected {INDEX_FORMAT!r}; upgrade visd or rebuild it.")
        return cls(folder, manifest)

    # -- properties ------------------------------------------------------------------------------
    @property
    def organs(self) -> tuple[str, ...]:
        return tuple(self._manifest["organs"])

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def model(self) -> str | None:
        """The model the embeddings came from (a folder or Hub repo id), when the index knows it."""
        return self._manifest.get("model")

    @property
    def approximate(self) -> bool:
        """Whether an approximate (HNSW) index is kept next to the shards (:mod:`visd.retrieval.approximate`)."""
        return bool(self._manifest.get("approximate"))

    def __len__(self) -> int:
        return len(self.rows())

    def check_organ(self, organ: str) -> str:
        if organ not in self.organs:
            raise InputError(
                f"unknown organ {organ!r}. Expected one of {list(self.organs)}.{did_you_mean(organ, self.organs)}"
            )
        return organ

    # -- reading ---------------------------------------------------------------------------------
    def _load(self) -> tuple[pd.DataFrame, np.ndarray]:
        if self._cache is None:
            from safetensors.numpy import load_file

            tables, arrays = [], []
            for shard in self._manifest["shards"]:
                tables.append(pd.read_csv(self.folder / f"{shard}.csv", dtype=str, keep_default_na=False))
                arrays.append(load_file(str(self.folder / f"{shard}.safetensors"))[_TENSOR])
            rows = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(_COLUMNS))
            vectors = np.concatenate(arrays) if arrays else np.zeros((0, self.dim), np.float32)
            self._cache = rows, vectors
        return self._cache

    def rows(self) -> pd.DataFrame:
        """The metadata of every row (columns scan, organ, image), in index order."""
        return self._load()[0]

    def vectors(self, organ: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
        """(metadata, (n, E) float32 unit vectors) of one organ's rows, or of all rows."""
        rows, vectors = self._load()
        if organ is None:
            return rows, vectors
        keep = (rows["organ"] == self.check_organ(organ)).to_numpy()
        return rows[keep].reset_index(drop=True), vectors[keep]

    # -- appending -------------------------------------------------------------------------------
    def add(
        self, embeddings, scans: Sequence[str], organs: Sequence[str] | None = None,
        images: Sequence[str | None] | None = None,
    ) -> int:
        """Append scans; return the number of rows added.

        Args:
            embeddings: (N_scans, N_organs, E) array or tensor, NaN rows for organs not scored (as
                :func:`visd.evaluation.save_embeddings` stores them); such rows are not indexed.
            scans: N_scans scan ids, new to the index and distinct.
            organs: the organ of each axis-1 entry (default: the index's organs); all must be known.
            images: the source path of each scan, kept as metadata.
        """
        if hasattr(embeddings, "detach"):
            embeddings = embeddings.detach().cpu().float().numpy()
        array = np.asarray(embeddings, dtype=np.float32)
        organs = list(self.organs if organs is None else organs)
        scans = list(scans)
        if array.ndim != 3 or array.shape[:2] != (len(scans), len(organs)) or array.shape[2] != self.dim:
            raise InputError(
                f"embeddings of shape {array.shape} do not fit {len(scans)} scans x {len(organs)} organs x "
                f"dimension {self.dim}. Expected (N_scans, N_organs, {self.dim}) from the same model as the index."
            )
        for organ in organs:
            self.check_organ(organ)
        known = set(self.rows()["scan"])
        clash = [s for s in scans if s in known]
        dup = sorted({s for s in scans if scans.count(s) > 1})
        if clash or dup:
            raise InputError(
                f"scan ids must be distinct across the index: {(clash or dup)[:5]} "
                f"{'are already indexed' if clash else 'repeat'}. Give each scan its own id."
            )
        if not scans:
            return 0
        images = [None] * len(scans) if images is None else list(images)
        scored = ~np.isnan(array).any(axis=2)  # (N_scans, N_organs)
        s_idx, o_idx = np.nonzero(scored)
        vectors = array[s_idx, o_idx]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise InputError("an embedding row is all zeros and has no direction. Index scored organs only.")
        vectors = np.ascontiguousarray(vectors / norms, dtype=np.float32)
        table = pd.DataFrame({
            "scan": [scans[i] for i in s_idx], "organ": [organs[o] for o in o_idx],
            "image": [images[i] or "" for i in s_idx],
        })
        from safetensors.numpy import save

        shard = f"shard-{len(self._manifest['shards']):05d}"
        atomic_write_bytes(self.folder / f"{shard}.safetensors", save({_TENSOR: vectors}))
        atomic_write_text(self.folder / f"{shard}.csv", table.to_csv(index=False))
        self._manifest["shards"].append(shard)
        self._cache = None
        if self.approximate:
            from .approximate import rebuild

            rebuild(self, sorted(set(table["organ"])))
        self._commit()
        logger.info("indexed %d rows of %d scans in %s (%s)", len(table), len(scans), self.folder, shard)
        return len(table)

    def set_approximate(self, on: bool = True) -> None:
        """Keep an approximate index of every organ from now on (built now), or stop keeping it."""
        self._manifest["approximate"] = bool(on)
        if on:
            from .approximate import rebuild

            rebuild(self, list(self.organs))
        self._commit()

    def _commit(self) -> None:
        atomic_write_text(self.folder / _MANIFEST, json.dumps(self._manifest, indent=1) + "\n")
