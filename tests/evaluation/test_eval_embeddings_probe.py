"""The embedding file (writer and reader) and the linear probe."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visd.errors import InputError
from visd.evaluation import linear_probe, load_embeddings, save_embeddings


def test_roundtrip_exact_with_nan_rows(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 3, 4)).astype(np.float32)
    emb[2, 1] = np.nan
    path = save_embeddings(tmp_path / "sub" / "e.safetensors", emb, [f"s{i}" for i in range(5)], ["lung", "heart", "aorta"])
    got = load_embeddings(path)
    np.testing.assert_array_equal(got.embeddings, emb)  # NaN rows included
    assert got.scans == tuple(f"s{i}" for i in range(5)) and got.organs == ("lung", "heart", "aorta")
    np.testing.assert_array_equal(got.organ("aorta"), emb[:, 2])
    with pytest.raises(InputError, match="Did you mean 'heart'"):
        got.organ("hart")


def test_writer_accepts_torch_and_casts_to_float32(tmp_path):
    import torch

    t = torch.arange(12, dtype=torch.float64).reshape(2, 2, 3)
    got = load_embeddings(save_embeddings(tmp_path / "e.safetensors", t, ["a", "b"], ["lung", "heart"]))
    assert got.embeddings.dtype == np.float32
    np.testing.assert_array_equal(got.embeddings, t.numpy().astype(np.float32))


@pytest.mark.parametrize(
    "shape, scans, organs, match",
    [((2, 3), ["a", "b"], ["x"], "3 axes"),
     ((2, 1, 4), ["a"], ["x"], "do not fit"),
     ((2, 1, 4), ["a", "a"], ["x"], "distinct")],
)
def test_writer_validates(tmp_path, shape, scans, organs, match):
    with pytest.raises(InputError, match=match):
        save_embeddings(tmp_path / "e.safetensors", np.zeros(shape), scans, organs)
    assert not (tmp_path / "e.safetensors").exists()


def test_reader_validates(tmp_path):
    arr = np.zeros((2, 1, 3), np.float32)
    save_file({"embeddings": arr}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(InputError, match="lacks the metadata entry 'scans'"):
        load_embeddings(tmp_path / "nometa.safetensors")
    save_file({"features": arr}, str(tmp_path / "name.safetensors"), metadata={"scans": "[]", "organs": "[]"})
    with pytest.raises(InputError, match="no tensor 'embeddings'"):
        load_embeddings(tmp_path / "name.safetensors")
    save_file({"embeddings": arr}, str(tmp_path / "n.safetensors"),
              metadata={"scans": json.dumps(["a", "b", "c"]), "organs": json.dumps(["lung"])})
    with pytest.raises(InputError, match="do not fit 3 scan ids"):
        load_embeddings(tmp_path / "n.safetensors")
    # A file written without the optional format key (by hand, per the spec) is accepted.
    save_file({"embeddings": arr}, str(tmp_path / "ok.safetensors"),
              metadata={"scans": json.dumps(["a", "b"]), "organs": json.dumps(["lung"])})
    assert load_embeddings(tmp_path / "ok.safetensors").scans == ("a", "b")


def _probe_data(rng, n=160, d=6):
    scans = [f"train_{i}_a_1" for i in range(n)]
    y_heart = (rng.random(n) < 0.35).astype(int)
    y_lung = (rng.random(n) < 0.35).astype(int)
    emb = rng.normal(size=(n, 2, d)).astype(np.float32)  # organs: lung, heart
    emb[:, 1, 0] += 3.0 * y_heart  # only the heart embedding knows Cardiomegaly
    emb[:10, 0] = np.nan  # lung not scored in 10 scans
    labels = pd.DataFrame({"VolumeName": [s + ".nii.gz" for s in scans], "Cardiomegaly": y_heart,
                           "Emphysema": y_lung, "Medical material": 0})
    return emb, scans, labels


def test_probe_matches_sklearn_and_routes_by_organ(tmp_path, rng):
    emb, scans, labels = _probe_data(rng)
    path = save_embeddings(tmp_path / "e.safetensors", emb, scans, ["lung", "heart"])
    table = linear_probe(path, labels, n_splits=4, seed=3)
    assert list(table.index) == ["Cardiomegaly", "Emphysema"]  # "Medical material" has no organ
    assert table.loc["Cardiomegaly", "organ"] == "heart"
    assert table.loc["Cardiomegaly", "auc_mean"] > 0.95
    assert table.loc["Emphysema", "auc_mean"] < 0.75  # noise only
    assert table.loc["Emphysema", "n_scans"] == 150  # NaN lung rows dropped
    # Reference: the same pipeline through sklearn's own cross-validation.
    y = labels["Cardiomegaly"].to_numpy()
    ref = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)),
        emb[:, 1].astype(np.float64), y, scoring="roc_auc",
        cv=StratifiedKFold(n_splits=4, shuffle=True, random_state=3),
    )
    assert table.loc["Cardiomegaly", "auc_mean"] == pytest.approx(ref.mean(), abs=1e-12)
    assert table.loc["Cardiomegaly", "auc_std"] == pytest.approx(ref.std(), abs=1e-12)
    assert table.loc["Cardiomegaly", "n_folds"] == 4


def test_probe_organ_of_override_and_errors(tmp_path, rng):
    emb, scans, labels = _probe_data(rng)
    path = save_embeddings(tmp_path / "e.safetensors", emb, scans, ["lung", "heart"])
    moved = linear_probe(path, labels, organ_of={"Cardiomegaly": "lung"}, findings=["Cardiomegaly"])
    assert moved.loc["Cardiomegaly", "auc_mean"] < 0.75  # the lung embedding carries no signal
    with pytest.raises(InputError, match="Did you mean 'heart'"):
        linear_probe(path, labels, organ_of={"Cardiomegaly": "hearts"})
    with pytest.raises(InputError, match="have no organ"):
        linear_probe(path, labels, findings=["Medical material"])
    few = labels.assign(Cardiomegaly=0)
    few.loc[:2, "Cardiomegaly"] = 1
    t = linear_probe(path, few, findings=["Cardiomegaly"], n_splits=5)
    assert np.isnan(t.loc["Cardiomegaly", "auc_mean"]) and "fewer scans than folds" in t.loc["Cardiomegaly", "reason"]
