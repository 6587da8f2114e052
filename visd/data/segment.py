"""Optional: compute the organ label map with TotalSegmentator (``pip install "visd[segment]"``).

TotalSegmentator sends anonymous usage statistics to its authors' server after each run unless
``send_usage_stats`` is false in its config file (``~/.totalsegmentator/config.json``, or under
``$TOTALSEG_HOME_DIR``). :func:`segment` sets it to false unless ``statistics=True``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from visd.errors import InputError, MissingDependencyError

__all__ = ["segment"]

logger = logging.getLogger(__name__)


def segment(
    ct_path: str | os.PathLike, out_dir: str | os.PathLike, fast: bool = False, statistics: bool = False
) -> Path:
    """Run TotalSegmentator (task ``total``) on a CT and write its multilabel map into ``out_dir``.

    TotalSegmentator sends anonymous usage statistics (task, options, platform, versions) to its
    authors after each run unless told not to. With ``statistics=False`` (the default) this function
    turns that off first by setting ``send_usage_stats`` to false in TotalSegmentator's config file
    (a persistent setting of the TotalSegmentator installation); ``statistics=True`` leaves the setting
    as it is. Model weights are downloaded by TotalSegmentator on first use.

    Args:
        ct_path: a ``.nii``/``.nii.gz`` CT or a DICOM series folder.
        out_dir: folder for the output; created if needed.
        fast: TotalSegmentator's 3 mm ``--fast`` model (quicker, coarser).
        statistics: allow TotalSegmentator's usage statistics.

    Returns:
        Path of ``<out_dir>/totalsegmentator.nii.gz``, a multilabel map with its label table in the
        header; read it with :func:`visd.data.read_organ_mask` (``mask_format="totalsegmentator"``).

    Raises:
        MissingDependencyError: TotalSegmentator is not installed.
        InputError: ``ct_path`` does not exist.
    """
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
    logger.info("running TotalSegmentator on %s (fast=%s) -> %s", ct_path, fast, out)
    totalsegmentator(input=ct_path, output=out, ml=True, fast=fast, task="total", quiet=True)
    return out
