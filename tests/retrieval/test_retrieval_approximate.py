"""The FAISS HNSW index: recall against exact search on synthetic rows, kept up to date on append."""

from __future__ import annotations

import faiss  # noqa: F401  (the extra visd[ann]; the test extra installs it: a missing one fails here)
import numpy as np
import pytest

from visd.errors import InputError
from visd.retrieval import ScanIndex
from visd.retrieval.approximate import nearest

ORGANS = ("lung", "heart")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_at_10_against_exact_search_and_append(tmp_path):
    dim, n = 32, 3000
    index = ScanIndex.create(tmp_path / "ann", ORGANS, dim, approximate=True)
    data = clustered(2 * n, dim, seed=0).reshape(n, 2, dim)
    index.add(data[: n // 2], [f"s{i}" for i in range(n // 2)])
    index.add(data[n // 2:], [f"s{i}" for i in range(n // 2, n)])  # appended to the graph, not rebuilt
    index = ScanIndex.open(tmp_path / "ann")
    rows, vectors = index.vectors("heart")
    assert len(rows) == n
    queries = clustered(100, dim, seed=1)
    recalls = []
    for q in queries:
        exact = set(np.argsort(-(vectors @ q))[:10].tolist())
        found = nearest(index, "heart", q, 10)
        assert len(found) == 10
        recalls.append(len(exact & set(found.tolist())) / 10)
    assert np.mean(recalls) >= 0.95


def test_search_approximate_equals_exact_on_a_small_index(tmp_path, model_dir, model):
    from visd.retrieval import search

    index = ScanIndex.create(tmp_path / "small", model.organs, model.config.embed_dim, model=str(model_dir))
    rng = np.random.default_rng(3)
    index.add(rng.standard_normal((40, len(model.organs), model.config.embed_dim)), [f"s{i}" for i in range(40)])
    index.set_approximate(True)  # built over rows that were there before
    exact = search(index, text="emphysema", organ="lung", top=5)
    approx = search(index, text="emphysema", organ="lung", top=5, approximate=True)
    assert approx["scan"].tolist() == exact["scan"].tolist()
    np.testing.assert_allclose(approx["score"], exact["score"], rtol=1e-6)


def test_a_graph_left_by_an_uncommitted_append_is_rebuilt(tmp_path):
    import shutil

    data = clustered(60, 8, seed=2).reshape(30, 2, 8)
    big = ScanIndex.create(tmp_path / "big", ORGANS, 8, approximate=True)
    big.add(data[:20], [f"s{i}" for i in range(20)])
    small = ScanIndex.create(tmp_path / "small", ORGANS, 8, approximate=True)
    small.add(data[:10], [f"s{i}" for i in range(10)])
    shutil.copy(tmp_path / "big" / "ann-lung.faiss", tmp_path / "small" / "ann-lung.faiss")  # 20 nodes, 10 rows
    with pytest.raises(InputError, match="no up-to-date approximate index of organ 'lung'"):
        nearest(ScanIndex.open(tmp_path / "small"), "lung", data[0, 0], 3)
    small = ScanIndex.open(tmp_path / "small")
    small.add(data[20:25], [f"s{i}" for i in range(20, 25)])
    _, vectors = small.vectors("lung")
    for q in vectors[:5]:
        found = nearest(small, "lung", q, 3)
        assert found[0] == int(np.argmax(vectors @ q))
