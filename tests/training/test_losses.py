"""Single-process tests of visd.training.losses: hand-computed values, a loop-based numpy reference, rules."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from visd.errors import ConfigError, InputError
from visd.training.losses import (
    anatomy_alignment_loss,
    codebook_usage,
    disease_contrastive_loss,
    hash_texts,
    momentum_update,
    normality_loss,
)

LOG1P_INV_E = math.log(1.0 + math.exp(-1.0))  # -log(e / (e + 1)) = 0.3132616875...


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def _soft_ce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-(targets * _log_softmax(logits)).sum(1).mean())


def _one_organ(*arrays):
    """(B, D) / (B,) arrays -> (B, 1, D) / (B, 1) tensors."""
    out = []
    for a in arrays:
        t = torch.as_tensor(np.asarray(a))
        out.append(t.unsqueeze(1))
    return out


# ---------------------------------------------------------------- anatomy-level alignment (fVLM rule)


def test_anatomy_two_abnormal_orthogonal_known_answer():
    # img = txt = e1, e2; both abnormal, different texts: logits [[1, 0], [0, 1]], hard targets
    e = torch.eye(2, dtype=torch.float64)
    img, txt, valid, abn, ids = _one_organ(e, e, [True, True], [True, True], [3, 4])
    out = anatomy_alignment_loss(img, txt, valid, abn, ids, temperature=1.0)
    assert out.loss.item() == pytest.approx(LOG1P_INV_E, abs=1e-7)
    assert out.per_organ[0].item() == pytest.approx(LOG1P_INV_E, abs=1e-7)
    assert out.skipped == {}


def test_anatomy_soft_targets_worked_example():
    # 0, 1 normal (different sentences: the normal-normal rule), 2, 3 abnormal with the identical
    # sentence (id 5), 4 abnormal alone. Targets written out by hand:
    targets = np.array(
        [
            [0.5, 0.5, 0, 0, 0],
            [0.5, 0.5, 0, 0, 0],
            [0, 0, 0.5, 0.5, 0],
            [0, 0, 0.5, 0.5, 0],
            [0, 0, 0, 0, 1.0],
        ]
    )
    img = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8], [-1.0, 0.0]])
    txt = np.array([[0.8, 0.6], [1.0, 0.0], [0.0, -1.0], [-0.8, 0.6], [-0.6, -0.8]])
    t = 0.5
    logits = img @ txt.T / t
    expected = 0.5 * (_soft_ce(logits, targets) + _soft_ce(logits.T, targets))
    args = _one_organ(img, txt, [True] * 5, [False, False, True, True, True], [1, 2, 5, 5, 6])
    out = anatomy_alignment_loss(*args, temperature=t)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # the same numbers with plain hard (CLIP) targets differ, so the soft rule is really in effect
    assert abs(expected - 0.5 * (_soft_ce(logits, np.eye(5)) + _soft_ce(logits.T, np.eye(5)))) > 1e-2


def test_anatomy_invalid_rows_excluded_from_rows_and_columns():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 3))
    txt = rng.normal(size=(4, 3))
    img[2] *= 1e3  # an invalid row with wild values must not matter at all
    txt[2] = np.nan
    valid = [True, True, False, True]
    abnormal = [True, False, True, False]
    ids = [1, 2, 3, 4]
    img_t, txt_t, v, a, i = _one_organ(img, txt, valid, abnormal, ids)
    img_t.requires_grad_(True)
    out = anatomy_alignment_loss(img_t, txt_t, v, a, i, temperature=0.3)
    keep = [0, 1, 3]
    ref = anatomy_alignment_loss(*_one_organ(img[keep], txt[keep], [True] * 3, [True, False, False], [1, 2, 4]), 0.3)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-9)
    out.loss.backward()
    assert torch.all(img_t.grad[2] == 0)
    assert torch.all(img_t.grad[[0, 1, 3]].abs().sum(-1) > 0)


def test_anatomy_skip_rules():
    rng = np.random.default_rng(1)
    b, o, d = 4, 4, 3
    img = torch.tensor(rng.normal(size=(b, o, d)))
    txt = torch.tensor(rng.normal(size=(b, o, d)))
    valid = torch.ones(b, o, dtype=torch.bool)
    abnormal = torch.zeros(b, o, dtype=torch.bool)
    ids = torch.arange(b * o).reshape(b, o)
    abnormal[0, 0] = True  # organ 0 counts
    # organ 1: all normal -> skipped
    abnormal[1, 2] = True  # organ 2: its only abnormal row is invalid -> skipped
    valid[1, 2] = False
    abnormal[:2, 3] = True  # organ 3: two valid rows, both abnormal with one sentence -> uniform targets
    valid[2:, 3] = False
    ids[:2, 3] = 9
    out = anatomy_alignment_loss(img, txt, valid, abnormal, ids, temperature=0.1)
    assert out.skipped == {1: "no_abnormal", 2: "no_abnormal", 3: "uniform_targets"}
    assert list(out.per_organ) == [0]
    single = anatomy_alignment_loss(img[:, :1], txt[:, :1], valid[:, :1], abnormal[:, :1], ids[:, :1], 0.1)
    assert out.loss.item() == pytest.approx(single.loss.item(), abs=1e-12)


def test_anatomy_all_skipped_is_zero_and_backpropagates():
    img = torch.randn(3, 2, 4, requires_grad=True)
    txt = torch.randn(3, 2, 4, requires_grad=True)
    temp = torch.tensor(0.07, requires_grad=True)
    false = torch.zeros(3, 2, dtype=torch.bool)
    out = anatomy_alignment_loss(img, txt, ~false, false, torch.zeros(3, 2, dtype=torch.long), temp)
    assert out.loss.item() == 0.0 and out.per_organ == {}
    out.loss.backward()
    assert torch.all(img.grad == 0) and torch.all(txt.grad == 0) and temp.grad.item() == 0.0


def _reference_anatomy(img, txt, valid, abnormal, ids, t):
    """Loop-by-loop numpy transcription of the rule, written independently of the implementation."""
    total = 0.0
    per_organ = {}
    for o in range(img.shape[1]):
        rows = [i for i in range(img.shape[0]) if valid[i, o]]
        if not any(abnormal[i, o] for i in rows):
            continue
        n = len(rows)
        pos = np.zeros((n, n))
        for a, i in enumerate(rows):
            for c, j in enumerate(rows):
                both_normal = not abnormal[i, o] and not abnormal[j, o]
                pos[a, c] = float(i == j or both_normal or ids[i, o] == ids[j, o])
        if pos.min() == 1.0:
            continue
        tgt = pos / pos.sum(1, keepdims=True)
        logits = img[rows, o] @ txt[rows, o].T / t
        per_organ[o] = 0.5 * (_soft_ce(logits, tgt) + _soft_ce(logits.T, tgt))
        total += per_organ[o]
    return total, per_organ


def test_anatomy_matches_numpy_reference_on_random_batch():
    rng = np.random.default_rng(2)
    b, o, d = 9, 5, 6
    img = rng.normal(size=(b, o, d))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt = rng.normal(size=(b, o, d))
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    valid = rng.random((b, o)) < 0.8
    abnormal = rng.random((b, o)) < 0.4
    abnormal[:, 1] = False
    ids = np.where(abnormal, rng.integers(0, 3, size=(b, o)), 100 + rng.integers(0, 2, size=(b, o)))
    ref_total, ref_per = _reference_anatomy(img, txt, valid, abnormal, ids, 0.07)
    out = anatomy_alignment_loss(
        torch.tensor(img), torch.tensor(txt), torch.tensor(valid), torch.tensor(abnormal), torch.tensor(ids), 0.07
    )
    assert set(out.per_organ) == set(ref_per) and 1 in out.skipped
    for k, v in ref_per.items():
        assert out.per_organ[k].item() == pytest.approx(v, rel=1e-5)
    assert out.loss.item() == pytest.approx(ref_total, rel=1e-5)


def test_anatomy_and_disease_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    abnormal = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [0, 1]], dtype=torch.bool)
    ids = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [7, 8]])
    assert torch.autograd.gradcheck(
        lambda i, t, tt: anatomy_alignment_loss(i, t, valid, abnormal, ids, tt).loss, (img, txt, temp)
    )
    key = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: disease_contrastive_loss(q, key, valid, abnormal, 0.3).loss, (img,))


def test_anatomy_rejects_bad_inputs():
    img = torch.randn(2, 3, 4)
    ok = torch.ones(2, 3, dtype=torch.bool)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(InputError, match=r"\(B, O, D\)"):
        anatomy_alignment_loss(img, torch.randn(2, 3, 5), ok, ok, ids, 0.07)
    with pytest.raises(InputError, match="valid must be \\(B, O\\)"):
        anatomy_alignment_loss(img, img, ok[:, :2], ok, ids, 0.07)
    with pytest.raises(InputError, match="bool"):
        anatomy_alignment_loss(img, img, ok, ok.long(), ids, 0.07)
    with pytest.raises(InputError, match="hash_texts"):
        anatomy_alignment_loss(img, img, ok, ok, ids.float(), 0.07)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        anatomy_alignment_loss(img, img, ok, ok, ids, 0.0)


def test_hash_texts_equal_iff_identical_and_stable():
    ids = hash_texts([["liver is normal.", "a"], ["liver is normal.", "a "]])
    assert ids.dtype == torch.int64 and ids.shape == (2, 2)
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] != ids[1, 1]
    assert bool((ids >= 0).all())
    # a fixed value: BLAKE2b is not salted per process (Python's hash() is)
    assert hash_texts([["x"]]).item() == hash_texts([["x"]]).item()
    import subprocess

    code = "from visd.training.losses import hash_texts; print(hash_texts([['liver is normal.']]).item())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout.strip()) == ids[0, 0].item()
    with pytest.raises(InputError, match="B rows of O strings"):
        hash_texts([["a", "b"], ["c"]])


# ---------------------------------------------------------------- disease-level contrastive


def test_disease_two_abnormal_known_answer():
    e = torch.eye(2, dtype=torch.float64)
    q, k, valid, abn = _one_organ(e, e, [True, True], [True, True])
    out = disease_contrastive_loss(q, k, valid, abn, temperature=1.0)
    assert out.loss.item() == pytest.approx(LOG1P_INV_E, abs=1e-7)


def test_disease_two_normal_are_positives_known_answer():
    # logits row 0 = [1, 0]; both keys positive: -(1/2)(log p0 + log p1) = log(1 + 1/e) + 1/2
    e = torch.eye(2, dtype=torch.float64)
    q, k, valid, abn = _one_organ(e, e, [True, True], [False, False])
    out = disease_contrastive_loss(q, k, valid, abn, temperature=1.0)
    assert out.loss.item() == pytest.approx(LOG1P_INV_E + 0.5, abs=1e-7)


def test_disease_worked_example_positive_sets():
    # 0, 1 normal (positives of each other), 2 abnormal (only its own key), 3 invalid
    q = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [5.0, 5.0]])
    k = np.array([[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [1.0, 0.0]])
    t = 0.2
    logits = q[:3] @ k[:3].T / t
    lp = _log_softmax(logits)
    expected = np.mean([-(lp[0, 0] + lp[0, 1]) / 2, -(lp[1, 0] + lp[1, 1]) / 2, -lp[2, 2]])
    qt, kt, v, a = _one_organ(q, k, [True, True, True, False], [False, False, True, True])
    kt.requires_grad_(True)
    qt.requires_grad_(True)
    out = disease_contrastive_loss(qt, kt, v, a, temperature=t)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    assert kt.grad is None  # keys come from the momentum encoder: no gradient
    assert torch.all(qt.grad[3] == 0)


def test_disease_reduction_over_organs():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 3, 5, generator=g)
    k = torch.randn(4, 3, 5, generator=g)
    valid = torch.ones(4, 3, dtype=torch.bool)
    valid[:, 2] = False
    abnormal = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    mean = disease_contrastive_loss(q, k, valid, abnormal, reduction="mean")
    total = disease_contrastive_loss(q, k, valid, abnormal, reduction="sum")
    assert mean.skipped == {2: "no_valid"} and set(mean.per_organ) == {0, 1}
    organ_sum = sum(v.item() for v in total.per_organ.values())
    assert total.loss.item() == pytest.approx(organ_sum, rel=1e-6)
    assert mean.loss.item() == pytest.approx(organ_sum / 2, rel=1e-6)
    with pytest.raises(ConfigError, match="Did you mean 'mean'"):
        disease_contrastive_loss(q, k, valid, abnormal, reduction="maen")


def test_momentum_update_ema_and_buffers():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    momentum = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in momentum.parameters():
            p.fill_(0.0)
        online[1].running_mean.fill_(3.0)
        online[1].num_batches_tracked.fill_(7)
    momentum_update(online, momentum, m=0.9)
    for p in momentum.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1))
    momentum_update(online, momentum, m=0.9)
    for p in momentum.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.19))  # 0.9 * 0.1 + 0.1
    assert torch.all(momentum[1].running_mean == 3.0) and momentum[1].num_batches_tracked.item() == 7
    with pytest.raises(InputError, match="only in online"):
        momentum_update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        momentum_update(online, momentum, m=1.5)


# ---------------------------------------------------------------- normality VQ-VAE pieces


def test_normality_loss_known_values_and_gradient_routing():
    target = torch.zeros(3, 4)
    recon = torch.ones(3, 4, requires_grad=True)  # mse 1 -> / 0.5 = 2
    z = torch.full((3, 2), 2.0, requires_grad=True)
    q = torch.zeros(3, 2, requires_grad=True)  # mse 4 -> * 0.25 = 1
    out = normality_loss(recon, target, z, q)
    assert out.reconstruction.item() == pytest.approx(2.0)
    assert out.commitment.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(3.0)
    out.loss.backward()
    assert q.grad is None  # sg(q): the EMA codebook is not trained by gradient
    assert torch.allclose(z.grad, torch.full_like(z, 0.25 * 2 * 2.0 / z.numel()))
    assert torch.allclose(recon.grad, torch.full_like(recon, 2 * 1.0 / recon.numel() / 0.5))


def test_codebook_usage_known_histograms():
    u = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert u.perplexity.item() == pytest.approx(2.0) and u.unused_codes == 2 and u.dead_codes is None
    assert u.counts.tolist() == [2, 2, 0, 0]
    assert codebook_usage(torch.tensor([[3, 2], [1, 0]]), 4).perplexity.item() == pytest.approx(4.0)
    skewed = codebook_usage(torch.tensor([0, 0, 0, 1]), 2)
    assert skewed.perplexity.item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert codebook_usage(torch.tensor([5, 5, 5]), 8).perplexity.item() == pytest.approx(1.0)
    ema = codebook_usage(torch.tensor([0, 1]), 4, ema_cluster_size=torch.tensor([5.0, 0.5, 0.0, 2.0]))
    assert ema.dead_codes == 2 and ema.unused_codes == 2
    with pytest.raises(InputError, match="out of range"):
        codebook_usage(torch.tensor([0, 4]), 4)
    with pytest.raises(InputError, match="integer"):
        codebook_usage(torch.tensor([0.0]), 4)
