"""Checkpoint files: atomic writes, safe loading only, pruning, RNG state round trips."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from visd.errors import CheckpointMismatchError
from visd.training import checkpoint as ckpt


class Payload:
    """An arbitrary class: unpickling it would import and run code from this module."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _state(step: int) -> dict:
    return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "position": {"step": step}, "w": torch.full((3,), float(step))}


def test_atomic_save_round_trip_and_no_temporaries(tmp_path):
    path = ckpt.atomic_save(_state(7), ckpt.checkpoint_path(tmp_path, 7))
    assert path.name == "step-000000007.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    state = ckpt.load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((3,), 7.0)) and state["position"] == {"step": 7}


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 1)
    ckpt.atomic_save(_state(1), path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save(_state(2), path)
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.full((3,), 1.0))  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # temporary removed


def test_loading_refuses_pickled_objects_and_damage(tmp_path):
    evil = tmp_path / "step-000000001.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": Payload()}, evil)
    with pytest.raises(CheckpointMismatchError, match="only plain tensors"):
        ckpt.load_checkpoint(evil)
    damaged = tmp_path / "step-000000002.pt"
    ckpt.atomic_save(_state(2), damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(CheckpointMismatchError, match="damaged"):
        ckpt.load_checkpoint(damaged)
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(1)}, other)
    with pytest.raises(CheckpointMismatchError, match="not a visd training checkpoint"):
        ckpt.load_checkpoint(other)


def test_latest_skips_unreadable_and_prune_keeps_newest(tmp_path):
    for step in (2, 10, 4, 6):
        ckpt.atomic_save(_state(step), ckpt.checkpoint_path(tmp_path, step))
    (tmp_path / ".step-000000012.pt.tmp-99").write_bytes(b"half")
    ckpt.checkpoint_path(tmp_path, 10).write_bytes(b"garbage")
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000000002.pt", "step-000000004.pt", "step-000000006.pt", "step-000000010.pt"]
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step-000000006.pt" and state["position"]["step"] == 6
    assert [p.name for p in ckpt.remove_temporaries(tmp_path)] == [".step-000000012.pt.tmp-99"]
    deleted = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000000002.pt", "step-000000004.pt"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000006.pt", "step-000000010.pt"]


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and one in numpy's
    saved = ckpt.rng_state()
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "rng": [saved]}, tmp_path / "step-000000001.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.random(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "step-000000001.pt")["rng"][0])
    got = (random.random(), random.gauss(0, 1), np.random.random(3).tolist(), np.random.standard_normal(),
           torch.rand(3).tolist())
    assert got == expected
    assert os.listdir(tmp_path) == ["step-000000001.pt"]
