"""Index + search on the real scans with the tiny model, against numpy brute force over the files on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file

from visd.errors import InputError
from visd.evaluation import save_embeddings
from visd.retrieval import ScanIndex, index_embeddings, index_scans, search

from .conftest import CT, CT_LPS, SEG, SEG_LPS, synthetic_embeddings


@pytest.fixture(scope="module")
def archive(tmp_path_factory, model_dir, model):
    """The two real scans (and a missing one) indexed with the model, then 30 synthetic scans appended."""
    out = tmp_path_factory.mktemp("archive") / "index"
    missing = CT.parent / "no_such_scan.nii.gz"
    index, failed = index_scans([CT, missing, CT_LPS], [SEG, SEG, SEG_LPS], model_dir, out, progress=False)
    assert [s for s, _ in failed] == ["no_such_scan"] and "not found" in failed[0][1]
    emb = synthetic_embeddings(30, model.organs, model.config.embed_dim)
    path = save_embeddings(out.parent / "synthetic.safetensors", emb, [f"syn{i}" for i in range(30)], model.organs)
    index_embeddings(path, out)
    return out


def brute_force(folder, organ: str, q: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Scan ids by decreasing cosine, read with safetensors + pandas only (the documented format)."""
    import json

    shards = json.loads((folder / "index.json").read_text())["shards"]
    rows = pd.concat([pd.read_csv(folder / f"{s}.csv") for s in shards], ignore_index=True)
    vectors = np.concatenate([load_file(str(folder / f"{s}.safetensors"))["embeddings"] for s in shards])
    keep = (rows["organ"] == organ).to_numpy()
    v = vectors[keep].astype(np.float64)
    scores = v @ (q / np.linalg.norm(q)) / np.linalg.norm(v, axis=1)
    order = np.argsort(-scores, kind="stable")
    return rows["scan"][keep].to_numpy()[order].tolist(), scores[order]


def test_index_holds_the_scored_organs_of_each_scan(archive, model):
    index = ScanIndex.open(archive)
    rows = index.rows()
    real = rows[rows["scan"].isin(["abdomen_3mm", "ct_lps"])]
    assert sorted(map(tuple, real[["scan", "organ"]].to_numpy())) == [
        ("abdomen_3mm", "aorta"), ("abdomen_3mm", "lung"), ("ct_lps", "aorta"), ("ct_lps", "lung")
    ]
    assert real["image"].str.endswith(".nii.gz").all()
    assert index.model.endswith("visd-tiny")
    _, vectors = index.vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert len(rows) == 4 + int((~np.isnan(synthetic_embeddings(30, model.organs, 32)).any(axis=2)).sum())


def test_scan_query_finds_itself_and_equals_brute_force(archive, model):
    from visd.data import load_case

    table = search(archive, scan=CT, mask=SEG, organ="lung", top=50)
    assert table.loc[0, "scan"] == "abdomen_3mm" and table.loc[0, "score"] == pytest.approx(1.0, abs=1e-5)
    case = load_case(CT, SEG, model.config)
    with torch.no_grad():
        q = model.encode_image(case.image, case.mask, organs=["lung"])["lung"].numpy()
    scans, scores = brute_force(archive, "lung", q)
    assert table["scan"].tolist() == scans
    np.testing.assert_allclose(table["score"].to_numpy(), scores, rtol=1e-5, atol=1e-6)
    assert table["rank"].tolist() == list(range(1, len(scans) + 1))


def test_text_query_equals_brute_force(archive, model):
    table = search(archive, text="pleural effusion", organ="aorta", top=7)
    with torch.no_grad():
        q = model.encode_text(["pleural effusion"])[0].numpy()
    scans, scores = brute_force(archive, "aorta", q)
    assert table["scan"].tolist() == scans[:7] and (table["organ"] == "aorta").all()
    np.testing.assert_allclose(table["score"].to_numpy(), scores[:7], rtol=1e-5, atol=1e-6)


def test_finding_query_scores_are_the_diagnosis_probabilities(archive, model):
    from visd.data import load_case

    table = search(archive, finding="Emphysema", top=100).set_index("scan")
    for ct, seg, scan in ((CT, SEG, "abdomen_3mm"), (CT_LPS, SEG_LPS, "ct_lps")):
        case = load_case(ct, seg, model.config)
        expected = next(s.probability for s in model.zero_shot_classify(case.image, case.mask).scores
                        if s.finding == "Emphysema")
        assert table.loc[scan, "score"] == pytest.approx(expected, rel=1e-5)
    assert (table["organ"] == "lung").all() and table["score"].is_monotonic_decreasing


def test_append_refuses_known_scans_and_a_stray_shard_changes_nothing(archive, model, tmp_path):
    index = ScanIndex.open(archive)
    before = len(index)
    emb = synthetic_embeddings(2, model.organs, 32, seed=5)
    with pytest.raises(InputError, match="already indexed"):
        index.add(emb, ["syn3", "new"])
    (archive / f"shard-{len(index._manifest['shards']):05d}.csv").write_text("junk from a crashed append\n")
    assert len(ScanIndex.open(archive)) == before


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(text="effusion"), "needs an organ"),
        (dict(text="effusion", organ="lungs"), "Did you mean 'lung'"),
        (dict(text="x", finding="Emphysema"), "exactly one query"),
        (dict(finding="Emphysma"), "Did you mean 'Emphysema'"),
        (dict(finding="Emphysema", organ="heart"), "belongs to organ 'lung'"),
        (dict(scan=CT, organ="lung"), "needs its organ mask"),
        (dict(scan=CT, mask=SEG, organ="heart"), "organ_absent"),
        (dict(text="x", organ="lung", top=0), "top must be"),
        (dict(text="x", organ="lung", approximate=True), "visd index --approximate"),
    ],
)
def test_bad_queries(archive, kwargs, words):
    with pytest.raises(InputError, match=words):
        search(archive, **kwargs)
