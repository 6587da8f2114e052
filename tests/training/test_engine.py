"""The engine's DDP wiring: two gloo processes under torchrun train exactly like one process on the whole
batch; resuming refuses a changed recipe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from visd.errors import ConfigError
from visd.training import checkpoint as ckpt
from visd.training.config import TrainConfig
from visd.training.engine import train
from visd.training.logs import read_metrics
from visd.training.usage import usage_columns

from ._train_helpers import REPO, one_thread, synthetic_manifest, tiny_model_dict, train_dict  # noqa: F401


def _pipeline(batch_size: int) -> list[dict]:
    # eps = 1 makes AdamW's first step -lr * g / (|g| + 1): the parameters then show the gradients
    # themselves (a small eps would hide them behind Adam's sign-like first step)
    opt = {"epochs": 1, "max_steps": 1, "batch_size": batch_size, "lr": 0.1, "min_lr": 0.1, "eps": 1.0,
           "weight_decay": 0.0, "warmup_steps": 0}
    return [{"objectives": ["alignment", "disease"], **opt}, {"objectives": ["normality"], **opt}]


def _single_and_two_processes(tmp_path, manifest, stages_single, stages_ddp):
    """Train once in this process (global batch) and once under torchrun with 2 gloo processes;
    returns both metrics tables, the initial weights and both final weights."""
    common = {"model_dict": tiny_model_dict(dropout=0.0), "batchnorm": "running"}  # BN stats/dropout are per process
    single = TrainConfig.from_dict(train_dict(manifest, tmp_path / "single", stages=stages_single, **common))
    train(single)  # also fills the shared preprocessing cache
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(train_dict(manifest, tmp_path / "ddp", stages=stages_ddp, **common)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env.pop("VISD_TRAIN_FAULT", None)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "visd.cli", "train", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    one = read_metrics(tmp_path / "single" / "metrics.csv")
    two = read_metrics(tmp_path / "ddp" / "metrics.csv")
    ref = load_file(tmp_path / "single" / "model" / "model.safetensors")
    got = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    return one, two, _initial_state(single), ref, got


def _assert_same_run(one, two, ref, got) -> None:
    for a, b in zip(one, two):  # the logged loss is the global one
        for column in ("loss", "alignment", "disease", "normality", "perplexity", *usage_columns()):  # counts: global
            if a.get(column):
                assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-5, abs=1e-6), column
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.allclose(ref[k].double(), got[k].double(), atol=1e-6, rtol=1e-6), k


@pytest.mark.usefixtures("one_thread")
def test_two_gloo_processes_equal_one_process_over_the_whole_batch(tmp_path):
    manifest = synthetic_manifest(tmp_path / "data", n=4)
    one, two, initial, ref, got = _single_and_two_processes(tmp_path, manifest, _pipeline(4), _pipeline(2))
    assert [r["stage"] for r in two] == ["alignment+disease", "normality"]
    _assert_same_run(one, two, ref, got)
    moved = sum(int(not torch.equal(ref[k], initial[k])) for k in ref)
    assert moved > 0.5 * len(ref)  # the step really trained (vision, pooling, text, then the VQ-VAE)
    assert not any(torch.equal(ref[k], initial[k]) for k in ref if k.startswith("normality.encoder."))


@pytest.mark.usefixtures("one_thread")
def test_a_trainable_normality_model_under_ddp_with_unequal_organ_counts(tmp_path):
    """``freeze: []`` in an alignment stage: the quantiser runs (and all-reduces its EMA statistics)
    in the training forward. Scan 3 has two organs fewer, so the two processes embed different numbers
    of organs; the run finishes (one quantiser call per forward, not per organ) and equals one process."""
    import nibabel as nib
    import numpy as np

    manifest = synthetic_manifest(tmp_path / "data", n=4)
    mask_path = tmp_path / "data" / "scans" / "case3_mask.nii.gz"
    assert mask_path.is_file(), sorted(p.name for p in mask_path.parent.iterdir())
    img = nib.load(mask_path)
    labels = np.asarray(img.dataobj).copy()
    labels[labels >= 3] = 0  # no esophagus, no aorta
    nib.save(nib.Nifti1Image(labels, img.affine), mask_path)
    opt = {"epochs": 1, "max_steps": 2, "lr": 0.1, "min_lr": 0.1, "eps": 1.0, "weight_decay": 0.0, "warmup_steps": 0}
    stage = {"objectives": ["alignment"], "freeze": [], **opt}
    one, two, initial, ref, got = _single_and_two_processes(
        tmp_path, manifest, [{**stage, "batch_size": 4}], [{**stage, "batch_size": 2}]
    )
    _assert_same_run(one, two, ref, got)
    assert not torch.equal(ref["normality.quantizer.embeddings"], initial["normality.quantizer.embeddings"])  # EMA ran
    assert not torch.equal(ref["normality.decoder.output2.weight"], initial["normality.decoder.output2.weight"])


def _initial_state(config: TrainConfig) -> dict[str, torch.Tensor]:
    from visd.training.engine import build_model

    return build_model(config).state_dict()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_refuses_a_changed_recipe(tmp_path):
    manifest = synthetic_manifest(tmp_path / "data", n=2)
    original = TrainConfig.from_dict(train_dict(manifest, tmp_path / "run"))
    state = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": original.to_json(), "world_size": 1,
             "position": {"stage": 0, "epoch": 0, "batch": 2, "step": 1, "stage_step": 1}}
    ckpt.atomic_save(state, ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 1))
    changed = TrainConfig.from_dict(train_dict(manifest, tmp_path / "run", seed=4))
    with pytest.raises(ConfigError, match=r"\['seed'\] differ"):
        train(changed, resume=True)
    state["world_size"] = 4
    ckpt.atomic_save(state, ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 1))
    with pytest.raises(ConfigError, match="--nproc_per_node 4"):
        train(original, resume=True)
