"""A run SIGKILLed mid-epoch (and again in the middle of a checkpoint write) and resumed produces
exactly the loss sequence of an uninterrupted run; no checkpoint on disk is ever corrupt."""

from __future__ import annotations

import signal

import pytest
import yaml

from visd.training import checkpoint as ckpt
from visd.training.logs import read_metrics

from ._train_helpers import one_thread, run_cli, synthetic_manifest, train_dict  # noqa: F401

LOSS_COLUMNS = ("step", "stage", "epoch", "batch", "lr", "loss", "alignment", "disease", "normality",
                "reconstruction", "commitment", "temperature", "perplexity", "unused_codes", "dead_codes")


def _config(tmp_path, manifest, name):
    stages = [
        # 4 scans, batch 2: 2 steps per epoch; checkpoints every 3 steps (step 3 is mid-epoch) and at stage ends
        {"objectives": ["alignment", "disease"], "epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1},
        {"objectives": ["normality"], "epochs": 1, "batch_size": 1, "lr": 1e-3, "warmup_steps": 0, "max_steps": 3},
    ]
    data = train_dict(manifest, tmp_path / name, stages=stages, checkpoint_every=3, keep_checkpoints=2,
                      data={"num_workers": 1})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _checkpoints_all_load(folder):
    files = ckpt.list_checkpoints(folder)
    for p in files:
        ckpt.load_checkpoint(p)
    return [p.name for p in files]


@pytest.mark.usefixtures("one_thread")
def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(tmp_path):
    from visd.cli import main

    manifest = synthetic_manifest(tmp_path / "data", n=4)
    # the uninterrupted run in this process, on one thread like the subprocesses (bit-equal numerics)
    assert main(["train", "--config", str(_config(tmp_path, manifest, "full"))]) == 0
    expected = read_metrics(tmp_path / "full" / "metrics.csv")
    assert [int(r["step"]) for r in expected] == list(range(1, 8))

    config = _config(tmp_path, manifest, "crash")
    folder = tmp_path / "crash" / "checkpoints"
    # 1. killed half-way through writing the stage-end checkpoint of step 4: the newest complete one is
    #    step 3, in the middle of epoch 1 of the first stage (optimizer, scheduler and momentum encoder state)
    killed = run_cli(["train", "--config", str(config)], {"VISD_TRAIN_FAULT": "checkpoint_write:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "crash" / "metrics.csv")] == [1, 2, 3, 4]
    assert any(p.name.startswith(".step-000000004.pt.tmp-") for p in folder.iterdir())  # the half-written file
    assert _checkpoints_all_load(folder) == ["step-000000003.pt"]
    # 2. resumed from step 3, killed again right after step 5 (mid-epoch of the normality stage)
    killed = run_cli(["train", "--config", str(config), "--resume"], {"VISD_TRAIN_FAULT": "after_step:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "crash" / "metrics.csv")] == [1, 2, 3, 4, 5]
    assert _checkpoints_all_load(folder) == ["step-000000003.pt", "step-000000004.pt"]
    # 3. resumed from step 4 to the end: steps 5-7 again, the log rows after step 4 replaced
    done = run_cli(["train", "--config", str(config), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    got = read_metrics(tmp_path / "crash" / "metrics.csv")
    assert [[r[c] for c in LOSS_COLUMNS] for r in got] == [[r[c] for c in LOSS_COLUMNS] for r in expected]
    assert not any(".tmp-" in p.name for p in folder.iterdir())
    assert _checkpoints_all_load(folder) == ["step-000000006.pt", "step-000000007.pt"]
    # the per-stage summary (steps, mean losses, organ counts) continues across the kills too
    assert (tmp_path / "full" / "summary.json").read_text() == (tmp_path / "crash" / "summary.json").read_text()
    a = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "crash" / "model" / "model.safetensors").read_bytes()
    assert a == b  # the exported weights are bit-identical too


def test_an_existing_run_is_not_overwritten(tmp_path, capsys):
    from visd.cli import main

    manifest = synthetic_manifest(tmp_path / "data", n=2)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION}, ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 1))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(train_dict(manifest, tmp_path / "run")))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints; pass --resume" in err and len(err.strip().splitlines()) == 1
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")  # untouched
