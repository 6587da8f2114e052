"""The three objectives: a few steps on one tiny batch cut each loss; the normality stage sees normal
organs only with the vision encoder frozen; momentum updates; gradient checkpointing (a model method) is exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import make_tiny_model, tiny_config

from visd.training.config import StageConfig
from visd.training.reports import normal_sentence
from visd.training.stages import (
    StageObjective,
    configure_trainable,
    make_momentum,
    momentum_keys,
    set_train_modes,
    unreached_parameters,
    update_momentum,
)

from ._train_helpers import ABNORMAL, ORGANS, batch_from_cases, one_thread, phantom_case  # noqa: F401

ROI = (32, 64, 64)
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0):
    """The tiny model without text dropout, so a fixed batch gives a deterministic loss curve."""
    text = tiny_config().text.model_dump() | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return make_tiny_model(seed, text=text)


def _batch(model, n: int = 2, views: int = 1, abnormal=None):
    abnormal = abnormal or [tuple((i + o) % 2 == 0 for o in range(4)) for i in range(n)]
    cases = [phantom_case(10 + i, shape=ROI, abnormal=abnormal[i]) for i in range(n)]
    texts = [[ABNORMAL[organ] if a else normal_sentence(organ) for organ, a in zip(ORGANS, ab)] for ab in abnormal]
    return batch_from_cases(cases, texts, abnormal, model.tokenizer, views=views)


def _train(objectives, steps, lr, seed=0, numerics="fused"):
    model = _model(seed)
    model.set_numerics(numerics)
    stage = StageConfig(objectives=objectives, lr=lr)
    params = configure_trainable(model, stage)
    batch = _batch(model, views=stage.views)
    momentum = make_momentum(model) if "disease" in objectives else None
    objective = StageObjective(model, stage)
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        set_train_modes(model, stage)
        keys = momentum_keys(model, momentum, batch) if momentum is not None else (None, None)
        out = objective(batch, *keys)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if momentum is not None:
            update_momentum(model, momentum, stage.momentum)
        losses.append(float(out.loss.detach()))
    return losses, out


# Stated fractions (observed cuts with these seeds: alignment ~65%, disease ~33%, normality ~86%).
@pytest.mark.parametrize(
    "objectives, steps, lr, seed, cut",
    [
        (("alignment",), 10, 3e-3, 1, 0.30),
        (("disease",), 6, 1e-3, 0, 0.25),
        (("normality",), 6, 3e-3, 0, 0.50),
    ],
)
def test_a_few_steps_cut_the_loss(objectives, steps, lr, seed, cut):
    losses, out = _train(objectives, steps, lr, seed)
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) <= (1 - cut) * losses[0], losses
    assert float(out.metrics["loss"]) == pytest.approx(losses[-1])


def test_every_trainable_parameter_gets_a_gradient():
    model = _model()
    stage = StageConfig(objectives=("alignment", "disease"))
    params = configure_trainable(model, stage)
    set_train_modes(model, stage)
    batch = _batch(model, views=2)
    momentum = make_momentum(model)
    StageObjective(model, stage)(batch, *momentum_keys(model, momentum, batch)).loss.backward()
    trained = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None, name
        else:
            assert p.grad is None and name.startswith("normality."), name  # the VQ-VAE is frozen by default
    assert not model.normality.training and model.vision.training  # frozen groups run in eval mode
    assert all(p.grad is None for p in momentum.parameters())
    assert model.text is not None and momentum.text is None


def test_normality_stage_uses_normal_organs_only_and_freezes_the_encoder():
    """An abnormal organ must not move the codebook: labelling it abnormal equals erasing it from the mask."""
    results = []
    for erase in (False, True):
        model = _model()
        stage = StageConfig(objectives=("normality",), lr=1e-3)
        params = configure_trainable(model, stage)
        set_train_modes(model, stage)
        vision_before = copy.deepcopy(model.vision.state_dict())
        abnormal = [(True, False, False, False), (False, False, False, False)]
        batch = _batch(model, abnormal=abnormal)
        if erase:  # scan 0's lung is gone, and called normal
            batch.mask[0][batch.mask[0] == 1] = 0
            batch.abnormal[0, 0] = False
        out = StageObjective(model, stage)(batch)
        out.loss.backward()
        torch.optim.AdamW(params, lr=1e-3).step()
        for k, v in model.vision.state_dict().items():  # frozen and in eval mode: weights and BN stats unchanged
            assert torch.equal(v, vision_before[k]), k
        results.append((float(out.loss.detach()), model.normality.quantizer.embeddings.clone(), out.metrics, out.usage))
    (loss_a, codebook_a, metrics, usage), (loss_b, codebook_b, _, erased) = results
    assert loss_a == loss_b and torch.equal(codebook_a, codebook_b)
    assert usage.used("normality") == 7  # 2 scans x 4 organs, minus the abnormal lung
    assert usage.columns()["normality_abnormal"] == 1 and erased.columns()["normality_organ_absent"] == 1
    assert 1.0 <= float(metrics["perplexity"]) <= 16 and 0 <= float(metrics["dead_codes"]) <= 16
    assert float(metrics["reconstruction"]) + float(metrics["commitment"]) == pytest.approx(loss_a, rel=1e-6)


def test_normality_loss_matches_the_model_for_one_organ():
    """With one normal organ the stage's loss is the VQ-VAE's own: recon MSE / 0.5 + commitment
    (the official order on both sides, so the codebooks' EMA steps are equal bit for bit)."""
    model = _model()
    model.set_numerics("official")
    stage = StageConfig(objectives=("normality",))
    configure_trainable(model, stage)
    set_train_modes(model, stage)
    reference = copy.deepcopy(model)
    batch = _batch(model, n=1, abnormal=[(True, True, False, True)])  # only the esophagus is normal
    out = StageObjective(model, stage)(batch)
    with torch.no_grad():
        levels = reference.vision(batch.image)
        from visd.models.vision import organ_token_flags

        flags = organ_token_flags(batch.mask, 4)
        (ref,) = reference.normality([levels[3][0][flags[3][0, 2]]], [2])
    expected = F.mse_loss(ref.decoded, ref.scaled_input) / 0.5 + 0.25 * F.mse_loss(ref.encoded, ref.quantized)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(model.normality.quantizer.embeddings, reference.normality.quantizer.embeddings)  # same EMA step


def test_momentum_update_known_answer():
    model = _model()
    momentum = make_momentum(model)
    before = {k: v.clone() for k, v in momentum.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_momentum(model, momentum, 0.995)
    online = model.state_dict()
    w = "vision.backbone.conv1.weight"
    assert torch.allclose(momentum.state_dict()[w], 0.995 * before[w] + 0.005 * online[w], atol=1e-7)
    assert torch.equal(momentum.state_dict()["normality.quantizer.embeddings"], online["normality.quantizer.embeddings"])
    assert not any(k.startswith("text.") for k in momentum.state_dict())


def test_gradient_checkpointing_is_exact():
    model = _model()
    stage = StageConfig(objectives=("alignment",))
    configure_trainable(model, stage)
    set_train_modes(model, stage, batchnorm="running")
    batch = _batch(model)
    keys = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad()
        loss = StageObjective(model, stage)(batch).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    layer1 = model.vision.backbone.layer1
    layer1.forward = lambda x, f=layer1.forward: calls.append(1) or f(x)  # counts the runs of a stage
    plain = loss_and_grads()
    assert len(calls) == 1
    model.set_grad_checkpointing()
    assert list(model.state_dict()) == keys
    ckpt = loss_and_grads()
    assert len(calls) == 3  # the stage ran again in the backward pass
    model.set_grad_checkpointing(False)
    loss_and_grads()
    assert len(calls) == 4
    assert plain[0] == pytest.approx(ckpt[0], rel=1e-6)
    for name, g in plain[1].items():
        assert torch.allclose(g, ckpt[1][name], rtol=1e-4, atol=1e-7), name


def test_bf16_autocast_matches_fp32():
    model = _model()
    stage = StageConfig(objectives=("alignment", "disease"))
    configure_trainable(model, stage)
    set_train_modes(model, stage, batchnorm="running")
    batch = _batch(model, views=2)
    momentum = make_momentum(model)
    objective = StageObjective(model, stage)
    fp32 = objective(batch, *momentum_keys(model, momentum, batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = objective(batch, *momentum_keys(model, momentum, batch))
    assert bf16.loss.dtype == torch.float32  # the losses upcast half precision
    for name in ("alignment", "disease"):
        assert float(bf16.metrics[name]) == pytest.approx(float(fp32.metrics[name]), rel=0.02)
    bf16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _gradients(model, stage, batch, keys):
    model.zero_grad(set_to_none=True)
    out = StageObjective(model, stage)(batch, *keys)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objectives", [("alignment", "disease"), ("normality",)])
def test_training_through_the_fused_algebra_has_the_official_orders_gradients(objectives):
    """One step's loss and the gradient of every trained parameter (vision, normality, pooling,
    text, temperature; the normality model trainable too) equal the official operation order's
    within float32 rounding."""
    stage = StageConfig(objectives=objectives, freeze=[])
    results = {}
    for numerics in ("official", "fused"):
        model = _model(3)
        model.set_numerics(numerics)
        configure_trainable(model, stage)
        set_train_modes(model, stage)
        batch = _batch(model, views=stage.views)
        keys = momentum_keys(model, make_momentum(model), batch) if "disease" in objectives else (None, None)
        results[numerics] = _gradients(model, stage, batch, keys)
    (loss_o, grads_o), (loss_f, grads_f) = results["official"], results["fused"]
    assert loss_f == pytest.approx(loss_o, rel=1e-5)
    assert grads_o.keys() == grads_f.keys() and len(grads_o) > 20
    assert not all(torch.equal(grads_f[n], g) for n, g in grads_o.items())  # two computations, not one
    trained = [n for n, g in grads_o.items() if g.abs().max() > 0]
    assert any(n.startswith("vision.") for n in trained) == (objectives != ("normality",))
    assert any(n.startswith("normality.encoder.") for n in trained)
    # float32 rounding: relative to the tensor's largest gradient, with a floor of one float32 ulp of
    # the loss (a gradient far below the loss's own rounding cannot be matched more closely)
    floor = loss_o * torch.finfo(torch.float32).eps
    for name, g in grads_o.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(grads_f[name], g, rtol=1e-3, atol=1e-4 * scale + floor, msg=name)


@pytest.mark.parametrize("objectives", [("alignment",), ("disease",), ("normality",)])
def test_fused_and_official_loss_sequences_agree(objectives):
    official, _ = _train(objectives, 4, 1e-3, numerics="official")
    fused, _ = _train(objectives, 4, 1e-3, numerics="fused")
    assert fused[0] == pytest.approx(official[0], rel=1e-5)
    assert fused == pytest.approx(official, rel=1e-3)
    assert fused[-1] != fused[0]  # the steps changed the model


def test_unreached_parameters_known_answer():
    used, unused, frozen_path = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    loss = (used * 2).sum() + (frozen_path.detach() * 3).sum()
    assert unreached_parameters(loss, [used, unused, frozen_path]) == [unused, frozen_path]
    assert unreached_parameters(torch.zeros(()), [used, unused]) == [used, unused]  # no graph


def test_only_unreached_parameters_are_anchored_and_gradients_are_unchanged():
    """An organ absent from every scan of the batch leaves its own pooling parameters out of the loss:
    they get zero gradients (so DDP sees every parameter); every other gradient is bit for bit the one
    that anchoring all parameters (the earlier rule) gave."""
    abnormal = [(True, False, True, False), (False, True, False, True)]
    stage = StageConfig(objectives=("alignment",), freeze=["normality"])
    runs = []
    for anchor_all in (False, True):
        model = _model(0)
        params = configure_trainable(model, stage)
        set_train_modes(model, stage)
        batch = _batch(model, abnormal=abnormal)
        batch.mask[batch.mask == 3] = 0  # no esophagus (organ 2) anywhere
        objective = StageObjective(model, stage)
        out = objective(batch)
        if anchor_all:
            out.loss = out.loss + sum(p.reshape(-1)[:1].sum() for p in params) * 0.0
        out.loss.backward()
        assert all(p.grad is not None for p in params)
        runs.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in runs[0].items():
        assert torch.equal(g, runs[1][name]), name
    esophagus = [n for n in runs[0] if n.startswith("pooling.") and ".2." in n]
    assert esophagus and all(not runs[0][n].any() for n in esophagus)
    assert any(runs[0][n].any() for n in runs[0] if n.startswith("pooling.") and ".0." in n)
