"""Zero-shot diagnosis of your own CT: findings per organ, anomaly maps and result tables.

::

    from visd.zero_shot import diagnose
    report = diagnose(["ct.nii.gz"], ["ct_totalseg.nii.gz"], "path/to/model", anomaly_maps_dir="maps")
    report.to_csv("results.csv")

See ``docs/diagnosis.md``. The command line is ``visd diagnose`` (:mod:`visd.zero_shot.cli`).
Importing this package is cheap (the ``visd`` command line imports it to register ``diagnose``);
torch and the model load on first use of a name.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .anomaly import anomaly_map, input_slice, pick_slices, render_overlay, write_anomaly_map
    from .findings import FindingLike, as_findings, load_findings
    from .pipeline import diagnose, scan_ids_for
    from .report import COLUMNS, DiagnosisReport

__all__ = [
    "COLUMNS",
    "DiagnosisReport",
    "FindingLike",
    "anomaly_map",
    "input_slice",
    "as_findings",
    "diagnose",
    "load_findings",
    "pick_slices",
    "render_overlay",
    "scan_ids_for",
    "write_anomaly_map",
]

_WHERE = {
    "anomaly_map": "anomaly",
    "input_slice": "anomaly",
    "pick_slices": "anomaly",
    "render_overlay": "anomaly",
    "write_anomaly_map": "anomaly",
    "FindingLike": "findings",
    "as_findings": "findings",
    "load_findings": "findings",
    "diagnose": "pipeline",
    "scan_ids_for": "pipeline",
    "COLUMNS": "report",
    "DiagnosisReport": "report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
