"""The fast inference path equals the plain path up to float rounding."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, phantom_volume, tiny_config
from visd.models import fast
from visd.models.fast import _conv_bn, backbone_features, pool_organ, project
from visd.models.pooling import OrganPooling


def test_folded_conv_batchnorm(generator):
    conv = torch.nn.Conv3d(3, 4, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm3d(4).eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        bn.weight.normal_(generator=generator)
        bn.bias.normal_(generator=generator)
        x = torch.randn(2, 3, 5, 6, 7, generator=generator)
        expected = bn(conv(x))
        torch.testing.assert_close(_conv_bn(conv, bn, x), expected, rtol=1e-5, atol=1e-5)
        cl = _conv_bn(conv, bn, x, fmt=torch.channels_last_3d)
        assert cl.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(cl, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [(1, 1, 1, 1), (2, 2, 2, 2)])
@pytest.mark.parametrize("batch", [1, 2])
def test_backbone_features_match_module_forward(layers, batch):
    model = make_tiny_model(vision=tiny_config().vision.model_copy(update={"layers": layers}))
    x = torch.rand(batch, 1, 32, 64, 64)
    with torch.no_grad():
        expected = model.vision.backbone(x)
        for channels_last in (False, True):
            got = backbone_features(model.vision.backbone, x, channels_last=channels_last)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_in_place_convolutions_equal_the_plain_ones(monkeypatch):
    """Channels-last float32 on a CPU runs the convolutions into reused memory (oneDNN's sum
    post-op); the result equals the plain convolutions', and no stage output is overwritten."""
    model = make_tiny_model(vision=tiny_config().vision.model_copy(update={"layers": (2, 2, 2, 2)}))
    x = torch.rand(2, 1, 32, 64, 64)
    assert fast._accumulates(x)
    calls = []
    conv_add = fast._conv_add_
    monkeypatch.setattr(fast, "_conv_add_", lambda *a, **k: calls.append(1) or conv_add(*a, **k))
    with torch.no_grad():
        got = backbone_features(model.vision.backbone, x, channels_last=True)
        assert len(calls) == 8 * 2 + 1  # both convolutions of 8 blocks, conv1 of the stem's one slab
        monkeypatch.setattr(fast, "_accumulates", lambda t: False)
        plain = backbone_features(model.vision.backbone, x, channels_last=True)
    assert len(calls) == 17
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_zeroed_reuses_memory():
    pool, like = {}, torch.empty(0)
    a = fast._zeroed(pool, (2, 3), like, torch.contiguous_format)
    a.fill_(5.0)
    b = fast._zeroed(pool, (2, 3), like, torch.contiguous_format)
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, torch.zeros(2, 3))
    assert fast._zeroed(pool, (3, 2), like, torch.contiguous_format).data_ptr() != a.data_ptr()


def test_pool_organ_matches_attend(generator):
    torch.manual_seed(0)
    pool = OrganPooling(num_organs=3, dim=16, heads=4).eval()
    projs = [torch.nn.Conv3d(c, 16, 1) for c in (4, 8, 6)]
    feats = [torch.randn(n, c, generator=generator) for n, c in ((9, 4), (5, 8), (3, 6))]
    roi, normal = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    with torch.no_grad():
        tokens = [project(p, f) for p, f in zip(projs, feats)]
        other = torch.cat(tokens)
        expected = pool.attend(torch.cat([other, roi]), torch.cat([other, normal]), 2)
        projected = pool_organ(pool, [(other, None)], roi, normal, 2)
        raw = pool_organ(pool, list(zip(feats, projs)), roi, normal, 2)
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)


def test_project_equals_the_1x1x1_convolution(generator):
    conv = torch.nn.Conv3d(5, 7, 1)
    x = torch.randn(1, 5, 2, 3, 4, generator=generator)
    with torch.no_grad():
        expected = conv(x).flatten(2)[0].t()
        torch.testing.assert_close(project(conv, x.flatten(2)[0].t()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("length", [5, 6])
def test_max3_stride2_is_max_pooling_along_one_axis(generator, shift, length):
    x = torch.randn(2, 3, length, 4, 5, generator=generator)
    count = (length - shift - 1) // 2 + 1
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 1, 2), value=float("-inf"))  # row r at r + 1
    expected = torch.stack(
        [padded[:, :, 2 * i + shift : 2 * i + shift + 3].amax(2) for i in range(count)], 2
    )
    got = fast._max3_stride2(x, 2, shift, count)
    assert torch.equal(got, expected)
    cl = fast._max3_stride2(x.contiguous(memory_format=torch.channels_last_3d), 2, shift, count)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(cl, expected)


def test_stem_conv_as_2d_convolution_over_depth_taps(generator):
    conv = torch.nn.Conv3d(2, 5, (3, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2))
    slab = torch.randn(2, 2, 7, 11, 12, generator=generator)
    with torch.no_grad():
        expected = conv(slab)
        got = fast._stem_conv(conv, conv.weight, conv.bias, slab)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 64, 48), (36, 33, 47), (2, 9, 10)])
@pytest.mark.parametrize("rows_per_slab", [1, 3, 100])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("in_place", [False, True])
def test_stem_in_slabs_matches_the_whole_stem(monkeypatch, shape, rows_per_slab, fmt, in_place):
    model = make_tiny_model()
    bb = model.vision.backbone
    x = torch.rand(2, 1, *shape)
    with torch.no_grad():
        conv = bb.conv1(x)
        expected = torch.nn.functional.max_pool3d(torch.relu(bb.bn1(conv)), 3, 2, 1)
        values_per_row = conv.shape[0] * conv.shape[1] * conv.shape[3] * conv.shape[4]
        monkeypatch.setattr(fast, "_STEM_SLAB_VALUES", 2 * values_per_row * rows_per_slab)
        got = fast._stem(bb, x, fmt, in_place)
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_shot_fast_equals_official_numerics():
    model = make_tiny_model()
    image, mask = phantom_volume()
    fast = model.zero_shot_classify(image, mask)
    model.official_numerics = True
    plain = model.zero_shot_classify(image, mask)
    torch.testing.assert_close(fast.embeddings.embeddings, plain.embeddings.embeddings, rtol=0, atol=1e-5, equal_nan=True)
    for a, b in zip(fast.scores, plain.scores):
        assert a.status == b.status
        assert (a.probability != a.probability and b.probability != b.probability) or abs(a.probability - b.probability) < 1e-5


def _probs(model, image, mask):
    return torch.tensor([s.probability for s in model.zero_shot_classify(image, mask).scores])


def test_window_batching_and_channels_last_do_not_change_results():
    model = make_tiny_model()
    image, mask = phantom_volume(shape=(32, 64, 64))  # every organ window has the ROI shape
    base = _probs(model, image, mask)
    model.window_batch_size = 4
    assert model._window_batches({"a": _W(), "b": _W(), "c": _W((1, 1, 32, 64, 96))}) == [["a", "b"], ["c"]]
    torch.testing.assert_close(_probs(model, image, mask), base, rtol=0, atol=1e-6, equal_nan=True)
    model.channels_last = True
    torch.testing.assert_close(_probs(model, image, mask), base, rtol=0, atol=1e-5, equal_nan=True)


def test_bf16_autocast_stays_close():
    model = make_tiny_model()
    image, mask = phantom_volume()
    base = _probs(model, image, mask)
    model.autocast_dtype = torch.bfloat16
    got = _probs(model, image, mask)
    torch.testing.assert_close(got, base, rtol=0, atol=2e-2, equal_nan=True)


class _W:
    def __init__(self, shape=(1, 1, 32, 64, 64)):
        self.image = torch.zeros(shape)
