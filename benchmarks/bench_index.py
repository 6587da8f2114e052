"""Approximate nearest-neighbour libraries against exact cosine search on synthetic organ embeddings.

For each library (faiss-cpu HNSW, hnswlib, usearch) and each size: build time, query latency (one query
at a time, as ``visd search`` asks), recall@10 against the exact top 10 of a numpy brute force. Data:
``--rows`` unit vectors of dimension ``--dim`` (the released model's 256), drawn around 64 centres so
that neighbours exist, as organ embeddings cluster by finding; queries are held-out points of the
same mixture. One thread per library (the machine is shared), so the figures compare the libraries,
not the hardware::

    python benchmarks/bench_index.py --rows 10000 100000 --record
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import peak_rss_gb, record, reset_peak_rss  # noqa: E402

M, EF_CONSTRUCTION, EF_SEARCH = 16, 128, 64  # one HNSW setting for all three libraries (--m, --ef-search)


def synthetic(rows: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, rows + queries)] + 0.9 * rng.standard_normal((rows + queries, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:rows], x[rows:]


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ data.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


def _faiss(data):
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(data.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.add(data)
    index.hnsw.efSearch = EF_SEARCH
    return lambda q, k: index.search(q[None], k)[1][0]


def _hnswlib(data):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=len(data), M=M, ef_construction=EF_CONSTRUCTION)
    index.add_items(data, np.arange(len(data)), num_threads=1)
    index.set_ef(EF_SEARCH)
    return lambda q, k: index.knn_query(q[None], k, num_threads=1)[0][0]


def _usearch(data):
    from usearch.index import Index

    index = Index(ndim=data.shape[1], metric="ip", dtype="f32", connectivity=M,
                  expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
    index.add(np.arange(len(data)), data, threads=1)
    return lambda q, k: index.search(q, k, threads=1).keys


LIBRARIES = {"faiss": ("faiss", _faiss), "hnswlib": ("hnswlib", _hnswlib), "usearch": ("usearch", _usearch)}


def main() -> None:
    global M, EF_SEARCH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    p.add_argument("--record", action="store_true", help="append the rows to benchmarks/README.md")
    p.add_argument("--conditions", default="", help="what else ran on the machine, for the row (e.g. 'under load from other jobs')")
    p.add_argument("--m", type=int, default=M, help="HNSW graph degree (visd ships 32)")
    p.add_argument("--ef-search", type=int, default=EF_SEARCH, help="HNSW search breadth (visd ships 128)")
    args = p.parse_args()
    M, EF_SEARCH = args.m, args.ef_search
    command = "python benchmarks/bench_index.py " + " ".join(sys.argv[1:])
    for rows in args.rows:
        data, queries = synthetic(rows, args.dim, args.queries)
        truth = exact_top(data, queries, 10)
        t0 = time.perf_counter()
        for q in queries:
            exact_top(data, q[None], 10)
        exact_ms = 1000 * (time.perf_counter() - t0) / len(queries)
        print(f"{rows} rows x {args.dim}: exact numpy {exact_ms:.2f} ms/query")
        for name in args.libraries:
            module, build = LIBRARIES[name]
            version = importlib.metadata.version({"faiss": "faiss-cpu"}.get(module, module))
            reset_peak_rss()
            t0 = time.perf_counter()
            query = build(data)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            found = [np.asarray(query(q, 10)) for q in queries]
            query_ms = 1000 * (time.perf_counter() - t0) / len(queries)
            recall = np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)])
            note = (f"build {build_s:.2f} s, query {query_ms:.3f} ms, recall@10 {recall:.3f}; exact numpy "
                    f"{exact_ms:.2f} ms/query; HNSW M={M} efC={EF_CONSTRUCTION} ef={EF_SEARCH}, 1 thread"
                    + (f"; {args.conditions}" if args.conditions else ""))
            print(f"  {name} {version}: {note}")
            if args.record:
                record(f"ANN index {rows} x {args.dim} synthetic", f"{name} {version}", build_s, peak_rss_gb(),
                       note, command)


if __name__ == "__main__":
    main()
