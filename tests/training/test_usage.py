"""Which organs each objective used: one rule (window_status) for inference, the training forward
and the normality stage, known counts on phantom crops, the reasons of each objective, and the
no-organ check of a stage."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_model, tiny_config

from visd.errors import InputError
from visd.models.windows import window_status
from visd.training.data import Batch
from visd.training.config import StageConfig
from visd.training.reports import normal_sentence
from visd.training.stages import StageObjective, configure_trainable, make_momentum, momentum_keys, set_train_modes
from visd.training.summary import StageTally, format_summary
from visd.training.usage import (
    OBJECTIVE_REASONS,
    OrganUsage,
    alignment_counts,
    disease_counts,
    normality_counts,
    reduce_usage,
    usage_columns,
)

from ._train_helpers import ABNORMAL, ORGANS, batch_from_cases, one_thread, phantom_case  # noqa: F401

ROI = (32, 64, 64)
pytestmark = pytest.mark.usefixtures("one_thread")


def _masks() -> torch.Tensor:
    """Two crops: scan 0 has lung inside, heart touching the border (index 1 on H), no esophagus,
    aorta inside; scan 1 has only the aorta, touching the last plane of W."""
    m = torch.zeros(2, 1, *ROI, dtype=torch.uint8)
    m[0, 0, 5:10, 5:10, 5:10] = 1
    m[0, 0, 12:20, 1:8, 20:30] = 2
    m[0, 0, 20:25, 40:50, 40:50] = 4
    m[1, 0, 10:20, 10:20, 60:64] = 4
    return m


def test_inference_training_and_the_normality_stage_apply_one_rule():
    """Heart touching the border at index 1, the aorta of scan 1 at the last plane: inference, the
    training forward and the normality stage all leave exactly those out, as window_status says."""
    mask = _masks()
    codes = window_status(mask, 4)
    assert codes.tolist() == [[0, 2, 1, 0], [1, 1, 1, 2]]
    model = make_tiny_model()
    image = torch.rand(2, 1, *ROI)
    with torch.no_grad():
        windows = model.embed_windows(image, mask[:, 0])  # inference
        out = model(image, mask)  # the training forward
    assert [[w.status[o] for o in ORGANS] for w in windows] == [
        ["scored", "touches_window_border", "organ_absent", "scored"],
        ["organ_absent", "organ_absent", "organ_absent", "touches_window_border"],
    ]
    assert torch.equal(out.organ_status, codes) and torch.equal(out.organ_valid, codes == 0)
    assert bool(out.organ_embeddings[0, 1].eq(0).all()) and not bool(out.organ_embeddings[0, 0].eq(0).all())
    stage = StageConfig(objectives=("normality",))
    configure_trainable(model, stage)
    set_train_modes(model, stage)
    texts = [[normal_sentence(o) for o in ORGANS]] * 2
    batch = Batch(torch.arange(2), image, mask, torch.zeros(2, 4, dtype=torch.bool), texts)
    used = StageObjective(model, stage)(batch).usage
    assert used.counts["normality"][:, :3].tolist() == [[1, 1, 0], [0, 1, 1], [0, 2, 0], [1, 0, 1]]


def test_counts_of_each_objective():
    codes = torch.tensor([[0, 2, 1, 0], [0, 1, 1, 2]])
    a = alignment_counts(codes, {3: "no_abnormal"})
    assert a[:, 0].tolist() == [2, 0, 0, 0] and a[3].tolist() == [0, 0, 1, 1, 0]
    assert a.sum().item() == 8  # every (scan, organ) pair once
    codes2 = torch.tensor([[2, 0, 1, 0], [0, 2, 0, 0]])
    d = disease_counts(codes, codes2)  # absent in either view wins over the border
    assert d.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [0, 2, 0, 0], [1, 0, 1, 0]]
    n = normality_counts(codes, torch.tensor([[True, False, False, False], [False, False, False, False]]))
    assert n.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 2, 0, 0], [1, 0, 1, 0]]
    usage = reduce_usage({"alignment": a, "disease": d, "normality": n}, torch.device("cpu"))
    # the disease objective has one valid lung and one valid aorta: no negative, so neither counts
    assert usage.used("disease") == 0 and usage.columns()["disease_no_negative"] == 2
    assert usage.unused_objectives() == ["disease"]
    assert usage.used("alignment") == 2 and usage.used("normality") == 2
    assert set(usage.columns()) == set(usage_columns())
    assert usage.describe("alignment", ORGANS) == (
        "used 2 of 8 (scan, organ) pairs; not used: organ_absent 3 (heart 1, esophagus 2), "
        "touches_window_border 2 (heart 1, aorta 1), no_abnormal 1 (aorta 1)"
    )
    twice = usage + usage
    assert twice.used("alignment") == 4 and OrganUsage.from_state(twice.to_state()).counts.keys() == twice.counts.keys()
    assert all(torch.equal(v, twice.counts[k]) for k, v in OrganUsage.from_state(twice.to_state()).counts.items())


def _batch(model, n, abnormal, views):
    cases = [phantom_case(10 + i, shape=ROI, abnormal=abnormal[i]) for i in range(n)]
    texts = [[ABNORMAL[organ] if a else normal_sentence(organ) for organ, a in zip(ORGANS, ab)] for ab in abnormal]
    return batch_from_cases(cases, texts, abnormal, model.tokenizer, views=views)


def test_the_objectives_report_what_they_used():
    model = make_tiny_model()
    stage = StageConfig(objectives=("alignment", "disease"))
    configure_trainable(model, stage)
    set_train_modes(model, stage)
    # two scans, all four organs inside; the lung abnormal in scan 0 only, every other organ normal
    abnormal = [(True, False, False, False), (False, False, False, False)]
    batch = _batch(model, 2, abnormal, views=2)
    out = StageObjective(model, stage)(batch, *momentum_keys(model, make_momentum(model), batch))
    cols = out.usage.columns()
    # alignment: only the lung has an abnormal case; disease: every organ has two valid cases
    assert (cols["alignment_organs"], cols["alignment_no_abnormal"]) == (2, 6)
    assert (cols["disease_organs"], cols["disease_no_negative"]) == (8, 0)
    # one scan: the disease loss has no negative anywhere and is exactly 0, and the usage says so
    one = _batch(model, 1, abnormal[:1], views=2)
    out = StageObjective(model, stage)(one, *momentum_keys(model, make_momentum(model), one))
    assert float(out.metrics["disease"]) == 0.0 and out.usage.used("disease") == 0
    assert out.usage.columns()["disease_no_negative"] == 4 and out.usage.columns()["alignment_uniform_targets"] == 1


def test_a_stage_without_organs_is_an_error_with_the_reason_and_a_hint():
    config = tiny_config()
    tally = StageTally("alignment+disease", ("alignment", "disease"), ORGANS)
    border = torch.zeros(4, 5, dtype=torch.int64)
    border[:, 2] = 2  # every organ of two scans touches the border
    for _ in range(3):
        tally.add({"alignment": 0.0, "disease": 0.0}, OrganUsage({"alignment": border.clone(), "disease": border[:, :4].clone()}))
    error = tally.failure(config, [(32, 135, 177)])
    assert isinstance(error, InputError)
    msg = str(error)
    assert msg.startswith("stage 'alignment+disease': the alignment and disease objectives used no organ in 3 steps")
    assert "touches_window_border 24 (lung 6, heart 6, esophagus 6, aorta 6)" in msg
    assert f"preprocess.roi {config.preprocess.roi}" in msg and "organ_absent:" not in msg
    assert "(5, 20, 20); here (32, 135, 177))" in msg
    # one used pair is enough; the summary reports it
    used = border.clone()
    used[0] = torch.tensor([1, 0, 1, 0, 0])
    tally.add({"alignment": 0.3, "disease": 0.6}, OrganUsage({"alignment": used, "disease": used[:, :4].clone()}))
    assert tally.failure(config) is None
    s = tally.summary()
    assert s["steps"] == 4 and s["organs"] == {"alignment": 1, "disease": 1} and s["loss"]["disease"] == pytest.approx(0.15)
    assert "alignment  mean loss 0.0750  organs used 1 of 32 (not used: touches_window_border 31)" in format_summary([s])
    assert StageTally("alignment+disease", ("alignment", "disease"), ORGANS, tally.to_state()).summary() == s  # survives a checkpoint
    assert set(OBJECTIVE_REASONS) == {"alignment", "disease", "normality"}
