"""Optional: compute the organ label map with TotalSegmentator (``pip install "visd[segment]"``).

:func:`segment` runs TotalSegmentator's ``total`` task with ``roi_subset``, the classes the model's
``totalsegmentator_map`` names (:func:`totalsegmentator_classes`): TotalSegmentator then finds the
region of those classes with its coarse 6 mm model, segments only that crop and runs only the model
parts that hold them (its standard speed-up). The multilabel map keeps the v2 ids of those classes
and writes their label table into the header, which :func:`visd.data.read_organ_mask` merges by name.

Offline use: TotalSegmentator downloads its weights on first use into
``$TOTALSEG_HOME_DIR/nnunet/results`` (default ``~/.totalsegmentator``) or ``$TOTALSEG_WEIGHTS_PATH``.
On a machine without internet, run ``totalseg_download_weights -t total`` (and ``-t total_fast`` for
``fast=True``) where there is internet and copy that folder, see ``docs/faq.md``.

TotalSegmentator sends anonymous usage statistics to its authors' server after each run unless
``send_usage_stats`` is false in its config file (``~/.totalsegmentator/config.json``, or under
``$TOTALSEG_HOME_DIR``). :func:`segment` sets it to false unless ``statistics=True``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from visd.config import ViSDConfig
from visd.data.totalseg_classes import TOTAL_V2_CLASSES
from visd.errors import InputError, MissingDependencyError, did_you_mean

__all__ = ["segment", "totalsegmentator_classes", "totalsegmentator_device"]

logger = logging.getLogger(__name__)


def totalsegmentator_classes(config: ViSDConfig) -> list[str]:
    """The TotalSegmentator ``total`` classes that the model's organs are merged from, in organ order.

    This is the ``roi_subset`` :func:`segment` asks for (for the chest model: the five lung lobes,
    heart, atrial_appendage_left, esophagus, aorta).

    Raises:
        InputError: ``config.totalsegmentator_map`` names a class that the v2 ``total`` task does not have.
    """
    known = set(TOTAL_V2_CLASSES.values())
    classes: list[str] = []
    for organ in config.organs:
        for name in config.totalsegmentator_map.get(organ, ()):
            if name not in known:
                raise InputError(
                    f"totalsegmentator_map of organ {organ!r} names class {name!r}, which TotalSegmentator's "
                    "'total' task does not segment. Expected a v2 'total' class name "
                    "(visd.data.totalseg_classes.TOTAL_V2_CLASSES)." + did_you_mean(name, sorted(known))
                )
            if name not in classes:
                classes.append(name)
    return classes


def totalsegmentator_device(device: Any = None) -> str:
    """TotalSegmentator's name for a torch device: ``"cpu"``, ``"mps"``, ``"gpu"`` or ``"gpu:N"``.

    Args:
        device: a ``torch.device`` or its string (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"``), or
            TotalSegmentator's own spelling; ``None`` picks ``"gpu"`` when CUDA is available, else ``"cpu"``.

    Raises:
        InputError: a device TotalSegmentator cannot run on.
    """
    if device is None:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    text = str(device).strip().lower()
    match = re.fullmatch(r"(cuda|gpu)(?::(\d+))?", text)
    if match:
        return "gpu" if match.group(2) is None else f"gpu:{int(match.group(2))}"
    if text in ("cpu", "mps"):
        return text
    raise InputError(
        f"TotalSegmentator cannot run on device {device!r}. Expected 'cpu', 'mps', 'cuda' or 'cuda:N' "
        "(a torch device), or None to use the GPU when there is one."
    )


def segment(
    ct_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fast: bool = False,
    statistics: bool = False,
    *,
    roi_subset: list[str] | None = None,
    device: Any = None,
) -> Path:
    """Run TotalSegmentator (task ``total``) on a CT and write its multilabel map into ``out_dir``.

    TotalSegmentator sends anonymous usage statistics (task, options, platform, versions) to its
    authors after each run unless told not to. With ``statistics=False`` (the default) this function
    turns that off first by setting ``send_usage_stats`` to false in TotalSegmentator's config file
    (a persistent setting of the TotalSegmentator installation); ``statistics=True`` leaves the setting
    as it is. Model weights are downloaded by TotalSegmentator on first use (offline set-up: module
    docstring).

    Args:
        ct_path: a ``.nii``/``.nii.gz`` CT or a DICOM series folder.
        out_dir: folder for the output; created if needed.
        fast: TotalSegmentator's 3 mm ``--fast`` model (quicker, coarser).
        statistics: allow TotalSegmentator's usage statistics.
        roi_subset: segment only these ``total`` classes (:func:`totalsegmentator_classes` of the
            model; ``None``: all 117). Other labels are 0 in the output.
        device: where TotalSegmentator runs (:func:`totalsegmentator_device`; ``None``: the GPU if any).

    Returns:
        Path of ``<out_dir>/totalsegmentator.nii.gz``, a multilabel map with its label table in the
        header; read it with :func:`visd.data.read_organ_mask` (``mask_format="totalsegmentator"``).

    Raises:
        MissingDependencyError: TotalSegmentator is not installed.
        InputError: ``ct_path`` does not exist, an unknown class in ``roi_subset``, a bad ``device``.
    """
    ts_device = totalsegmentator_device(device)
    if roi_subset is not None:
        roi_subset = _check_roi_subset(roi_subset)
    try:
        from totalsegmentator import config as ts_config
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as e:
        raise MissingDependencyError(
            f"organ segmentation needs TotalSegmentator, which is not installed ({e}). "
            'Install it with: pip install "visd[segment]", or provide organ masks with --mask.'
        ) from e
    ct_path, out_dir = Path(ct_path), Path(out_dir)
    if not ct_path.exists():
        raise InputError(f"CT not found: {ct_path}. Expected a NIfTI file or a DICOM series folder to segment.")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "totalsegmentator.nii.gz"
    if statistics:
        logger.info("TotalSegmentator will send anonymous usage statistics unless disabled in its config")
    else:
        ts_config.setup_totalseg()
        ts_config.set_config_key("send_usage_stats", False)
        logger.info("TotalSegmentator usage statistics turned off (send_usage_stats = false in its config)")
    logger.info(
        "running TotalSegmentator on %s (fast=%s, device=%s, roi_subset=%s) -> %s",
        ct_path, fast, ts_device, "all" if roi_subset is None else len(roi_subset), out,
    )
    totalsegmentator(
        input=ct_path, output=out, ml=True, fast=fast, task="total", roi_subset=roi_subset, device=ts_device,
        quiet=True,
    )
    return out


def _check_roi_subset(roi_subset: Any) -> list[str]:
    if isinstance(roi_subset, str) or not all(isinstance(n, str) for n in roi_subset):
        raise InputError(
            f"roi_subset must be a list of class names, got {roi_subset!r}. "
            "Pass e.g. totalsegmentator_classes(model.config)."
        )
    names = list(roi_subset)
    if not names:
        raise InputError("roi_subset is empty. Pass the classes to segment, or None for all of them.")
    known = sorted(set(TOTAL_V2_CLASSES.values()))
    for name in names:
        if name not in known:
            raise InputError(
                f"unknown TotalSegmentator 'total' class {name!r} in roi_subset. Expected v2 class names."
                + did_you_mean(name, known)
            )
    return names
