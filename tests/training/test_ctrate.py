"""CT-RATE adapters and fVLM's organ-text rule, on small hand-written files with known answers."""

from __future__ import annotations

import json
import logging

import pytest

from visd.errors import InputError
from visd.training.ctrate import ctrate_records, read_labels, study_id, volume_path
from visd.training.manifest import read_manifest, write_manifest
from visd.training.reports import is_abnormal_text, normal_sentence, organ_text

ORGANS = ("lung", "heart", "esophagus", "aorta")


def test_fvlm_text_rule_known_answers():
    assert normal_sentence("lung") == "lung shows no significant abnormalities."
    # impression + findings, no space, each closed with a period
    assert organ_text("lung", "Emphysema", "Paraseptal emphysema in both lungs.") == (
        "Emphysema.Paraseptal emphysema in both lungs."
    )
    # no impression: normal sentence first, findings still appended
    assert organ_text("heart", None, "Heart size is normal") == (
        "heart shows no significant abnormalities.Heart size is normal."
    )
    assert organ_text("aorta", None, None) == "aorta shows no significant abnormalities."
    # quotes and parentheses removed
    assert organ_text("lung", "Nodule (8 mm) in the 'right' lobe", 'A "small" nodule.') == (
        "Nodule 8 mm in the right lobe.A small nodule."
    )
    # deviation from fVLM, documented: an empty impression counts as missing
    assert organ_text("lung", "  ", "") == "lung shows no significant abnormalities."
    assert is_abnormal_text("lung", "Emphysema.") and not is_abnormal_text("lung", organ_text("lung", None, "x"))


def test_study_id_and_layout(tmp_path):
    assert study_id("train_1_a_1.nii.gz") == "train_1_a"
    assert study_id("valid_123_b_2.nii.gz") == "valid_123_b"
    with pytest.raises(InputError, match="reconstruction number"):
        study_id("case.nii.gz")
    assert volume_path(tmp_path, "train_1_a_1.nii.gz") == tmp_path / "train_1" / "train_1_a" / "train_1_a_1.nii.gz"
    assert volume_path(tmp_path, "train_1_a_1.nii.gz", "flat") == tmp_path / "train_1_a_1.nii.gz"
    with pytest.raises(InputError, match="Did you mean 'flat'"):
        volume_path(tmp_path, "train_1_a_1.nii.gz", "flt")  # type: ignore[arg-type]


@pytest.fixture
def ctrate_files(tmp_path):
    (tmp_path / "reports.csv").write_text(
        "VolumeName,ClinicalInformation_EN,Findings_EN,Impressions_EN\n"
        'train_1_a_1.nii.gz,cough,"Emphysema in both lungs. Heart normal.","Emphysema."\n'
        'train_1_a_2.nii.gz,cough,"Emphysema in both lungs. Heart normal.","Emphysema."\n'
        "train_2_a_1.nii.gz,,Normal study.,No acute findings.\n"
        "train_3_b_1.nii.gz,,x,y\n"
    )
    desc = {
        "train_1_a": {"lung": "Centrilobular emphysema in both lungs", "heart": "Heart size is normal."},
        "train_2_a": {"lung": "Lungs are clear.", "aorta": "Aortic calibre is normal."},
    }
    conc = {"train_1_a": {"lung": "Emphysema", "aorta": "Atherosclerotic (calcified) plaques."}}
    (tmp_path / "desc_info.json").write_text(json.dumps(desc))
    (tmp_path / "conc_info.json").write_text(json.dumps(conc))
    (tmp_path / "labels.csv").write_text(
        "VolumeName,Medical material,Emphysema,Cardiomegaly,Hiatal hernia,Arterial wall calcification\n"
        "train_1_a_1.nii.gz,1,1,0,0,1\n"
        "train_1_a_2.nii.gz,0,1,0,0,1\n"
        "train_2_a_1.nii.gz,0,0,1,0,0\n"
        "train_3_b_1.nii.gz,0,0,0,1,0\n"
    )
    return tmp_path


