"""diagnose(journal=, resume=): an interrupted run resumes to the report of an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from visd.errors import InputError
from visd.zero_shot import diagnose
from visd.zero_shot.journal import JOURNAL_FORMAT

from .conftest import CT, CT_LPS, SEG, SEG_LPS


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Four scans: the abdomen CT, its LPS copy, a missing file, a renamed copy of the CT."""
    folder = tmp_path_factory.mktemp("journal_batch")
    copy = shutil.copy(CT, folder / "copy.nii.gz")
    return [CT, CT_LPS, folder / "missing.nii.gz", copy], [SEG, SEG_LPS, SEG, SEG]


def _run(model, batch, out, **kwargs):
    inputs, masks = batch
    return diagnose(inputs, masks, model, anomaly_maps_dir=out / "maps", embeddings_path=out / "emb.safetensors",
                    progress=False, **kwargs)


def _counting(model, monkeypatch, crash_at=None):
    """Count the model's zero_shot_classify calls; raise at call ``crash_at`` (a simulated power cut)."""
    calls = []
    real = model.zero_shot_classify

    def classify(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "zero_shot_classify", classify)
    return calls


def _same_report(a, b):
    assert a.scans == b.scans and a.failed == b.failed
    pa, pb = a.to_pandas(), b.to_pandas()
    assert pa.drop(columns="probability").equals(pb.drop(columns="probability"))
    np.testing.assert_array_equal(pa.probability.to_numpy(), pb.probability.to_numpy())
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert sorted(a.anomaly_maps) == sorted(b.anomaly_maps)


def test_interrupted_run_resumes_to_the_same_report(model, batch, tmp_path, monkeypatch):
    reference = _run(model, batch, tmp_path / "reference")
    journal = tmp_path / "run.journal"
    with monkeypatch.context() as m:
        _counting(model, m, crash_at=2)
        with pytest.raises(RuntimeError, match="power cut"):
            _run(model, batch, tmp_path / "run", journal=journal)
    lines = journal.read_text().splitlines()
    assert json.loads(lines[0])["format"] == JOURNAL_FORMAT and len(lines) == 2  # the first scan only
    with journal.open("a") as f:
        f.write('{"scan": "ct_lps", "sou')  # a line a crash cut off
    calls = _counting(model, monkeypatch)
    resumed = _run(model, batch, tmp_path / "run", journal=journal, resume=True, num_workers=1)
    assert resumed.resumed == ["abdomen_3mm"] and len(calls) == 2  # the LPS copy and the renamed copy
    _same_report(resumed, reference)
    assert all(p.is_file() for paths in resumed.anomaly_maps.values() for p in paths)
    assert [json.loads(line)["scan"] for line in journal.read_text().splitlines()[1:]] == [
        "abdomen_3mm", "ct_lps", "copy"]  # the cut-off line is gone; the bad scan is not journaled

    calls.clear()
    again = _run(model, batch, tmp_path / "run", journal=journal, resume=True)
    assert again.resumed == ["abdomen_3mm", "ct_lps", "copy"] and calls == []
    _same_report(again, reference)
    fresh = _run(model, batch, tmp_path / "run", journal=journal)  # without resume: starts over
    assert fresh.resumed == [] and len(calls) == 3
    _same_report(fresh, reference)


def test_a_scan_is_recomputed_when_its_source_or_maps_changed(model, batch, tmp_path, monkeypatch):
    inputs, masks = batch
    journal = tmp_path / "run.journal"
    _run(model, batch, tmp_path / "run", journal=journal)
    (tmp_path / "run" / "maps" / "copy_anomaly.png").unlink()
    moved = shutil.copy(CT_LPS, tmp_path / "moved.nii.gz")
    calls = _counting(model, monkeypatch)
    report = _run(model, ([inputs[0], moved, inputs[2], inputs[3]], masks), tmp_path / "run",
                  journal=journal, resume=True, scan_ids=["abdomen_3mm", "ct_lps", "missing", "copy"])
    assert report.resumed == ["abdomen_3mm"] and len(calls) == 2


def test_a_journal_of_another_setup_is_refused_and_kept(model, batch, tmp_path):
    journal = tmp_path / "run.journal"
    _run(model, batch, tmp_path / "run", journal=journal)
    before = journal.read_bytes()
    inputs, masks = batch
    other = [("lung", "Emphysema", "No emphysema.", "Emphysema.")]
    with pytest.raises(InputError, match="another model, findings, mask format or outputs"):
        diagnose(inputs, masks, model, findings=other, journal=journal, resume=True, progress=False)
    with pytest.raises(InputError, match="another model"):  # no embeddings file this time
        diagnose(inputs, masks, model, anomaly_maps_dir=tmp_path / "run" / "maps", journal=journal, resume=True,
                 progress=False)
    assert journal.read_bytes() == before
    (tmp_path / "not.journal").write_text("scan,organ\n")
    with pytest.raises(InputError, match="is not a visd diagnose journal"):
        diagnose(inputs, masks, model, journal=tmp_path / "not.journal", resume=True, progress=False)
    with pytest.raises(InputError, match="resume=True needs the journal"):
        diagnose(inputs, masks, model, resume=True, progress=False)


def test_a_run_that_diagnosed_no_scan_leaves_no_journal(model, batch, tmp_path, monkeypatch):
    """Stopped before its first scan finished, or every scan skipped: nothing asks for resume next time."""
    from visd.zero_shot.journal import holds_scans

    journal = tmp_path / "run.journal"
    with monkeypatch.context() as m:
        _counting(model, m, crash_at=1)
        with pytest.raises(RuntimeError, match="power cut"):
            _run(model, batch, tmp_path / "run", journal=journal)
    assert not journal.exists()
    inputs, masks = batch
    report = diagnose([inputs[2]], [masks[2]], model, journal=journal, progress=False)  # the missing file only
    assert len(report.failed) == 1 and not journal.exists()
    _run(model, batch, tmp_path / "run", journal=journal)
    assert holds_scans(journal)  # a run that diagnosed scans keeps them for resume
