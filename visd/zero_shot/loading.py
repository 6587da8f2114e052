"""Reading and preprocessing the scans of a batch run, in this process or in worker processes.

Reading a scan (gzip NIfTI, a DICOM series), checking its organ labels and resampling it take seconds
per scan (2.6 s for a 480 x 480 x 480 chest ``.nii.gz`` on a 2-core CPU), time a GPU would spend
waiting. With ``num_workers > 0`` a ``torch.utils.data.DataLoader`` does that work in worker
processes, ``num_workers`` scans ahead of the model, in input order. A scan
that cannot be read, or that TotalSegmentator cannot segment (not installed, weights not reachable),
yields the reason instead of a case, as it does in this process, so one bad file never stops the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visd.config import ViSDConfig
from visd.data import CTVolume, PreprocessedCase, load_case, read_ct, segment
from visd.data.segment import totalsegmentator_classes
from visd.errors import InputError, MissingDependencyError

__all__ = ["LoadedCase", "check_num_workers", "iter_cases", "load_scan"]


@dataclass
class LoadedCase:
    """One scan of a batch run: its preprocessed ``case``, or the ``error`` that made it skipped."""

    scan: str
    case: PreprocessedCase | None = None
    error: str | None = None


def load_scan(
    source: Any, mask: Any, config: ViSDConfig, mask_format: str, segment_dir: Any, scan: str
) -> PreprocessedCase:
    """Read, check and preprocess one scan; every problem with the data raises :class:`InputError`.

    The CT is read first (an unreadable scan is never segmented), then its mask is found or made with
    TotalSegmentator, then :func:`visd.data.load_case` reads the mask and preprocesses.
    """
    ct = source if isinstance(source, CTVolume) else read_ct(source)
    if mask is None:
        if segment_dir is None:
            raise InputError(
                f"no organ mask for scan {scan!r}. Pass its TotalSegmentator output or organ label map "
                "(--mask), or let visd run TotalSegmentator (--segment / segment_dir=)."
            )
        if not isinstance(source, (str, os.PathLike)):
            raise InputError(
                f"cannot segment scan {scan!r} given as {type(source).__name__}: TotalSegmentator reads files. "
                "Pass the NIfTI file or DICOM folder, or a mask."
            )
        mask = _segment(source, Path(segment_dir) / scan, scan, totalsegmentator_classes(config))
        mask_format = "totalsegmentator"
    return load_case(ct, mask, config, mask_format=mask_format)


def _segment(source: str | os.PathLike, out_dir: Path, scan: str, roi_subset: Sequence[str]) -> Path:
    """TotalSegmentator's label map of one scan (only the classes the model needs); any failure of
    TotalSegmentator is that scan's error."""
    try:
        return segment(source, out_dir, roi_subset=roi_subset)
    except (InputError, MissingDependencyError):
        raise
    except (Exception, SystemExit) as e:  # TotalSegmentator's own failures (weights not reachable, ...), some
        reason = " ".join(str(e).split())[:300]  # of which end in sys.exit(): this scan is skipped
        raise InputError(
            f"TotalSegmentator could not segment scan {scan!r} ({type(e).__name__}: {reason}). Check that it runs "
            "(TotalSegmentator -i CT -o OUT) and can reach its weights, or pass the scan's mask with --mask."
        ) from e


class _Cases(torch.utils.data.Dataset):
    """The scans of a run as a map-style dataset of :class:`LoadedCase` (picklable for any start method)."""

    def __init__(
        self, scans: Sequence[str], sources: Sequence[Any], masks: Sequence[Any], config: ViSDConfig,
        mask_format: str, segment_dir: Any,
    ) -> None:
        self.scans, self.sources, self.masks = list(scans), list(sources), list(masks)
        self.config, self.mask_format, self.segment_dir = config, mask_format, segment_dir

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, i: int) -> LoadedCase:
        scan = self.scans[i]
        try:
            case = load_scan(self.sources[i], self.masks[i], self.config, self.mask_format, self.segment_dir, scan)
        except (InputError, MissingDependencyError) as e:  # TotalSegmentator not installed: each scan says so
            return LoadedCase(scan, error=" ".join(str(e).split()))
        return LoadedCase(scan, case=case)


def _as_is(item: LoadedCase) -> LoadedCase:
    return item


def check_num_workers(num_workers: Any) -> None:
    """Raise :class:`InputError` unless ``num_workers`` is an integer >= 0."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise InputError(f"num_workers must be an integer >= 0, got {num_workers!r}. Use 0 to load in this process.")


def iter_cases(
    scans: Sequence[str],
    sources: Sequence[Any],
    masks: Sequence[Any],
    config: ViSDConfig,
    *,
    mask_format: str = "auto",
    segment_dir: Any = None,
    num_workers: int = 0,
) -> Iterator[LoadedCase]:
    """The scans read and preprocessed, in input order (arguments are checked at once, scans read lazily).

    Args:
        num_workers: worker processes that load scans ahead of the consumer (0: load each scan in this
            process when it is asked for). Each worker holds one scan ahead, so up to ``num_workers``
            preprocessed scans wait in memory besides the one in use. With ``segment_dir``, each worker
            runs its own TotalSegmentator for scans without a mask.
    """
    check_num_workers(num_workers)
    dataset = _Cases(scans, sources, masks, config, mask_format, segment_dir)
    if num_workers == 0 or len(dataset) == 0:
        return (dataset[i] for i in range(len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=min(num_workers, len(dataset)),
        collate_fn=_as_is, prefetch_factor=1,
    )
    return iter(loader)
