"""The optional TotalSegmentator run: missing dependency, the arguments visd passes, the output it reads.

TotalSegmentator is not installed here (and its weights cannot be downloaded), so a stand-in package
takes its place at the import boundary: a ``totalsegmentator.python_api.totalsegmentator`` with the
real signature (v2.4 to v2.18) that checks ``device`` and ``roi_subset`` the way TotalSegmentator
does and writes what it writes for ``ml=True`` + ``roi_subset``: the real TotalSegmentator label map
of the scan (tests/data/abdomen_3mm_totalseg.nii.gz) with the other classes set to 0 and the label
table of the subset in the header. visd's own code (segment, load_scan, read_organ_mask) runs unchanged.
"""

from __future__ import annotations

import csv
import inspect
import re
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from visd.config import ViSDConfig
from visd.data import read_ct, read_organ_mask, segment
from visd.data.segment import totalsegmentator_classes, totalsegmentator_device
from visd.errors import InputError, MissingDependencyError
from visd.zero_shot.loading import load_scan

from ._helpers import CHEST_IDS, data_file, merge_by_ids
from .test_organ_masks import add_label_table

# Known answer: the chest model's classes, by the ids of tests/data/README.md looked up in the tsv.
CHEST_CLASSES_BY_ID = [i for organ in sorted(CHEST_IDS) for i in CHEST_IDS[organ]]


def _tsv_classes() -> dict[int, str]:
    with open(data_file("totalsegmentator_total_v2_classes.tsv")) as f:
        return {int(r["id"]): r["name"] for r in csv.DictReader(f, delimiter="\t")}


# The real signature of totalsegmentator.python_api.totalsegmentator (v2.18.0; every name visd passes
# exists since v2.3). Binding visd's call to it fails on a misspelt or removed keyword.
def _real_signature(input, output=None, ml=False, nr_thr_resamp=1, nr_thr_saving=6, fast=False, nora_tag="None",
                    preview=False, task="total", roi_subset=None, statistics=False, radiomics=False, crop_path=None,
                    body_seg=False, force_split=False, output_type="nifti", quiet=False, verbose=False, test=0,
                    skip_saving=False, device="gpu", license_number=None, statistics_exclude_masks_at_border=True,
                    no_derived_masks=False, v1_order=False, fastest=False, roi_subset_robust=None,
                    stats_aggregation="mean", remove_small_blobs=False, statistics_normalized_intensities=False,
                    robust_crop=False, higher_order_resampling_LEGACY=False, higher_order_resampling=False,
                    save_probabilities=None, debug=False, report=None, statistics_extra=False, save_lowres=False,
                    resampling_order=1, plans="nnUNetPlans", model_size="big"):
    pass


def _standin_totalsegmentator(**kwargs):
    """What TotalSegmentator does with these arguments, as far as visd can see it."""
    args = inspect.signature(_real_signature).bind(**kwargs).arguments
    device = args.get("device", "gpu")
    if device not in ("gpu", "cpu", "mps") and not re.match(r"^gpu:(\d+)$", device):  # validate_device_type_api
        raise ValueError(f"Invalid device type: '{device}'.")
    roi_subset, task = args.get("roi_subset"), args.get("task", "total")
    if roi_subset is not None and type(roi_subset) is not list:
        raise ValueError("roi_subset must be a list of strings")
    if roi_subset is not None and not task.startswith("total"):
        raise ValueError("roi_subset only works with task 'total' or 'total_mr'")
    classes = _tsv_classes()
    ids = {name: i for i, name in classes.items()}
    label_map = classes if roi_subset is None else {i: n for i, n in classes.items() if n in roi_subset}
    for name in roi_subset or ():
        ids[name]  # KeyError, as class_map_inv[roi] raises in TotalSegmentator
    seg = nib.load(data_file("abdomen_3mm_totalseg.nii.gz"))
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    labels *= np.isin(labels, list(label_map)).astype(np.uint8)
    out = add_label_table(nib.Nifti1Image(labels, seg.affine), label_map)
    nib.save(out, args["output"])
    return out


def _install_standin(monkeypatch, calls: list):
    package = types.ModuleType("totalsegmentator")
    config = types.ModuleType("totalsegmentator.config")
    api = types.ModuleType("totalsegmentator.python_api")
    config.setup_totalseg = lambda: calls.append(("setup",))
    config.set_config_key = lambda key, value: calls.append(("set", key, value))

    def totalsegmentator(**kwargs):
        calls.append(("run", kwargs))
        return _standin_totalsegmentator(**kwargs)

    api.totalsegmentator = totalsegmentator
    package.config, package.python_api = config, api
    for name, module in (("totalsegmentator", package), ("totalsegmentator.config", config),
                         ("totalsegmentator.python_api", api)):
        monkeypatch.setitem(sys.modules, name, module)


