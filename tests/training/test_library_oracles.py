"""open_clip and timm as independent oracles of two training pieces that visd implements itself.

* ``open_clip.loss.ClipLoss`` is the hard-target case of :func:`anatomy_alignment_loss` (every row
  valid and abnormal, every sentence distinct: the only positive of a row is its own report). ClipLoss
  cannot express the soft targets or the validity masks, so visd keeps its own loss (docs/dependencies.md).
* ``timm.utils.ModelEmaV3(decay=m, exclude_buffers=True)`` is :func:`update_momentum` (parameters
  averaged, buffers such as BatchNorm statistics copied). visd keeps its own update, whose checkpoint
  keys and rounding the resume tests pin (docs/dependencies.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from timm.utils import ModelEmaV3

from visd.training.losses import anatomy_alignment_loss
from visd.training.stages import _image_modules, make_momentum, update_momentum

from tests.conftest import make_tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_loss_is_the_hard_target_alignment_loss(dtype):
    g = torch.Generator().manual_seed(7)
    b, organs, dim, temperature = 6, 3, 16, 0.07
    image = F.normalize(torch.randn(b, organs, dim, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(b, organs, dim, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    valid = torch.ones(b, organs, dtype=torch.bool)
    abnormal = torch.ones(b, organs, dtype=torch.bool)
    ids = torch.arange(b * organs).reshape(b, organs)
    out = anatomy_alignment_loss(image, text, valid, abnormal, ids, temperature)
    grads = torch.autograd.grad(out.loss, (image, text))

    clip = ClipLoss()
    leaf_i, leaf_t = image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True)
    per_organ = [clip(leaf_i[:, o], leaf_t[:, o], logit_scale=1.0 / temperature) for o in range(organs)]
    expected = torch.stack(per_organ).sum()  # visd sums the organ losses (fVLM)
    expected_grads = torch.autograd.grad(expected, (leaf_i, leaf_t))

    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert out.skipped == {} and expected.item() > 0.5  # a real, non-degenerate loss
    torch.testing.assert_close(out.loss, expected, **tol)
    for o in range(organs):
        torch.testing.assert_close(out.per_organ[o], per_organ[o], **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **tol)


def test_model_ema_v3_is_the_momentum_update():
    model = make_tiny_model(seed=2).train()
    momentum = make_momentum(model)
    ema = ModelEmaV3(copy.deepcopy(_image_modules(model)), decay=0.995, exclude_buffers=True, foreach=False)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        with torch.no_grad():  # a training step's worth of change in parameters and BatchNorm statistics
            for p in _image_modules(model).parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for name, buf in _image_modules(model).named_buffers():
                if buf.is_floating_point():
                    buf.add_(0.1 * torch.rand(buf.shape, generator=g))
        update_momentum(model, momentum, 0.995)
        ema.update(_image_modules(model))
    mine, theirs = dict(_image_modules(momentum).named_parameters()), dict(ema.module.named_parameters())
    online = dict(_image_modules(model).named_parameters())
    assert mine.keys() == theirs.keys()
    moved = False
    for name, p in mine.items():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-6)  # lerp vs multiply-add rounding
        moved |= not torch.allclose(p, online[name])
    assert moved  # the momentum encoder lags the online one: the test compares an average, not a copy
    for name, buf in _image_modules(momentum).named_buffers():
        torch.testing.assert_close(buf, dict(ema.module.named_buffers())[name], rtol=0, atol=0)
