"""Finding catalogues from YAML/JSON files and Python, with clear errors."""

from __future__ import annotations

import json

import pytest

from visd.config import FindingSpec, ViSDConfig
from visd.errors import InputError
from visd.zero_shot import as_findings, load_findings

ORGANS = ViSDConfig().organs

YAML = """\
- organ: lung
  name: Emphysema
  negative: [Not Emphysema., No emphysema is seen.]
  positive: Emphysema.
- organ: aorta
  name: Aortic calcification
  negative: The aorta is not calcified.
  positive: [Calcified aorta., Aortic wall calcification.]
"""

EXPECTED = [
    FindingSpec(organ="lung", name="Emphysema", negative=("Not Emphysema.", "No emphysema is seen."),
                positive=("Emphysema.",)),
    FindingSpec(organ="aorta", name="Aortic calcification", negative=("The aorta is not calcified.",),
                positive=("Calcified aorta.", "Aortic wall calcification.")),
]


def test_yaml_and_json_files_give_the_same_specs(tmp_path):
    (tmp_path / "f.yaml").write_text(YAML)
    data = [f.model_dump(mode="json") for f in EXPECTED]
    (tmp_path / "f.json").write_text(json.dumps(data))
    assert load_findings(tmp_path / "f.yaml", ORGANS) == EXPECTED
    assert load_findings(tmp_path / "f.json", ORGANS) == EXPECTED


def test_python_forms_are_equivalent():
    tuples = [("lung", "Emphysema", ["Not Emphysema.", "No emphysema is seen."], "Emphysema."),
              ("aorta", "Aortic calcification", "The aorta is not calcified.",
               ("Calcified aorta.", "Aortic wall calcification."))]
    dicts = [f.model_dump() for f in EXPECTED]
    assert as_findings(tuples, ORGANS) == EXPECTED
    assert as_findings(dicts, ORGANS) == EXPECTED
    assert as_findings(EXPECTED, ORGANS) == EXPECTED
    assert as_findings(list(ViSDConfig().findings), ORGANS) == list(ViSDConfig().findings)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- {organ: lungs, name: X, negative: a, positive: b}", ["organ 'lungs'", "Did you mean 'lung'?"]),
        ("- {organ: lung, name: X, negative: a}", ["lacks 'positive'", "'X'"]),
        ("- {organ: lung, name: X, negative: [], positive: b}", ["'negative' prompt", "non-empty list"]),
        ("- {organ: lung, name: X, negative: '  ', positive: b}", ["non-empty strings"]),
        ("- {organ: lung, name: X, negative: a, postive: b}", ["unknown key 'postive'", "Did you mean 'positive'?"]),
        ("- {organ: lung, name: X, negative: a, positive: b}\n- {organ: aorta, name: X, negative: a, positive: b}",
         ["finding #2 repeats the name 'X'"]),
        ("[]", ["empty"]),
        ("organ: lung", ["holds dict, expected a list"]),
        ("- {organ: lung, name: X, negative: a, positive: [b\n", ["not valid YAML at line"]),
        ("- 42", ["finding #1 is 42"]),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, expected):
    path = tmp_path / "findings.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_findings(path, ORGANS)
    for part in expected:
        assert part in str(info.value)
    assert str(path) in str(info.value)


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match="findings file not found"):
        load_findings(tmp_path / "missing.yaml")
    (tmp_path / "f.txt").write_text(YAML)
    with pytest.raises(InputError, match="unsupported findings file type"):
        load_findings(tmp_path / "f.txt")
    (tmp_path / "f.json").write_text("[{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_findings(tmp_path / "f.json")


def test_organs_are_only_checked_when_given(tmp_path):
    (tmp_path / "f.yaml").write_text("- {organ: liver, name: Steatosis, negative: a, positive: b}")
    assert load_findings(tmp_path / "f.yaml")[0].organ == "liver"
    with pytest.raises(InputError, match="does not have"):
        load_findings(tmp_path / "f.yaml", ORGANS)
