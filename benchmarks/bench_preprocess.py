"""Reading and preprocessing one chest CT: ``visd.data.load_case`` on a 480 x 480 x 480 int16 ``.nii.gz``
scan at 1 x 1 x 1.5 mm with its organ label map (``_common.chest_scan_files``), or with ``--dicom`` on the
same scan as a DICOM series of 480 files (written with the tests' DICOM writer), best of ``--repeat``::

    python benchmarks/bench_preprocess.py --repeat 3 [--dicom]

The function and its arguments are the same in every visd version, so an older checkout can be
measured with the same script (``PYTHONPATH=<checkout> python benchmarks/bench_preprocess.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import chest_scan_files, peak_rss_gb, record, timed


def _dicom_series(nifti: Path, folder: Path) -> Path:
    """The scan of ``nifti`` as one DICOM file per slice in ``folder`` (kept if present)."""
    if not folder.is_dir():
        import nibabel as nib
        import numpy as np

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from data_io._helpers import write_dicom_series

        img = nib.load(nifti)
        write_dicom_series(np.asarray(img.dataobj).astype(np.float64), img.affine, folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="folder for the scan files (kept; default: temporary)")
    ap.add_argument("--dicom", action="store_true", help="read the scan as a DICOM series")
    args = ap.parse_args()
    from visd.config import ViSDConfig
    from visd.data import load_case

    config = ViSDConfig()
    with tempfile.TemporaryDirectory() as tmp:
        ((ct, seg),) = chest_scan_files(args.data or Path(tmp), 1)
        if args.dicom:
            ct = _dicom_series(ct, ct.parent / "chest_0_dicom")
        case, seconds = timed(lambda: load_case(ct, seg, config, mask_format="visd"), repeat=args.repeat)
    shape = "x".join(map(str, case.image.shape))
    kind = "DICOM series" if args.dicom else ".nii.gz"
    record(f"read + preprocess 480x480x480 {kind}", "load_case", seconds, peak_rss_gb(),
           f"best of {args.repeat}, model input {shape}", "python benchmarks/bench_preprocess.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
