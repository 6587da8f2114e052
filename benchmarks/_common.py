"""Shared benchmark helpers: synthetic inputs of the official sizes, timing, peak memory, result rows.

Each benchmark script prints its figures and appends one row per measurement to ``README.md``
(machine, torch version, commit, mode). Run them from the repository root, one process per
measurement so that the peak memory is that measurement's own, e.g.::

    python benchmarks/bench_volume.py --mode fused
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch

README = Path(__file__).resolve().parent / "README.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} / {os.cpu_count()} CPU cores"
    return f"{cpu}, {torch.get_num_threads()} threads"


def commit() -> str:
    """The commit of the visd package being measured (the checkout it is imported from), with
    ``+dirty`` when that checkout's ``visd/`` has uncommitted changes; ``$VISD_COMMIT`` when set (a copy
    of the tree without ``.git``, as on the GPU machine)."""
    if os.environ.get("VISD_COMMIT"):
        return os.environ["VISD_COMMIT"]
    import visd

    package = Path(visd.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=package)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, cwd=package)
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def system_usage() -> tuple[int, float]:
    """Minor page faults and system CPU seconds of this process so far (for differences)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0), so the peak is the workload's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    """Peak resident memory of this process since :func:`reset_peak_rss` (or its start), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn, repeat: int = 1):
    """Run ``fn`` ``repeat`` times; return (last result, best seconds). Resets the peak-memory marks."""
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    best, out = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, best


def record(workload: str, mode: str, seconds: float, peak_gb: float, note: str = "", command: str = "") -> None:
    """Print a result and append it as a table row to benchmarks/README.md.

    Peak memory is the process's peak resident set during the timed run (model weights included),
    or the peak CUDA allocation on a GPU.
    """
    row = (
        f"| {_dt.date.today()} | {workload} | {mode} | {seconds:.2f} | {peak_gb:.2f} | {machine()} | "
        f"torch {torch.__version__} | {commit()} | {note} | `{command}` |"
    )
    print(row)
    with README.open("a") as f:
        f.write(row + "\n")


def full_size_model(device: str = "cpu"):
    """The released architecture (CXR-BERT-size text tower) with random weights, in eval mode."""
    from visd import ViSDModel
    from visd.config import ViSDConfig
    from visd.models.text import load_tokenizer

    tiny_text = Path(__file__).resolve().parents[1] / "tests" / "data" / "official" / "tiny_text"
    torch.manual_seed(0)
    config = ViSDConfig()
    model = ViSDModel(config, tokenizer=load_tokenizer(tiny_text, config.text))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(device)


def _phantom(shape, organs, seed):
    """Image in [0, 1] and uint8 label map with ellipsoid organs ``(label, centre, radii)``."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = shape
    axes = (torch.arange(d).view(-1, 1, 1), torch.arange(h).view(1, -1, 1), torch.arange(w).view(1, 1, -1))
    mask = torch.zeros(shape, dtype=torch.uint8)
    for label, center, radii in organs:  # broadcasting keeps the generator's own memory small
        inside = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, center, radii)) <= 1.0
        mask[inside] = label
    image = torch.rand(shape, generator=g).mul_(0.2).add_(0.3)
    image.sub_((mask == 1).to(torch.float32).mul_(0.25))
    return image.clamp_(0, 1), mask


def chest_volume(shape=(240, 480, 480), seed: int = 0):
    """A preprocessed-looking chest volume with the 4 organs; the lung window is 176 x 448 x 384.

    Returns ``image`` (D, H, W) float32 in [0, 1] and ``mask`` (D, H, W) uint8 (1 lung, 2 heart,
    3 esophagus, 4 aorta), organs as ellipsoids of plausible size and position.
    """
    d, h, w = shape
    return _phantom(shape, [
        (1, (d // 2, h // 2, w // 2), (88, 224, 192)),  # bbox extent 176 x 448 x 384
        (2, (d // 2 + 20, h // 2 + 40, w // 2 + 30), (40, 80, 90)),
        (3, (d // 2, h // 2 + 90, w // 2 - 10), (70, 8, 8)),
        (4, (d // 2 - 10, h // 2 + 60, w // 2 - 40), (60, 14, 14)),
    ], seed)


CHEST_SCAN_SPACING = (1.0, 1.0, 1.5)  # x, y, z in mm


def chest_scan_files(folder: Path, count: int) -> list[tuple[Path, Path]]:
    """``count`` chest scans and their visd label maps as ``.nii.gz`` files in ``folder`` (kept if present).

    Each is the synthetic chest volume of :func:`chest_volume` (seed ``i``) as int16 Hounsfield units,
    480 x 480 x 480 voxels of 1 x 1 x 1.5 mm (each 3 mm slice twice), LPS-ordered.
    """
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    sx, sy, sz = CHEST_SCAN_SPACING
    affine = np.diag([-sx, -sy, sz, 1.0])  # array axes (x, y, z) run L, P, S
    pairs = []
    for i in range(count):
        ct, seg = folder / f"chest_{i}.nii.gz", folder / f"chest_{i}_organs.nii.gz"
        if not (ct.is_file() and seg.is_file()):
            image, mask = chest_volume(seed=i)  # (D, H, W) at 3 x 1 x 1 mm
            hu = (image.numpy() * 1500.0 - 1150.0).astype(np.int16).transpose(2, 1, 0).repeat(2, axis=2)
            labels = mask.numpy().transpose(2, 1, 0).repeat(2, axis=2)
            nib.save(nib.Nifti1Image(labels, affine), seg)
            nib.save(nib.Nifti1Image(hu, affine), ct)
        pairs.append((ct, seg))
    return pairs


def window_inputs(seed: int = 0):
    """One 112 x 256 x 352 window holding the 4 organs whole (as the reference window case)."""
    return _phantom((112, 256, 352), [
        (1, (56, 128, 176), (40, 100, 140)),
        (2, (60, 150, 200), (20, 40, 45)),
        (3, (56, 180, 160), (35, 6, 6)),
        (4, (50, 160, 120), (30, 10, 10)),
    ], seed)


MODES = ("official", "fused", "fused-bf16", "fused-nocl", "fused-nobatch")


def set_mode(model, mode: str) -> dict:
    """Apply a named inference mode (one of :data:`MODES`; ``fast*``, the names of earlier rows, are
    the same as ``fused*``) with ``model.set_numerics``; returns the options of the per-volume
    procedure (``window_batch_size``) for ``visd.inference.zero_shot_classify``/``encode_volume``."""
    mode = mode.replace("fast", "fused", 1) if mode.startswith("fast") else mode
    if mode == "fused-cl":
        mode = "fused"
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")
    if mode == "official":
        model.set_numerics("official")
    else:
        model.set_numerics(
            "fused", autocast=torch.bfloat16 if mode == "fused-bf16" else None, channels_last=mode != "fused-nocl"
        )
    return {"window_batch_size": 1 if mode in ("official", "fused-nobatch") else 4}