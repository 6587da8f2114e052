"""A real 2-process gloo run: the losses and their gradients equal one process over the whole batch.

Convention checked (see visd.training.losses): the mean over ranks of the returned loss equals the
single-process loss; each rank's gradient w.r.t. its local embeddings, divided by the world size
(what DDP's gradient averaging does to everything upstream), equals the single-process gradient of
those rows; a learnable temperature's gradient averaged over ranks equals the single-process one.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from visd.training.distributed import gather_rows
from visd.training.losses import anatomy_alignment_loss, disease_contrastive_loss

WORLD = 2
SIZES = (3, 2)  # unequal local batches: exercises the padding in gather_rows
O, D = 4, 5


def _global_batch() -> dict[str, torch.Tensor]:
    """The same float64 batch on every process; organs chosen to exercise each rule across ranks."""
    g = torch.Generator().manual_seed(11)
    n = sum(SIZES)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    valid = torch.ones(n, O, dtype=torch.bool)
    abnormal = torch.zeros(n, O, dtype=torch.bool)
    abnormal[[0, 3], 0] = True  # organ 0: abnormal rows on both ranks
    valid[2, 0] = False  # ... and one invalid row
    # organ 1: all normal -> anatomy skips it, disease keeps it
    valid[3:, 2] = False  # organ 2: valid rows on rank 0 only
    abnormal[1, 2] = True
    abnormal[4, 3] = True  # organ 3: the only abnormal row lives on rank 1
    ids = torch.arange(n * O).reshape(n, O)
    ids[[0, 3], 0] = 77  # identical abnormal sentences across ranks
    return {
        "img": unit(torch.randn(n, O, D, generator=g, dtype=torch.float64)),
        "txt": unit(torch.randn(n, O, D, generator=g, dtype=torch.float64)),
        "q": unit(torch.randn(n, O, D, generator=g, dtype=torch.float64)),
        "k": unit(torch.randn(n, O, D, generator=g, dtype=torch.float64)),
        "valid": valid,
        "abnormal": abnormal,
        "ids": ids,
        "w": torch.randn(n, 2, generator=g, dtype=torch.float64),
    }


def _losses(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, object]:
    """Both losses and their gradients on ``rows`` of the batch (all rows for the reference run)."""
    img = batch["img"][rows].clone().requires_grad_(True)
    txt = batch["txt"][rows].clone().requires_grad_(True)
    q = batch["q"][rows].clone().requires_grad_(True)
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    valid, abnormal, ids = batch["valid"][rows], batch["abnormal"][rows], batch["ids"][rows]
    anat = anatomy_alignment_loss(img, txt, valid, abnormal, ids, temp)
    anat.loss.backward()
    dis = disease_contrastive_loss(q, batch["k"][rows], valid, abnormal, temperature=0.2)
    dis.loss.backward()
    return {
        "anat_loss": anat.loss.detach(),
        "anat_organs": {k: v.detach() for k, v in anat.per_organ.items()},
        "anat_skipped": anat.skipped,
        "img_grad": img.grad,
        "txt_grad": txt.grad,
        "temp_grad": temp.grad,
        "dis_loss": dis.loss.detach(),
        "dis_organs": {k: v.detach() for k, v in dis.per_organ.items()},
        "q_grad": q.grad,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        batch = _global_batch()
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        result = _losses(batch, rows)
        # the raw gather: rank r weights the gathered rows by (r + 1) * w
        x = torch.arange(SIZES[rank] * 2, dtype=torch.float64).reshape(-1, 2).add(10 * rank).requires_grad_(True)
        gathered = gather_rows(x)
        ((rank + 1) * batch["w"] * gathered.all).sum().backward()
        result.update(
            gather_all=gathered.all.detach(), gather_grad=x.grad, offset=gathered.offset, sizes=gathered.sizes
        )
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, object]]:
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, 9)
            pytest.fail("the 2-process gloo run did not finish in 90 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, object]:
    return _losses(_global_batch(), slice(None))


def test_gather_rows_forward_and_summed_backward(ranks):
    w = _global_batch()["w"]
    expected = torch.cat(
        [torch.arange(n * 2, dtype=torch.float64).reshape(-1, 2) + 10 * r for r, n in enumerate(SIZES)]
    )
    for r, res in enumerate(ranks):
        assert torch.equal(res["gather_all"], expected)
        assert res["sizes"] == SIZES and res["offset"] == sum(SIZES[:r])
        rows = slice(res["offset"], res["offset"] + SIZES[r])
        # d/dx_r of sum_s (s + 1) * w . all = (1 + 2) * w[rows]
        assert torch.allclose(res["gather_grad"], 3 * w[rows], atol=1e-12)


def test_skip_decisions_use_the_global_batch(ranks, single):
    assert single["anat_skipped"] == {1: "no_abnormal"}
    for res in ranks:
        assert res["anat_skipped"] == single["anat_skipped"]
        assert set(res["anat_organs"]) == {0, 2, 3}


@pytest.mark.parametrize("name", ["anat", "dis"])
def test_loss_mean_over_ranks_equals_single_process(ranks, single, name):
    mean = sum(res[f"{name}_loss"] for res in ranks) / WORLD
    assert mean.item() == pytest.approx(single[f"{name}_loss"].item(), abs=1e-9)
    for organ, value in single[f"{name}_organs"].items():
        organ_mean = sum(res[f"{name}_organs"].get(organ, torch.tensor(0.0)) for res in ranks) / WORLD
        assert organ_mean.item() == pytest.approx(value.item(), abs=1e-9)


@pytest.mark.parametrize("grad", ["img_grad", "txt_grad", "q_grad"])
def test_local_gradients_over_world_size_equal_single_process(ranks, single, grad):
    distributed = torch.cat([res[grad] for res in ranks]) / WORLD
    assert single[grad].abs().sum() > 0
    assert torch.allclose(distributed, single[grad], atol=1e-10, rtol=0)


def test_temperature_gradient_averaged_over_ranks(ranks, single):
    averaged = sum(res["temp_grad"] for res in ranks) / WORLD
    assert single["temp_grad"].abs().item() > 0
    assert averaged.item() == pytest.approx(single["temp_grad"].item(), abs=1e-9)