EXPECTED_TEXTS = {
    "train_1_a_1": (
        "Emphysema.Centrilobular emphysema in both lungs.",
        "heart shows no significant abnormalities.Heart size is normal.",
        "esophagus shows no significant abnormalities.",
        "Atherosclerotic calcified plaques.",
    ),
    "train_2_a_1": (
        "lung shows no significant abnormalities.Lungs are clear.",
        "heart shows no significant abnormalities.",
        "esophagus shows no significant abnormalities.",
        "aorta shows no significant abnormalities.Aortic calibre is normal.",
    ),
    "train_3_b_1": tuple(normal_sentence(o) for o in ORGANS),
}


def test_ctrate_records_text_labels(ctrate_files, caplog):
    d = ctrate_files
    with caplog.at_level(logging.WARNING):
        records = ctrate_records(
            d / "reports.csv", d / "desc_info.json", d / "conc_info.json", d / "img", d / "seg", ORGANS,
            check_files=False,
        )
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_b_1"]
    for vid, texts in EXPECTED_TEXTS.items():
        assert by_id[vid].texts == texts
    assert by_id["train_1_a_2"].texts == EXPECTED_TEXTS["train_1_a_1"]  # same study, same report
    assert by_id["train_1_a_1"].abnormal == (True, False, False, True)
    assert by_id["train_2_a_1"].abnormal == (False, False, False, False)
    assert by_id["train_1_a_1"].image == str(d / "img" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz")
    assert by_id["train_1_a_1"].mask == str(d / "seg" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz")
    assert "train_3_b" in caplog.text  # a study without organ-split reports is reported


def test_ctrate_labels_csv_replaces_text_labels(ctrate_files):
    d = ctrate_files
    finding_organs = {"Emphysema": "lung", "Cardiomegaly": "heart", "Hiatal hernia": "esophagus",
                      "Arterial wall calcification": "aorta"}
    labels = read_labels(d / "labels.csv", finding_organs, ORGANS)
    assert labels["train_2_a_1.nii.gz"] == {"lung": False, "heart": True, "esophagus": False, "aorta": False}
    records = ctrate_records(
        d / "reports.csv", d / "desc_info.json", d / "conc_info.json", d / "img", d / "seg", ORGANS,
        labels_csv=d / "labels.csv", finding_organs=finding_organs, check_files=False,
    )
    by_id = {r.id: r for r in records}
    assert by_id["train_2_a_1"].abnormal == (False, True, False, False)
    assert by_id["train_3_b_1"].abnormal == (False, False, True, False)
    assert by_id["train_1_a_1"].abnormal == (True, False, False, True)


def test_ctrate_missing_files_and_columns(ctrate_files):
    d = ctrate_files
    with pytest.raises(InputError, match="4 CT-RATE volumes or masks do not exist"):
        ctrate_records(d / "reports.csv", d / "desc_info.json", d / "conc_info.json", d / "img", d / "seg", ORGANS)
    (d / "bad.csv").write_text("VolumeName,Findings,Impressions_EN\nx_1_a_1.nii.gz,a,b\n")
    with pytest.raises(InputError, match="no column 'Findings_EN'"):
        ctrate_records(d / "bad.csv", d / "desc_info.json", d / "conc_info.json", d, d, ORGANS, check_files=False)


def test_ctrate_manifest_round_trip(ctrate_files, tmp_path):
    d = ctrate_files
    records = ctrate_records(
        d / "reports.csv", d / "desc_info.json", d / "conc_info.json", d / "img", d / "seg", ORGANS, check_files=False
    )
    for suffix in (".csv", ".jsonl"):
        path = write_manifest(records, tmp_path / f"manifest{suffix}", ORGANS)
        assert read_manifest(path, ORGANS) == records
