"""``visd diagnose``: a batch with every kind of bad case finishes the good ones and exits 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tests.data_io._helpers import write_dicom_series
from visd.cli import main
from visd.evaluation import load_embeddings

from .conftest import CT, SEG

# case -> the words its error must contain
EXPECTED_ERRORS = {
    "missing": ["CT file not found", "missing.nii.gz"],
    "wrong_ext.txt": ["unsupported CT file type", "wrong_ext.txt"],
    "truncated": ["truncated", "truncated.nii.gz"],
    "flat2d": ["2D image", "(64, 64)"],
    "series4d": ["4D image", "(16, 16, 8, 3)"],
    "mr_series": ["Modality 'MR'", "Expected 'CT'"],
    "nan_voxels": ["non-finite (NaN/inf) voxels", "(5, 5, 5)"],
    "other_shape": ["differ in shape", "(60, 50, 30)"],
    "unknown_labels": ["labels [200]"],
    "empty_mask": ["organ mask", "is empty"],
    "gap_series": ["has a gap", "slice(s) missing"],
}


def _visd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "visd.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def _write_cases(folder):
    """Each bad case of EXPECTED_ERRORS plus the good scan; returns the manifest rows (image, mask)."""
    cases = folder / "cases"
    cases.mkdir()
    ct = nib.load(CT)
    hu, affine = np.asarray(ct.dataobj), ct.affine
    rows = [("cases/missing.nii.gz", SEG)]
    (cases / "wrong_ext.txt").write_text("not an image\n")
    rows.append(("cases/wrong_ext.txt", SEG))
    raw = CT.read_bytes()
    (cases / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    rows.append(("cases/truncated.nii.gz", SEG))
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), cases / "flat2d.nii.gz")
    rows.append(("cases/flat2d.nii.gz", SEG))
    rows.append((CT, SEG))  # the good case, between bad ones
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.int16), np.eye(4)), cases / "series4d.nii.gz")
    rows.append(("cases/series4d.nii.gz", SEG))
    write_dicom_series(hu[:, :, :4].astype(np.float64), affine, cases / "mr_series", modality="MR")
    rows.append(("cases/mr_series", SEG))
    with_nan = hu.astype(np.float32)
    with_nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(with_nan, affine), cases / "nan_voxels.nii.gz")
    rows.append(("cases/nan_voxels.nii.gz", SEG))
    for name, mask in (
        ("other_shape", np.ones((60, 50, 30), np.uint8)),
        ("unknown_labels", np.where(np.indices(hu.shape)[0] < 40, 200, 0).astype(np.uint8)),
        ("empty_mask", np.zeros(hu.shape, np.uint8)),
    ):
        shutil.copy(CT, cases / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), cases / f"{name}_mask.nii.gz")
        rows.append((f"cases/{name}.nii.gz", f"cases/{name}_mask.nii.gz"))
    paths = write_dicom_series(hu.astype(np.float64), affine, cases / "gap_series")
    paths[len(paths) // 2].unlink()
    rows.append(("cases/gap_series", SEG))
    return rows


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    rows = _write_cases(folder)
    (folder / "cases.csv").write_text("image,mask\n" + "".join(f"{i},{m}\n" for i, m in rows))
    return folder / "cases.csv"


def _run_batch(manifest, model_dir, out, *extra):
    return _visd(
        "diagnose", "--manifest", manifest, "--model", model_dir, "--out", out / "results.csv",
        "--json", out / "results.json", "--embeddings", out / "emb.safetensors", "--anomaly-maps", out / "maps", *extra,
    )


@pytest.fixture(scope="module")
def batch(manifest, model_dir):
    out = manifest.parent / "out"
    return _run_batch(manifest, model_dir, out), out


def test_exit_code_1_and_the_good_case_finishes(batch, reference):
    proc, out = batch
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    df = pd.read_csv(out / "results.csv")
    assert list(dict.fromkeys(df.scan)) == [*list(EXPECTED_ERRORS)[:4], "abdomen_3mm", *list(EXPECTED_ERRORS)[4:]]
    good = df[df.scan == "abdomen_3mm"]
    assert list(good.status) == [s.status for s in reference.scores]
    np.testing.assert_allclose(good.probability, [s.probability for s in reference.scores], atol=1e-5)
    assert f"diagnosed 12 scan(s): 1 ok, 11 failed; numerics fused (asked for); wrote {out / 'results.csv'}" in proc.stdout


def test_each_bad_case_names_its_problem_in_the_table_and_one_stderr_line(batch):
    proc, out = batch
    df = pd.read_csv(out / "results.csv")
    messages = [line.split("\r")[-1] for line in proc.stderr.split("\n")]
    skipped = [m for m in messages if "skipped scan" in m]
    assert len(skipped) == len(EXPECTED_ERRORS), proc.stderr
    for scan, words in EXPECTED_ERRORS.items():
        rows = df[df.scan == scan]
        assert len(rows) == 16 and rows.probability.isna().all(), scan
        (status,) = set(rows.status)
        assert status.startswith("error: ") and all(w in status for w in words), (scan, status)
        (line,) = [m for m in skipped if f"skipped scan {scan!r}:" in m]
        assert line.endswith(status[len("error: "):]), (line, status)


def test_json_embeddings_and_maps_of_the_batch(batch):
    _, out = batch
    data = json.loads((out / "results.json").read_text())
    assert [f["scan"] for f in data["failed"]] == list(EXPECTED_ERRORS)
    emb = load_embeddings(out / "emb.safetensors")
    good = emb.scans.index("abdomen_3mm")
    assert np.isnan(np.delete(emb.embeddings, good, axis=0)).all()
    assert np.isfinite(emb.organ("lung")[good]).all()
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["abdomen_3mm_anomaly.nii.gz", "abdomen_3mm_anomaly.png"]


def test_worker_processes_give_the_same_tables_files_and_messages(batch, manifest, model_dir):
    proc, out = batch
    out2 = manifest.parent / "out_workers"
    proc2 = _run_batch(manifest, model_dir, out2, "--workers", "2")
    assert proc2.returncode == 1 and "Traceback" not in proc2.stderr, proc2.stderr
    assert (out2 / "results.csv").read_text() == (out / "results.csv").read_text()
    assert json.loads((out2 / "results.json").read_text()) == json.loads((out / "results.json").read_text())
    np.testing.assert_array_equal(load_embeddings(out2 / "emb.safetensors").embeddings,
                                  load_embeddings(out / "emb.safetensors").embeddings)
    skipped = [sorted(m.split("\r")[-1] for m in p.stderr.split("\n") if "skipped scan" in m) for p in (proc, proc2)]
    assert skipped[0] == skipped[1] and len(skipped[0]) == len(EXPECTED_ERRORS)
    maps = [nib.load(o / "maps" / "abdomen_3mm_anomaly.nii.gz").get_fdata() for o in (out, out2)]
    np.testing.assert_array_equal(maps[0], maps[1])


def test_resume_takes_the_finished_scans_from_the_journal(tmp_path, model, model_dir):
    from visd.zero_shot import diagnose

    from .conftest import CT_LPS, SEG_LPS

    out = tmp_path / "r.csv"
    journal = tmp_path / "r.csv.journal"
    args = ["diagnose", CT, CT_LPS, "--mask", SEG, "--mask", SEG_LPS, "--model", model_dir, "--out", out, "--no-progress"]
    proc = _visd(*args, "--resume")
    assert proc.returncode == 2 and f"no journal of an interrupted run at {journal}" in proc.stderr
    diagnose([CT], [SEG], model, journal=journal, progress=False)  # as a run that stopped after the first scan
    proc = _visd(*args)
    assert proc.returncode == 2 and "holds the scans of an interrupted run. Pass --resume" in proc.stderr
    proc = _visd(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "diagnosed 2 scan(s): 2 ok (1 taken from the journal), 0 failed" in proc.stdout
    assert not journal.exists()  # removed once every output is written
    resumed = pd.read_csv(out)
    proc = _visd(*args)
    assert proc.returncode == 0 and "taken from the journal" not in proc.stdout and not journal.exists()
    fresh = pd.read_csv(out)
    assert resumed[["scan", "finding", "status"]].equals(fresh[["scan", "finding", "status"]])
    np.testing.assert_allclose(resumed.probability, fresh.probability, atol=1e-6)


def test_a_killed_run_resumes(tmp_path, model_dir):
    """SIGKILL once the journal holds a scan, then --resume: the table of an uninterrupted run."""
    import signal
    import time

    scans = [shutil.copy(CT, tmp_path / f"scan{i}.nii.gz") for i in range(8)]
    out = tmp_path / "r.csv"
    journal = tmp_path / "r.csv.journal"
    args = ["diagnose", *scans, *[a for _ in scans for a in ("--mask", SEG)], "--model", model_dir, "--out", out,
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "visd.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = journal.read_text().count("\n") - 1
    assert 1 <= done < len(scans) and not out.exists()
    resumed = _visd(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    taken = int(resumed.stdout.split("ok (")[1].split()[0])
    assert done <= taken < len(scans)  # a scan journaled between the count and the kill is taken too
    table = pd.read_csv(out)
    fresh = _visd(*args)
    assert fresh.returncode == 0 and pd.read_csv(out).equals(table)


def test_unreadable_model_folder_aborts_with_exit_code_2(tmp_path, model_dir):
    bad = tmp_path / "broken-model"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_text("{not json")
    proc = _visd("diagnose", CT, "--mask", SEG, "--model", bad, "--out", tmp_path / "r.csv", "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("visd diagnose: error: cannot read model config")
    assert str(bad / "config.json") in proc.stderr and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["a.nii.gz", "b.nii.gz", "--mask", "m.nii.gz"], "got 2 INPUT(s) but 1 --mask"),
        (["a.nii.gz"], "no organ mask for some scans"),
        ([], "no scans given"),
        (["a.nii.gz", "--mask", "m.nii.gz", "--manifest", "cases.csv"], "either --manifest or INPUT"),
        (["--manifest", "nowhere.csv"], "manifest not found"),
        (["a.nii.gz", "--mask", "m.nii.gz", "--workers", "-1"], "--workers must be 0 or more"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, expected, tmp_path, capsys):
    code = main(["diagnose", *args, "--model", str(tmp_path), "--out", str(tmp_path / "r.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_bad_manifest_columns(tmp_path, capsys):
    (tmp_path / "cases.csv").write_text("images,mask\nct.nii.gz,m.nii.gz\n")
    code = main(["diagnose", "--manifest", str(tmp_path / "cases.csv"), "--model", "x", "--out", "r.csv"])
    err = capsys.readouterr().err
    assert code == 2 and "no 'image' column" in err and "Is 'images' the image column?" in err


def test_registering_the_command_is_cheap_and_the_api_resolves():
    code = ("import sys, visd.zero_shot, visd.zero_shot.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert all(getattr(visd.zero_shot, n) is not None for n in visd.zero_shot.__all__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
