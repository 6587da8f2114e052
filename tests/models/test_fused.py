"""The fused numerics equal the official operation order up to float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_tiny_model, phantom_volume, tiny_config
from visd.inference import encode_volume, window_batches, zero_shot_classify
from visd.models import fused as fast
from visd.models.fused import FoldedBackbone, _conv_bn
from visd.models.fused_pooling import fold_query, pool_organ, project
from visd.models.pooling import OrganPooling


def backbone_features(backbone, x, *, channels_last=False):
    return FoldedBackbone(backbone)(x, channels_last=channels_last)


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
        folded = FoldedBackbone.__new__(FoldedBackbone)  # just the folding of one pair
        folded._pairs, folded._formatted = {id(conv): (conv, bn)}, {}
        torch.testing.assert_close(_conv_bn(folded, conv, x), expected, rtol=1e-5, atol=1e-5)
        cl = _conv_bn(folded, conv, x, fmt=torch.channels_last_3d)
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


def _train_step_of(backbone, run, x):
    backbone = copy.deepcopy(backbone).to(x.dtype).train()
    feats = run(backbone, x)
    weights = [torch.linspace(-1, 1, f.shape[1], dtype=x.dtype).view(1, -1, 1, 1, 1) for f in feats]
    sum(((f * w) ** 2).mean() for f, w in zip(feats, weights)).backward()
    grads = {n: p.grad for n, p in backbone.named_parameters()}
    return feats, grads, {n: b.clone() for n, b in backbone.named_buffers()}


def test_channels_last_features_are_the_modules_train_step(generator):
    """Train mode with autograd: the channels-last computation (the stem's ReLU after its max pooling)
    gives the module's stage outputs, gradients and BatchNorm statistics, and runs channels-last.

    float64 (no oneDNN: the same kernels in both) checks the algebra to 1e-10, with two of the stem's
    channels made to hit the cases where the order of ReLU and max pooling could matter: one negative
    everywhere (no gradient either way) and one constant and positive (all ties). float32 checks the
    layout and the outputs; its gradients differ where rounding moves a pre-activation across zero
    (one ReLU more or less lets one position's gradient through), which the stage tests allow for.
    """
    model = make_tiny_model(vision=tiny_config().vision.model_copy(update={"layers": (2, 2, 2, 2)}))
    backbone = model.vision.backbone
    with torch.no_grad():
        backbone.bn1.bias[0] = -100.0
        backbone.bn1.weight[1], backbone.bn1.bias[1] = 0.0, 1.0
    x = torch.rand(2, 1, 32, 64, 64, generator=generator, dtype=torch.float64)
    module = _train_step_of(backbone, lambda b, t: b(t), x)
    channels_last = _train_step_of(backbone, fast.channels_last_features, x)
    assert module[1]["bn1.weight"][0] == 0 and module[1]["bn1.bias"][0] == 0  # the negative channel
    assert module[1]["bn1.bias"][1] != 0  # the constant channel passes gradient through its ties
    for got, expected in zip(channels_last, module):
        got, expected = (got, expected) if isinstance(got, list) else (list(got.values()), list(expected.values()))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    x = x.float()
    feats = fast.channels_last_features(copy.deepcopy(backbone).train(), x)
    with torch.no_grad():
        expected = copy.deepcopy(backbone).train()(x)
    if torch.backends.mkldnn.is_available():
        assert all(f.is_contiguous(memory_format=torch.channels_last_3d) and not f.is_contiguous() for f in feats)
    for a, b in zip(feats, expected):  # BatchNorm outputs: unit scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


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
        query = fold_query(pool, 2)
        projected = pool_organ(pool, query, [(other, None)], roi, normal)
        raw = pool_organ(pool, query, list(zip(feats, projs)), roi, normal)
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # the differentiable torch form gives the same value
        grad_form = pool_organ(pool, fold_query(pool, 2), list(zip(feats, projs)), roi, normal)
    torch.testing.assert_close(grad_form.detach(), expected, rtol=1e-5, atol=1e-6)


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
        got = fast._stem(FoldedBackbone(bb), x, fmt, in_place)
    assert got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_zero_shot_fused_equals_official_numerics():
    model = make_tiny_model()
    image, mask = phantom_volume()
    assert model.numerics.mode == "fused"  # the default
    fused = model.zero_shot_classify(image, mask)
    model.set_numerics("official")
    official = model.zero_shot_classify(image, mask)
    assert not torch.equal(fused.embeddings.embeddings, official.embeddings.embeddings)  # two computations
    torch.testing.assert_close(fused.embeddings.embeddings, official.embeddings.embeddings, rtol=0, atol=1e-5, equal_nan=True)
    for a, b in zip(fused.scores, official.scores):
        assert a.status == b.status
        assert (a.probability != a.probability and b.probability != b.probability) or abs(a.probability - b.probability) < 1e-5


def test_fused_float32_is_within_1e6_of_a_float64_run():
    """The criterion of the fused numerics: the exact (float64) probabilities, not another float32 order."""
    model = make_tiny_model()
    image, mask = phantom_volume()
    got = _probs(model, image, mask)
    model.double()
    exact = _probs(model, image, mask)
    assert exact.dtype == torch.float32 and int(exact.isfinite().sum()) >= 3
    model.float()
    again = _probs(model, image, mask)  # back in float32: the prompt cache holds no float64 rows
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.equal(again.nan_to_num(), got.nan_to_num())


def _probs(model, image, mask, **options):
    return torch.tensor([s.probability for s in zero_shot_classify(model, image, mask, **options).scores])


def test_window_batches_group_equal_shapes():
    windows = {"a": _W(), "b": _W(), "c": _W((1, 1, 32, 64, 96)), "d": _W()}
    assert window_batches(windows, 4) == [["a", "b", "d"], ["c"]]
    assert window_batches(windows, 2) == [["a", "b"], ["d"], ["c"]]
    assert window_batches(windows, 1) == [["a"], ["b"], ["d"], ["c"]]


def test_window_batching_and_channels_last_do_not_change_results():
    model = make_tiny_model()
    image, mask = phantom_volume(shape=(32, 64, 64))  # every organ window has the ROI shape
    model.set_numerics("fused", channels_last=False)
    base = _probs(model, image, mask, window_batch_size=1)
    assert base.isfinite().sum() >= 2  # several organs scored, so batching has windows to group
    torch.testing.assert_close(_probs(model, image, mask, window_batch_size=4), base, rtol=0, atol=1e-6, equal_nan=True)
    model.set_numerics("fused", channels_last=True)
    torch.testing.assert_close(_probs(model, image, mask, window_batch_size=4), base, rtol=0, atol=1e-5, equal_nan=True)


def test_bf16_autocast_stays_close():
    model = make_tiny_model()
    image, mask = phantom_volume()
    base = _probs(model, image, mask)
    previous = model.set_numerics("fused", autocast=torch.bfloat16)
    assert model.numerics.describe() == "fused-bf16"
    if fast._accumulates(torch.empty(0, dtype=torch.bfloat16)):  # oneDNN runs the folded backbone in bf16
        assert model.image_path._native_bf16(image)
        with torch.no_grad():
            feats = model.image_path.levels(model.vision, image[None, None, :32, :64, :64])
        assert all(f.dtype == torch.bfloat16 for f in feats)  # no autocast, no float32 copy of the maps
    got = _probs(model, image, mask)
    torch.testing.assert_close(got, base, rtol=0, atol=2e-2, equal_nan=True)
    model.set_numerics(previous)
    assert model.numerics.describe() == "fused"


@pytest.mark.skipif(not fast.inplace_convolutions(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN")
def test_the_native_bf16_backbone_runs_layer_4s_dilated_convolutions_in_float32(monkeypatch):
    """oneDNN's bf16 kernels for dilation 4 are slow: those convolutions (layer 4) take float32 maps
    and weights, the others bf16; the stage outputs stay bf16 and close to the float32 backbone's."""
    model = make_tiny_model(vision=tiny_config().vision.model_copy(update={"layers": (2, 2, 2, 2)}))
    backbone = model.vision.backbone.eval()
    x = torch.rand(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float32 = FoldedBackbone(backbone)(x, channels_last=True)
        calls = []
        conv_add = fast._conv_add_
        monkeypatch.setattr(fast, "_conv_add_", lambda out, x, w, b, conv, **k: calls.append(
            (conv.dilation[0], x.dtype, w.dtype, out.dtype)) or conv_add(out, x, w, b, conv, **k))
        bf16 = FoldedBackbone(backbone)(x.bfloat16(), channels_last=True)
    dilated = [c[1:] for c in calls if c[0] == 4]
    assert len(dilated) == 4 and set(dilated) == {(torch.float32,) * 3}  # both convolutions of 2 blocks
    assert {c[1:] for c in calls if c[0] < 4} == {(torch.bfloat16,) * 3} and len(calls) == 17
    for a, b in zip(bf16, float32):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.05 * float(b.abs().max()))


@pytest.mark.skipif(not fast.inplace_convolutions(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN")
def test_a_frozen_backbone_under_a_bf16_autocast_runs_the_native_bf16_backbone():
    """A training stage with ``precision: bf16`` that freezes the backbone (the normality stage) gets
    the native bf16 folded backbone of the fused-bf16 numerics, not autocast's float32 copies."""
    model = make_tiny_model().eval()
    image = phantom_volume()[0][None, None, :32, :64, :64]
    with torch.no_grad():
        model.set_numerics("fused", autocast=torch.bfloat16)
        native = model.image_path.levels(model.vision, image)
        model.set_numerics("fused")
        float32 = model.image_path.levels(model.vision, image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ambient = model.image_path.levels(model.vision, image)
    assert all(f.dtype == torch.float32 for f in float32)
    for a, b in zip(ambient, native):  # the same computation: the same bits
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_folding_is_done_once_and_redone_when_the_weights_change():
    model = make_tiny_model()
    image, mask = phantom_volume()
    path = model.image_path
    first = encode_volume(model, image, mask)
    folded = path._backbone[1]
    encode_volume(model, image, mask)
    assert path._backbone[1] is folded  # the same folding served the second call
    with torch.no_grad():
        model.vision.backbone.bn1.running_mean.add_(0.5)  # an in-place change of a folded buffer
    changed = encode_volume(model, image, mask)
    assert path._backbone[1] is not folded
    model.set_numerics("official")
    official = encode_volume(model, image, mask)
    torch.testing.assert_close(changed.embeddings, official.embeddings, rtol=0, atol=1e-5, equal_nan=True)
    assert not torch.allclose(changed.embeddings.nan_to_num(), first.embeddings.nan_to_num(), atol=1e-4)


class _W:
    def __init__(self, shape=(1, 1, 32, 64, 64)):
        self.image = torch.zeros(shape)
