"""Shared helpers of the training tests: synthetic NIfTI cases, manifests, configs, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from tests.conftest import DATA, OFFICIAL, tiny_config

REPO = DATA.parent.parent
ORGANS = ("lung", "heart", "esophagus", "aorta")
HU = (-1150.0, 350.0)

# one abnormal sentence per organ; the normal ones come from the manifest rule
ABNORMAL = {
    "lung": "Emphysema in both upper lobes.",
    "heart": "Cardiomegaly.",
    "esophagus": "Hiatal hernia.",
    "aorta": "Calcified plaques in the aortic wall.",
}


def phantom_case(seed: int, shape=(36, 72, 72), abnormal: tuple[bool, ...] = (False,) * 4):
    """A (D, H, W) image in [0, 1] and a label map with four box organs well inside the volume.

    An abnormal organ is bright and speckled, so images and reports agree.
    """
    rng = np.random.default_rng(seed)
    d, h, w = shape
    image = (0.3 + 0.1 * rng.random(shape)).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    j = rng.integers(0, 3, size=3)
    boxes = [
        (slice(8 + j[0], 18 + j[0]), slice(12, 30), slice(12, 30)),
        (slice(16, 26), slice(36 + j[1], 52 + j[1]), slice(36, 52)),
        (slice(8, 16), slice(38, 46), slice(14 + j[2], 22 + j[2])),
        (slice(20, 27), slice(14, 22), slice(40, 50)),
    ]
    for o, box in enumerate(boxes):
        mask[box] = o + 1
        image[box] += 0.15 * (o + 1)
        if abnormal[o]:  # a bright, speckled organ
            image[box] = 0.9 + 0.1 * rng.random(image[box].shape)
    return np.clip(image, 0, 1), mask


def write_nifti_case(folder: Path, name: str, image: np.ndarray, mask: np.ndarray) -> tuple[Path, Path]:
    """Write an LPS NIfTI pair at 1 x 1 x 3 mm (x, y, z) so preprocessing does not resample."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 3.0, 1.0])  # LPS: x to the left, y posterior (RAS+ world)
    hu = (HU[0] + image * (HU[1] - HU[0])).astype(np.int16)
    img_path, mask_path = folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), affine), img_path)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), affine), mask_path)
    return img_path, mask_path


def synthetic_manifest(folder: Path, n: int = 4) -> Path:
    """``n`` phantom scans; scan ``i`` has organ ``o`` abnormal when ``(i + o) % 2 == 0``."""
    rows = ["id,image,mask," + ",".join(f"text_{o}" for o in ORGANS)]
    for i in range(n):
        abnormal = tuple((i + o) % 2 == 0 for o in range(4))
        image, mask = phantom_case(100 + i, abnormal=abnormal)
        img_path, mask_path = write_nifti_case(folder / "scans", f"case{i}", image, mask)
        texts = [ABNORMAL[organ] if a else "" for organ, a in zip(ORGANS, abnormal)]
        rows.append(f"case{i},{img_path.relative_to(folder)},{mask_path.relative_to(folder)}," + ",".join(texts))
    path = folder / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_model_dict(dropout: float = 0.1) -> dict[str, Any]:
    """The conftest tiny model config as a dict, with the text dropout set."""
    config = tiny_config()
    text = config.text.model_dump() | {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return config.model_dump(mode="json") | {"text": text}


def train_dict(manifest: Path, out: Path, **changes: Any) -> dict[str, Any]:
    """A small training config dict; ``changes`` update the top level, ``stage`` the single stage."""
    stage = {"objectives": ["alignment", "disease"], "epochs": 2, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-5,
             "warmup_steps": 1}
    stage.update(changes.pop("stage", {}))
    data = {"manifest": str(manifest), "num_workers": 0, "cache_dir": str(out.parent / "cache")}
    data.update(changes.pop("data", {}))
    config = {
        "model": {"config": changes.pop("model_dict", tiny_model_dict()), "tokenizer": str(OFFICIAL / "tiny_text")},
        "data": data,
        "stages": changes.pop("stages", [stage]),
        "output_dir": str(out),
        "seed": 3,
        "progress_bar": False,
        "checkpoint_every": 2,
    }
    config.update(changes)
    return config


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m visd.cli <args>`` in a fresh process with one thread (bit-reproducible on the CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("VISD_TRAIN_FAULT", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "visd.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def batch_from_cases(cases, texts, abnormal, tokenizer, max_length=32, views=1):
    """A :class:`visd.training.data.Batch` from (image, mask) pairs already at the ROI size."""
    from visd.training.data import Collate

    samples = []
    for i, (image, mask) in enumerate(cases):
        img = torch.from_numpy(np.stack([image] * views))[:, None]
        msk = torch.from_numpy(np.stack([mask] * views))[:, None]
        samples.append({"index": i, "image": img, "mask": msk, "texts": texts[i],
                        "abnormal": torch.tensor(abnormal[i], dtype=torch.bool)})
    return Collate(tokenizer, max_length)(samples)


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one CPU thread: with busy neighbours, torch's spinning threads slow tiny models ~5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