def test_missing_totalsegmentator(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "visd\[segment\]".*--mask') as err:
        segment(data_file("abdomen_3mm.nii.gz"), tmp_path)
    assert isinstance(err.value, ImportError)


def test_chest_classes_are_the_known_total_v2_classes():
    tsv = _tsv_classes()
    assert totalsegmentator_classes(ViSDConfig()) == [tsv[i] for i in CHEST_CLASSES_BY_ID]
    assert totalsegmentator_classes(ViSDConfig()) == [
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
        "lung_lower_lobe_right", "heart", "atrial_appendage_left", "esophagus", "aorta",
    ]


def test_classes_follow_the_model_map():
    config = ViSDConfig().replace(totalsegmentator_map={"lung": ("lung_upper_lobe_left",), "aorta": ("aorta",)})
    assert totalsegmentator_classes(config) == ["lung_upper_lobe_left", "aorta"]
    bad = ViSDConfig().replace(totalsegmentator_map={"aorta": ("aortaa",)})
    with pytest.raises(InputError, match=r"'aortaa'.*Did you mean 'aorta'"):
        totalsegmentator_classes(bad)


@pytest.mark.parametrize(
    ("device", "expected"),
    [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:1", "gpu:1"), ("gpu:0", "gpu:0"), ("mps", "mps"), (" CUDA:2", "gpu:2")],
)
def test_device_names(device, expected):
    import torch

    assert totalsegmentator_device(device) == expected
    if not device.startswith((" ", "gpu")):
        assert totalsegmentator_device(torch.device(device)) == expected


def test_device_default_and_bad_device():
    import torch

    assert totalsegmentator_device(None) == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match=r"'tpu'.*'cuda:N'"):
        totalsegmentator_device("tpu")


def test_call_with_roi_subset_and_device(monkeypatch, tmp_path):
    calls: list = []
    _install_standin(monkeypatch, calls)
    classes = totalsegmentator_classes(ViSDConfig())
    out = segment(data_file("abdomen_3mm.nii.gz"), tmp_path / "seg", fast=True, roi_subset=classes, device="cuda:1")
    assert out == tmp_path / "seg" / "totalsegmentator.nii.gz"
    assert calls[:2] == [("setup",), ("set", "send_usage_stats", False)]
    run = calls[2][1]
    assert run["ml"] is True and run["fast"] is True and run["task"] == "total" and run["output"] == out
    assert run["roi_subset"] == classes and run["device"] == "gpu:1"


def test_unknown_roi_class_is_refused_before_running(monkeypatch, tmp_path):
    calls: list = []
    _install_standin(monkeypatch, calls)
    with pytest.raises(InputError, match=r"'lung_upper_lobe'.*Did you mean 'lung_upper_lobe_"):
        segment(data_file("abdomen_3mm.nii.gz"), tmp_path, roi_subset=["lung_upper_lobe"])
    with pytest.raises(InputError, match="list of class names"):
        segment(data_file("abdomen_3mm.nii.gz"), tmp_path, roi_subset="aorta")
    assert calls == []


def test_subset_output_merges_like_the_full_map(monkeypatch, tmp_path):
    """The roi_subset output merges to the same organ map as the full TotalSegmentator map of the scan."""
    _install_standin(monkeypatch, [])
    config = ViSDConfig()
    ct = read_ct(data_file("abdomen_3mm.nii.gz"))
    out = segment(data_file("abdomen_3mm.nii.gz"), tmp_path, roi_subset=totalsegmentator_classes(config), device="cpu")
    subset_labels = np.asarray(nib.load(out).dataobj)
    full_labels = np.asarray(nib.load(data_file("abdomen_3mm_totalseg.nii.gz")).dataobj)
    assert set(np.unique(subset_labels)) < set(np.unique(full_labels))  # other classes really were dropped
    merged = read_organ_mask(out, ct, config, mask_format="totalsegmentator")
    np.testing.assert_array_equal(merged, merge_by_ids(full_labels))
    assert merged.any()


def test_load_scan_segments_with_the_model_classes(monkeypatch, tmp_path):
    calls: list = []
    _install_standin(monkeypatch, calls)
    config = ViSDConfig()
    source = data_file("abdomen_3mm.nii.gz")
    segmented = load_scan(str(source), None, config, "auto", tmp_path, "abdomen")
    given = load_scan(str(source), data_file("abdomen_3mm_totalseg.nii.gz"), config, "auto", None, "abdomen")
    run = calls[-1][1]
    assert run["roi_subset"] == totalsegmentator_classes(config)
    assert run["output"] == tmp_path / "abdomen" / "totalsegmentator.nii.gz"
    np.testing.assert_array_equal(segmented.mask, given.mask)
    np.testing.assert_array_equal(segmented.image, given.image)


def test_usage_statistics_left_alone_when_allowed(monkeypatch, tmp_path):
    calls: list = []
    _install_standin(monkeypatch, calls)
    segment(data_file("abdomen_3mm.nii.gz"), tmp_path, statistics=True)
    assert [c[0] for c in calls] == ["run"]
    assert calls[0][1]["roi_subset"] is None


def test_faq_names_the_merge_and_the_offline_setup():
    from pathlib import Path

    faq = (Path(__file__).resolve().parents[2] / "docs" / "faq.md").read_text()
    for name in ("heart", "atrial_appendage_left", "esophagus", "aorta"):
        assert f"`{name}`" in faq
    assert "totalseg_download_weights -t total" in faq and "TOTALSEG_HOME_DIR" in faq
