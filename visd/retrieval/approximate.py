"""The approximate index: one FAISS HNSW graph per organ, kept next to the shards, for millions of rows.

Why FAISS (``pip install "visd[ann]"``, the ``faiss-cpu`` wheel): on synthetic 256-d organ embeddings
(``benchmarks/bench_index.py``, 2-core shared CPU, one thread, same HNSW settings for all) FAISS,
hnswlib and usearch reached the same recall@10 (1.00 at 10^4 rows, 0.95 at 10^5) at comparable query
times, FAISS built the graph fastest at 10^5 rows; it is maintained by Meta with wheels for every
Python (one abi3 wheel), where hnswlib's last release (0.8.0, 2023) had to be compiled here, and it is
what the field's retrieval code uses. The figures are in ``docs/retrieval.md``.

Files: ``ann-<organ>.faiss`` (``faiss.write_index``; FAISS's own binary format, no pickle). Graph node
``i`` is row ``i`` of :meth:`ScanIndex.vectors` for that organ; rows are only ever appended, so an
append adds the new rows to the graph instead of rebuilding it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from visd._io import atomic_path
from visd.errors import InputError, MissingDependencyError

__all__ = ["EF_SEARCH", "M", "nearest", "rebuild"]

logger = logging.getLogger(__name__)

M = 32
"""Graph degree (FAISS ``IndexHNSWFlat(d, M)``)."""
EF_CONSTRUCTION = 128
EF_SEARCH = 128
"""Candidates kept while searching (at least ``top``); larger is slower and closer to exact."""


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise MissingDependencyError(
            "the approximate index needs FAISS, which is not installed. Install it with "
            "pip install \"visd[ann]\" (the faiss-cpu wheel), or search without --approximate (exact)."
        ) from e
    return faiss


def _path(index, organ: str) -> Path:
    return Path(index.folder) / f"ann-{re.sub(r'[^A-Za-z0-9_.-]', '_', organ)}.faiss"


def _read(index, organ: str):
    faiss = _faiss()
    path = _path(index, organ)
    return faiss.read_index(str(path)) if path.is_file() else None


def rebuild(index, organs: Sequence[str]) -> None:
    """Bring the graphs of ``organs`` up to date with the index's rows (add new rows; rebuild if needed)."""
    faiss = _faiss()
    for organ in organs:
        _, vectors = index.vectors(organ)
        graph = _read(index, organ)
        if graph is not None and graph.ntotal > len(vectors):  # left by an append that did not commit
            graph = None
        if graph is None:
            graph = faiss.IndexHNSWFlat(index.dim, M, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = EF_CONSTRUCTION
        if graph.ntotal == len(vectors):
            continue
        graph.add(np.ascontiguousarray(vectors[graph.ntotal:], dtype=np.float32))
        with atomic_path(_path(index, organ)) as tmp:
            faiss.write_index(graph, str(tmp))
        logger.info("approximate index of %r: %d rows", organ, graph.ntotal)


def nearest(index, organ: str, query: np.ndarray, top: int, ef: int = EF_SEARCH) -> np.ndarray:
    """Row positions (in :meth:`ScanIndex.vectors` order) of the approximately ``top`` largest inner products."""
    _, vectors = index.vectors(organ)
    graph = _read(index, organ) if index.approximate else None
    if graph is None or graph.ntotal != len(vectors):
        raise InputError(
            f"the index in {index.folder} has no up-to-date approximate index of organ {organ!r}. Build it with "
            f"`visd index --approximate --out {index.folder}` (no new scans needed), or search without --approximate."
        )
    graph.hnsw.efSearch = max(ef, top)
    _, found = graph.search(np.ascontiguousarray(query[None], dtype=np.float32), min(top, len(vectors)))
    return found[0][found[0] >= 0]
