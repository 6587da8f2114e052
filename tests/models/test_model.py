"""ViSDModel's public API on a tiny random model."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_model, phantom_volume
from visd import InputError, ViSDModel
from visd.config import FindingSpec
from visd.models.inputs import as_volume


def test_encode_text_normalised_and_batch_equivariant(tiny_model):
    texts = ["Emphysema.", "Not Emphysema.", "pleural effusion"]
    with torch.no_grad():
        a = tiny_model.encode_text(texts)
        b = tiny_model.encode_text(texts[::-1])
        raw = tiny_model.encode_text(texts, normalize=False)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(a, b.flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, torch.nn.functional.normalize(raw, dim=-1))


def test_zero_shot_reports_absent_organs_and_matches_manual_softmax(tiny_model):
    image, mask = phantom_volume()
    result = tiny_model.zero_shot_classify(image, mask)
    assert [s.finding for s in result.scores] == [f.name for f in tiny_model.config.findings]
    aorta = result["Arterial wall calcification"]
    assert math.isnan(aorta.probability) and aorta.status == "organ_absent"
    lung = result["Emphysema"]
    assert lung.status == "scored" and 0.0 < lung.probability < 1.0
    with torch.no_grad():
        text = tiny_model.encode_text(["Not Emphysema.", "Emphysema."])
    logits = (result.embeddings["lung"] @ text.t() / tiny_model.temperature).detach()
    assert lung.probability == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-6)
    df = result.to_pandas()
    assert list(df.columns) == ["organ", "finding", "probability", "status"]
    assert (df.status == "organ_absent").sum() == 1


def test_encode_image_equals_window_embedding_of_each_organ(tiny_model):
    image, mask = phantom_volume()
    emb = tiny_model.encode_image(image, mask)
    assert emb.status["aorta"] == "organ_absent" and torch.isnan(emb["aorta"]).all()
    from visd.inference.windows import organ_window

    w = organ_window(image, mask, 2, tiny_model.config.preprocess.roi)
    direct = tiny_model.encode_window(w.image[0, 0], w.mask[0, 0], organs=["esophagus"], target="esophagus")
    torch.testing.assert_close(emb["esophagus"], direct["esophagus"])
    assert emb.details["esophagus"].window_start == w.start


def test_numpy_and_batched_inputs_give_the_same_result(tiny_model):
    image, mask = phantom_volume()
    a = tiny_model.zero_shot_classify(image, mask).probabilities
    b = tiny_model.zero_shot_classify(image.numpy()[None], mask.numpy().astype(np.uint8)[None]).probabilities
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], abs=1e-7)


def test_custom_findings_and_prompt_ensembles(tiny_model):
    image, mask = phantom_volume()
    findings = [
        ("heart", "Cardiomegaly", "Not Cardiomegaly.", "Cardiomegaly."),
        {"organ": "lung", "name": "Opacity", "negative": ["no opacity", "clear lung"], "positive": ["opacity"]},
        FindingSpec(organ="esophagus", name="Hernia", negative=("Not Hiatal hernia.",), positive=("Hiatal hernia.",)),
    ]
    result = tiny_model.zero_shot_classify(image, mask, findings=findings)
    assert [s.organ for s in result.scores] == ["heart", "lung", "esophagus"]
    with torch.no_grad():
        e = tiny_model.encode_text(["no opacity", "clear lung", "opacity"])
    neg = torch.nn.functional.normalize(e[:2].mean(0), dim=-1)
    logits = (result.embeddings["lung"] @ torch.stack([neg, e[2]]).t() / tiny_model.temperature).detach()
    assert result["Opacity"].probability == pytest.approx(float(torch.softmax(logits, -1)[1]), abs=1e-6)


def test_unknown_organ_gets_did_you_mean(tiny_model):
    image, mask = phantom_volume()
    with pytest.raises(InputError, match="Did you mean 'heart'"):
        tiny_model.zero_shot_classify(image, mask, findings=[("haert", "X", "Not X.", "X.")])


@pytest.mark.parametrize(
    "image_shape, mask_shape, mask_value, match",
    [
        ((40, 80, 72), (40, 80, 71), 1, "differ in shape"),
        ((2, 40, 80, 72), (2, 40, 80, 72), 1, r"\(D, H, W\)"),
        ((40, 80, 72), (40, 80, 72), 9, "outside 0..4"),
    ],
)
def test_bad_inputs_are_named(tiny_model, image_shape, mask_shape, mask_value, match):
    image = torch.rand(image_shape)
    mask = torch.zeros(mask_shape, dtype=torch.int64)
    mask[..., 10:20, 10:20, 10:20] = mask_value
    with pytest.raises(InputError, match=match):
        tiny_model.zero_shot_classify(image, mask)


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]])
def test_non_finite_image_is_refused(tiny_model, bad):
    image, mask = phantom_volume()
    for i, value in enumerate(bad):
        image[3, 3, 3 + i] = value
    with pytest.raises(InputError, match="NaN or infinite"):
        tiny_model.encode_image(image, mask)


def test_finite_image_whose_sum_overflows_is_accepted():
    image = torch.full((4, 4, 4), 3e38)  # finite values, float32 sum is inf
    assert not torch.isfinite(image.sum())
    assert torch.equal(as_volume(image, "image", num_organs=None, device=torch.device("cpu")), image)


def test_negative_label_is_refused():
    mask = torch.zeros(4, 4, 4, dtype=torch.int64)
    mask[1, 1, 1] = -2
    with pytest.raises(InputError, match=r"labels \[-2\] outside 0..4"):
        as_volume(mask, "organ_mask", num_organs=4, device=torch.device("cpu"))


def test_forward_gives_every_trainable_parameter_a_gradient():
    model = make_tiny_model().train()
    image, mask = phantom_volume(shape=(32, 64, 64))
    image2, mask2 = phantom_volume(shape=(32, 64, 64), seed=1)
    mask2[mask2 == 3] = 4  # aorta present in the second sample
    ids, am = model.tokenize(["lung shows no significant abnormalities.", "emphysema", "cardiomegaly", "effusion"])
    out = model(torch.stack([image, image2])[:, None], torch.stack([mask, mask2])[:, None], ids, am)
    assert out.organ_valid.tolist() == [[True, True, True, False], [True, True, False, True]]
    logits = out.organ_embeddings.reshape(-1, 32) @ out.text_embeddings.t() / out.temperature
    loss = logits.logsumexp(-1).mean()  # the normality model learns through the reconstruction it feeds the pooling
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_forward_batch_permutation_equivariance():
    model = make_tiny_model()
    a, ma = phantom_volume(shape=(32, 64, 64))
    b, mb = phantom_volume(shape=(32, 64, 64), seed=3)
    with torch.no_grad():
        x = model(torch.stack([a, b])[:, None], torch.stack([ma, mb]))
        y = model(torch.stack([b, a])[:, None], torch.stack([mb, ma]))
    torch.testing.assert_close(x.organ_embeddings, y.organ_embeddings.flip(0), rtol=1e-4, atol=1e-5)


def test_model_without_tokenizer_says_how_to_fix():
    model = ViSDModel(make_tiny_model().config, tokenizer=None)
    with pytest.raises(InputError, match="tokenizer"):
        model.encode_text(["x"])


def test_retired_numerics_attributes_say_what_replaced_them(tiny_model):
    """Setting an option of earlier releases would silently do nothing; it raises and names the replacement."""
    before = tiny_model.numerics
    for name, hint in (("official_numerics", "set_numerics('official')"), ("window_batch_size", "window_batch_size=")):
        with pytest.raises(AttributeError, match=re.escape(hint)):
            setattr(tiny_model, name, True)
    assert tiny_model.numerics == before
