"""Organ label maps: visd ids, TotalSegmentator multilabel (with and without label table), per-class folder."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from visd.data import read_ct, read_organ_mask
from visd.data.masks import read_label_table
from visd.data.totalseg_classes import TOTAL_V2_CLASSES
from visd.errors import InputError

from ._helpers import data_file, save_nifti


@pytest.fixture(scope="module")
def ct():
    return read_ct(data_file("abdomen_3mm.nii.gz"))


def add_label_table(img: nib.Nifti1Image, label_map: dict[int, str]) -> nib.Nifti1Image:
    """Write the label table the way TotalSegmentator v2 does (nifti_ext_header.add_label_map_to_nifti)."""
    pre = (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]></Date>'
        '   <VolumeInformation Index="0">   <LabelTable>'
    )
    body = "".join(
        f'<Label Key="{k}" Red="1.0" Green="0.0" Blue="0.0" Alpha="1"><![CDATA[{v}]]></Label>\n'
        for k, v in label_map.items()
    )
    post = (
        "  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType><![CDATA[Label]]>"
        "</VolumeType>   </VolumeInformation></CaretExtension>"
    )
    xml = pre + "\n" + body + "\n" + post + "\n              "
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml.encode("utf-8")))
    return img


def test_class_table_matches_the_tsv():
    with open(data_file("totalsegmentator_total_v2_classes.tsv")) as f:
        rows = {int(r["id"]): r["name"] for r in csv.DictReader(f, delimiter="\t")}
    assert rows == TOTAL_V2_CLASSES and len(rows) == 117


def test_real_totalsegmentator_header_is_read(ras_seg):
    assert read_label_table(ras_seg) == TOTAL_V2_CLASSES


def test_multilabel_with_label_table_maps_by_name(tmp_path, ct, ras_seg, ras_seg_labels, ras_organs, config):
    # Renumber every class so that only the names in the table can give the right merge.
    perm = np.random.default_rng(0).permutation(np.arange(1, 118)) + 200
    lut = np.zeros(118, np.int32)
    lut[1:] = perm
    relabelled = lut[ras_seg_labels].astype(np.int16)
    table = {int(lut[i]): name for i, name in TOTAL_V2_CLASSES.items()}
    path = tmp_path / "ml.nii.gz"
    nib.save(add_label_table(nib.Nifti1Image(relabelled, ras_seg.affine), table), path)
    for fmt in ("auto", "totalsegmentator"):
        np.testing.assert_array_equal(read_organ_mask(path, ct, config, mask_format=fmt), ras_organs)


def test_multilabel_without_table_uses_v2_ids(tmp_path, ct, ras_seg, ras_seg_labels, ras_organs, config):
    path = save_nifti(ras_seg_labels, ras_seg.affine, tmp_path / "plain.nii.gz")
    assert read_label_table(nib.load(path)) is None
    np.testing.assert_array_equal(read_organ_mask(path, ct, config), ras_organs)
    np.testing.assert_array_equal(read_organ_mask(path, ct, config, mask_format="totalsegmentator"), ras_organs)


def test_per_class_folder(tmp_path, ct, ras_seg, ras_seg_labels, ras_organs, config):
    folder = tmp_path / "segmentations"
    folder.mkdir()
    for class_id in np.unique(ras_seg_labels)[1:]:
        name = TOTAL_V2_CLASSES[int(class_id)]
        save_nifti((ras_seg_labels == class_id).astype(np.uint8), ras_seg.affine, folder / f"{name}.nii.gz")
    save_nifti(np.zeros(ct.shape, np.uint8), ras_seg.affine, folder / "heart.nii.gz")  # absent organ: empty file
    merged = read_organ_mask(folder, ct, config)
    np.testing.assert_array_equal(merged, ras_organs)
    assert set(np.unique(merged)) == {0, 1, 4}  # lung and aorta are in this upper-abdomen scan


def test_folder_without_needed_classes(tmp_path, ct, config):
    (tmp_path / "liver.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="none of the class files"):
        read_organ_mask(tmp_path, ct, config)


def test_visd_format_file(tmp_path, ct, ras_organs, ras_seg, config):
    path = save_nifti(ras_organs, ras_seg.affine, tmp_path / "organs.nii.gz")
    np.testing.assert_array_equal(read_organ_mask(path, ct, config), ras_organs)
    np.testing.assert_array_equal(read_organ_mask(path, ct, config, mask_format="visd"), ras_organs)
    np.testing.assert_array_equal(read_organ_mask(ras_organs.astype(np.int64), ct, config), ras_organs)


def test_unknown_labels_in_visd_format(tmp_path, ct, ras_organs, ras_seg, config):
    labels = ras_organs.copy()
    labels[0, 0, 0], labels[1, 0, 0] = 7, 9
    path = save_nifti(labels, ras_seg.affine, tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match=r"bad.nii.gz has unknown labels \[7, 9\]. Expected .*1=lung, 2=heart"):
        read_organ_mask(path, ct, config, mask_format="visd")
    labels = ras_organs.astype(np.int16)
    labels[5, 5, 5], labels[6, 5, 5], labels[7, 5, 5], labels[8, 5, 5] = 9, -3, 9, 5
    with pytest.raises(InputError, match=r"array has unknown labels \[-3, 5, 9\]\. Expected 0"):
        read_organ_mask(labels, ct, config, mask_format="visd")  # each bad value once, in ascending order


def test_empty_mask(tmp_path, ct, ras_seg, ras_seg_labels, config):
    path = save_nifti(np.zeros(ct.shape, np.uint8), ras_seg.affine, tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="empty.nii.gz is empty: it has no voxel of any organ"):
        read_organ_mask(path, ct, config)
    liver_only = save_nifti(np.where(ras_seg_labels == 5, 5, 0).astype(np.uint8), ras_seg.affine, tmp_path / "l.nii.gz")
    with pytest.raises(InputError, match="is empty"):
        read_organ_mask(liver_only, ct, config, mask_format="totalsegmentator")


def test_mask_of_another_shape(tmp_path, ct, ras_organs, ras_seg, config):
    path = save_nifti(ras_organs[:, :, :29], ras_seg.affine, tmp_path / "short.nii.gz")
    message = r"differ in shape: mask \(122, 101, 29\), CT \(122, 101, 30\)\. Pass the label map"
    with pytest.raises(InputError, match=message):
        read_organ_mask(path, ct, config)


def test_mask_of_another_extent(tmp_path, ct, ras_organs, ras_seg, config):
    shifted = ras_seg.affine.copy()
    shifted[2, 3] += 30.0  # same shape, 10 slices higher
    path = save_nifti(ras_organs, shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(InputError, match="cover different parts of space"):
        read_organ_mask(path, ct, config)


def test_mask_at_another_resolution_same_extent_is_resampled(tmp_path, ct, ras_organs, ras_seg, config):
    fine = np.repeat(np.repeat(np.repeat(ras_organs, 2, 0), 2, 1), 2, 2)  # 1.5 mm voxels
    affine = ras_seg.affine.copy()
    affine[:3, :3] /= 2.0
    affine[:3, 3] -= 0.75  # voxel edges line up with the CT's
    path = save_nifti(fine, affine, tmp_path / "fine.nii.gz")
    np.testing.assert_array_equal(read_organ_mask(path, ct, config), ras_organs)


def test_mask_stored_in_another_orientation(ct, ras_organs, config):
    # The LPS label map of the same scan, given with the RAS CT: same extent, flipped grid.
    merged = read_organ_mask(data_file("totalseg_lps.nii.gz"), ct, config)
    np.testing.assert_array_equal(merged, ras_organs)


def test_unknown_mask_format(ct, ras_organs, config):
    with pytest.raises(InputError, match="Did you mean 'totalsegmentator'"):
        read_organ_mask(ras_organs, ct, config, mask_format="totalsegmentater")


def test_probability_map_is_rejected(ct, ras_organs, config):
    with pytest.raises(InputError, match="non-integer values"):
        read_organ_mask(ras_organs * 0.5, ct, config)
