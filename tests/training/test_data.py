"""Training data: manifests, augmentation, the preprocessing cache (real CT), collate and sharding."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import DATA, tiny_config

from visd.errors import InputError
from visd.training.augment import augment, pad_to_roi, random_crop, random_flip, view_rng
from visd.training.data import Collate, CTReportDataset, PreprocessCache, epoch_batches
from visd.training.manifest import ManifestRecord, read_manifest
from visd.training.reports import normal_sentence

ORGANS = ("lung", "heart", "esophagus", "aorta")


# -- manifests -------------------------------------------------------------------------------------
def test_csv_and_jsonl_manifests_agree(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,image,mask,text_lung,label_lung,text_aorta\n"
        "a,ct/a.nii.gz,/abs/a_mask.nii.gz,Emphysema.,,\n"
        "b,ct/b.nii.gz,ct/b_mask.nii.gz,lung shows no significant abnormalities.Clear.,1,Calcified plaques.\n"
        "c,ct/c.nii.gz,ct/c_mask.nii.gz,,0,\n"
    )
    (tmp_path / "m.jsonl").write_text(
        '{"id": "a", "image": "ct/a.nii.gz", "mask": "/abs/a_mask.nii.gz", "texts": {"lung": "Emphysema."}}\n'
        '{"id": "b", "image": "ct/b.nii.gz", "mask": "ct/b_mask.nii.gz", "texts": {"lung": '
        '"lung shows no significant abnormalities.Clear.", "aorta": "Calcified plaques."}, "labels": {"lung": 1}}\n'
        "\n"
        '{"id": "c", "image": "ct/c.nii.gz", "mask": "ct/c_mask.nii.gz", "labels": {"lung": 0}}\n'
    )
    csv_records, json_records = read_manifest(tmp_path / "m.csv", ORGANS), read_manifest(tmp_path / "m.jsonl", ORGANS)
    assert csv_records == json_records
    a, b, c = csv_records
    assert a.image == str(tmp_path / "ct" / "a.nii.gz") and a.mask == "/abs/a_mask.nii.gz"
    assert a.texts == ("Emphysema.", *(normal_sentence(o) for o in ORGANS[1:]))
    assert a.abnormal == (True, False, False, False)  # derived from the text
    assert b.abnormal == (True, False, False, True)  # the given label wins over the text rule
    assert c.abnormal == (False,) * 4 and c.texts == tuple(normal_sentence(o) for o in ORGANS)


@pytest.mark.parametrize(
    "content, message",
    [
        ("image,mask,text_lungs\nx,y,z\n", "Did you mean 'text_lung'"),
        ("image,mask,label_lung\nx,y,2\n", "not 0 or 1"),
        ("image,mask,label_lung\nx,y,1\n", "labelled abnormal but has no text"),
        ("image,text_lung\nx,y\n", "no 'mask' column"),
        ("id,image,mask\na,x,y\na,x,y\n", "repeats ids"),
        ("image,mask\n,y\n", "'image' is missing"),
    ],
)
def test_manifest_errors(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(InputError, match=message):
        read_manifest(tmp_path / "m.csv", ORGANS)


def test_jsonl_unknown_key_and_organ(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "x", "mask": "y", "text": {}}\n')
    with pytest.raises(InputError, match="Did you mean 'texts'"):
        read_manifest(tmp_path / "m.jsonl", ORGANS)
    (tmp_path / "m.jsonl").write_text('{"image": "x", "mask": "y", "texts": {"lungs": "a"}}\n')
    with pytest.raises(InputError, match="Did you mean 'lung'"):
        read_manifest(tmp_path / "m.jsonl", ORGANS)


# -- augmentation ----------------------------------------------------------------------------------
def test_crop_pads_symmetrically_when_smaller():
    image = np.ones((3, 8, 5), np.float32)
    mask = np.full((3, 8, 5), 2, np.uint8)
    img, msk = pad_to_roi(image, mask, (6, 8, 8), pad_value=-1.0)
    assert img.shape == (6, 8, 8)
    # D: 3 -> 6 pads (1, 2); H unchanged; W: 5 -> 8 pads (1, 2)
    assert (img[1:4, :, 1:6] == 1).all() and img[0].max() == -1 and (img[4:] == -1).all()
    assert (img[:, :, 0] == -1).all() and (img[:, :, 6:] == -1).all()
    assert (msk[1:4, :, 1:6] == 2).all() and msk.sum() == 2 * 3 * 8 * 5


def test_crop_is_a_window_of_the_volume_and_uniform():
    vol = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    starts = []
    for i in range(300):
        img, msk = random_crop(vol, vol.astype(np.int64), (4, 12, 6), view_rng(0, 0, i, 0))
        d0, h0, w0 = np.unravel_index(int(img[0, 0, 0]), vol.shape)
        assert np.array_equal(img, vol[d0 : d0 + 4, h0 : h0 + 12, w0 : w0 + 6]) and np.array_equal(msk, img)
        starts.append((d0, h0, w0))
    d, h, w = np.array(starts).T
    assert set(d) == set(range(7)) and set(h) == {0} and set(w) == set(range(9))  # every position reachable


def test_flip_probability_and_pairing():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    mask = image.astype(np.int64)
    counts = np.zeros(3)
    n = 4000
    for i in range(n):
        img, msk = random_flip(image, mask, view_rng(1, 2, i, 0), 0.2)
        corner = np.unravel_index(int(img[0, 0, 0]), image.shape)  # which corner moved to the origin
        flips = tuple(a for a in range(3) if corner[a] != 0)
        assert np.array_equal(img, np.flip(image, flips)) and np.array_equal(msk, img.astype(np.int64))
        counts[list(flips)] += 1
    freq = counts / n
    assert np.all(np.abs(freq - 0.2) < 0.02), freq  # p = 0.2 per axis; 4000 draws: sd 0.0063


def test_augment_is_seeded_and_contiguous():
    image = np.random.default_rng(0).random((20, 40, 40)).astype(np.float32)
    mask = (image > 0.5).astype(np.uint8)
    a = augment(image, mask, (16, 32, 32), view_rng(5, 1, 7, 0), 0.5)
    b = augment(image, mask, (16, 32, 32), view_rng(5, 1, 7, 0), 0.5)
    c = augment(image, mask, (16, 32, 32), view_rng(5, 1, 7, 1), 0.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])  # the second view differs
    assert a[0].flags["C_CONTIGUOUS"] and a[0].shape == (16, 32, 32)


# -- cache (real CT) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_record():
    return ManifestRecord(
        "abdomen", str(DATA / "abdomen_3mm.nii.gz"), str(DATA / "abdomen_3mm_totalseg.nii.gz"),
        tuple(normal_sentence(o) for o in ORGANS), (False,) * 4,
    )


def test_cache_equals_load_case_and_is_reused(tmp_path, real_record, monkeypatch):
    import visd.data
    from visd.data import load_case

    config = tiny_config()
    reference = load_case(real_record.image, real_record.mask, config)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return reference

    monkeypatch.setattr(visd.data, "load_case", counting)
    cache = PreprocessCache(tmp_path / "cache", config)
    image, mask = cache.load(real_record)
    assert np.array_equal(image, reference.image) and np.array_equal(mask, reference.mask)
    assert mask.dtype == np.uint8 and image.dtype == np.float32
    image2, mask2 = PreprocessCache(tmp_path / "cache", config).load(real_record)  # a new process, same cache
    assert len(calls) == 1 and np.array_equal(image2, reference.image) and np.array_equal(mask2, reference.mask)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [cache.path(real_record).name]  # no temporary left behind
    # the key changes with the preprocessing spec and with the file's modification time
    window = config.replace(preprocess=config.preprocess.model_dump() | {"hu_window": (-1000.0, 400.0)})
    other = PreprocessCache(tmp_path / "cache", window)
    assert other.key(real_record) != cache.key(real_record)
    copy = tmp_path / "ct.nii.gz"
    copy.write_bytes(Path(real_record.image).read_bytes())
    moved = ManifestRecord(real_record.id, str(copy), real_record.mask, real_record.texts, real_record.abnormal)
    key = cache.key(moved)
    os.utime(copy, ns=(1_000_000_000, 2_000_000_000))
    assert cache.key(moved) != key


def test_dataset_views_cover_the_roi(tmp_path, real_record):
    config = tiny_config()
    cache = PreprocessCache(tmp_path / "cache", config)
    ds = CTReportDataset([real_record], cache, seed=0, views=2)
    item = ds[(0, 0)]
    full_image, full_mask = cache.load(real_record)
    assert item["image"].shape == (2, 1, *config.preprocess.roi) and item["mask"].dtype == torch.uint8
    again = ds[(0, 0)]
    assert torch.equal(item["image"], again["image"])  # (epoch, index) fixes the crop
    assert not torch.equal(ds[(1, 0)]["image"], item["image"])  # another epoch, another crop
    for view in range(2):  # each view is fVLM's augmentation of the cached volume with its own generator
        ref_image, ref_mask = augment(full_image, full_mask, config.preprocess.roi, view_rng(0, 0, 0, view), 0.2)
        assert np.array_equal(item["image"][view, 0].numpy(), ref_image)
        assert np.array_equal(item["mask"][view, 0].numpy(), ref_mask)
    assert (item["mask"] > 0).any()  # the crop is in the organ box: some organ is visible


def test_collate_tokenises_like_the_model():
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    texts = [["Emphysema.", "heart shows no significant abnormalities.", "x", "y"], ["a b", "c", "d", "e"]]
    samples = [
        {"index": i, "image": torch.rand(2, 1, 4, 4, 4), "mask": torch.zeros(2, 1, 4, 4, 4, dtype=torch.uint8),
         "texts": tuple(t), "abnormal": torch.tensor([i == 0, False, True, False])}
        for i, t in enumerate(texts)
    ]
    batch = Collate(model.tokenizer, model.config.text.max_length)(samples)
    ids, attention = model.tokenize([t for row in texts for t in row])
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, attention)
    assert torch.equal(batch.image, torch.stack([s["image"][0] for s in samples]))
    assert torch.equal(batch.image2, torch.stack([s["image"][1] for s in samples]))
    assert batch.abnormal.tolist() == [[True, False, True, False], [False, False, True, False]]
    assert batch.texts == texts and batch.indices.tolist() == [0, 1]
    no_text = Collate(None)(samples)
    assert no_text.input_ids is None and torch.equal(no_text.mask, batch.mask)


def test_epoch_batches_shard_the_single_process_order():
    data = list(range(10))
    single = epoch_batches(data, 4, epoch=3, seed=1)
    assert len(single) == 2 and all(e == 3 for b in single for e, _ in b)  # last partial batch dropped
    r0 = epoch_batches(data, 2, epoch=3, seed=1, rank=0, world_size=2)
    r1 = epoch_batches(data, 2, epoch=3, seed=1, rank=1, world_size=2)
    # a step of two processes sees the same scans as one process with the whole batch
    assert sorted(r0[0] + r1[0]) == sorted(single[0])
    assert epoch_batches(data, 4, epoch=4, seed=1) != single  # reshuffled each epoch
