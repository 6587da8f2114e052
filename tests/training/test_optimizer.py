"""make_optimizer: the stage's AdamW, fused where PyTorch has it, the same updates as the plain loop."""

from __future__ import annotations

import copy

import torch
from tests.conftest import make_tiny_model

from visd.training.config import StageConfig
from visd.training.engine import _TORCH_VERSION, make_optimizer
from visd.training.stages import configure_trainable


def test_fused_adamw_on_the_cpu_takes_the_plain_loops_steps():
    stage = StageConfig(objectives=("alignment",), lr=1e-2, weight_decay=0.05)
    model = make_tiny_model()
    params = configure_trainable(model, stage)
    optimizer = make_optimizer(model, params, stage)
    assert optimizer.defaults["fused"] is (True if _TORCH_VERSION >= (2, 4) else None)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and any(p is model.temperature for p in no_decay["params"])

    initial = [p.detach().clone() for p in params]
    reference = copy.deepcopy(model)
    twin = {id(p): q for p, q in zip(model.parameters(), reference.parameters())}
    ref_params = [twin[id(p)] for p in params]
    plain = torch.optim.AdamW(
        [{"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups],
        lr=stage.lr, betas=stage.betas, eps=stage.eps, foreach=False,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for p, q, p0 in zip(params, ref_params, initial):
        assert (p - p0).abs().max() > 1e-4  # three steps of lr 1e-2 moved every parameter
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)  # float rounding of the same formula
