"""Zero-shot diagnosis of a batch of CT scans: files in, a findings table, maps and embeddings out.

:func:`diagnose` is what ``visd diagnose`` runs. Each scan is read (NIfTI file or DICOM folder),
preprocessed with the model's own spec, scored on every finding and, on request, turned into an
anomaly map and an embedding row. A scan that cannot be read is skipped with its reason; the others
finish. With a journal (:mod:`visd.zero_shot.journal`) an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from visd.config import FindingSpec
from visd.data import CTVolume
from visd.data.io import NIFTI_SUFFIXES
from visd.data.masks import MASK_FORMATS
from visd.errors import InputError, did_you_mean
from visd.models.model import ViSDModel
from visd.models.outputs import OrganEmbeddings

from .anomaly import anomaly_map, write_anomaly_map
from .dicom_out import require_highdicom, write_scan_outputs
from .findings import FindingLike, as_findings, load_findings
from .journal import Journal, ScanOutcome, fingerprint
from .loading import LoadedCase, check_num_workers, iter_cases
from .report import ERROR_PREFIX, DiagnosisReport

__all__ = ["diagnose", "scan_ids_for"]

logger = logging.getLogger(__name__)

ScanSource = Union[str, os.PathLike, CTVolume, nib.spatialimages.SpatialImage]
MaskSpec = Union[str, os.PathLike, nib.spatialimages.SpatialImage, np.ndarray, None]
_SINGLE = (str, os.PathLike, CTVolume, nib.spatialimages.SpatialImage, np.ndarray)


def diagnose(
    inputs: ScanSource | Sequence[ScanSource],
    masks: MaskSpec | Sequence[MaskSpec],
    model: ViSDModel | str | os.PathLike,
    *,
    findings: str | os.PathLike | Sequence[FindingLike] | None = None,
    mask_format: str = "auto",
    anomaly_maps_dir: str | os.PathLike | None = None,
    embeddings_path: str | os.PathLike | None = None,
    progress: bool = True,
    scan_ids: Sequence[str] | None = None,
    segment_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    journal: str | os.PathLike | None = None,
    resume: bool = False,
    dicom_out: str | os.PathLike | None = None,
) -> DiagnosisReport:
    """Zero-shot findings for each scan, by the official per-volume procedure.

    Args:
        inputs: one scan or a list: ``.nii``/``.nii.gz`` files, DICOM series folders, nibabel images
            or :class:`~visd.data.CTVolume` s (Hounsfield units, any orientation).
        masks: one organ label map per input (TotalSegmentator output, file or per-class folder, or a
            map in the model's organ ids, see :func:`visd.data.read_organ_mask`); an entry may be
            ``None`` when ``segment_dir`` is given.
        model: a :class:`~visd.ViSDModel`, or a named model, folder or Hub repo id for ``ViSDModel.from_pretrained``.
        findings: ``None`` (the model's catalogue), a YAML/JSON findings file, or a list of findings
            (:func:`visd.zero_shot.as_findings`).
        mask_format: ``"auto"``, ``"visd"`` or ``"totalsegmentator"``.
        anomaly_maps_dir: write ``<scan>_anomaly.nii.gz`` and ``<scan>_anomaly.png`` here.
        embeddings_path: write the ``(N_scans, N_organs, E)`` organ embeddings here (safetensors,
            :func:`visd.evaluation.save_embeddings`); every organ is embedded, failed scans get NaN rows.
        progress: show a progress bar on stderr.
        scan_ids: the scan ids of the table and file names (default: file or folder names).
        segment_dir: compute missing masks with TotalSegmentator (:func:`visd.data.segment`) into
            ``<segment_dir>/<scan>/``. TotalSegmentator sends usage statistics unless turned off; visd
            turns them off.
        num_workers: read and preprocess scans in this many worker processes, ahead of the model
            (default 0: in this process, one scan at a time). Worth it when the model leaves CPU cores
            free, as on a GPU; on a CPU-only machine the workers take cores from the model. Up to
            ``num_workers`` preprocessed scans wait in memory. Results are the same either way
            (:mod:`visd.zero_shot.loading`).
        journal: write each diagnosed scan to this file as it finishes (:mod:`visd.zero_shot.journal`),
            so that an interrupted run can resume.
        resume: take the scans already in ``journal`` from it (same model, findings, mask format and
            outputs, same source paths) and diagnose only the rest; without it the journal starts over.
        dicom_out: for scans read from a DICOM series, write a findings SR and (with ``anomaly_maps_dir``)
            an anomaly Parametric Map into ``<dicom_out>/<scan>/`` (:mod:`visd.zero_shot.dicom_out`).

    Returns:
        A :class:`~visd.zero_shot.DiagnosisReport`; ``report.failed`` lists the skipped scans.

    Raises:
        InputError: the numbers of inputs, masks and scan ids differ, bad findings, an unknown
            ``mask_format``, a journal of another setup (a bad *scan* or *mask* is skipped instead, see
            ``report.failed``).
        WeightsNotFoundError, ConfigError, CheckpointMismatchError: the model cannot be loaded.
    """
    model = _as_model(model)
    specs = _as_specs(findings, model)
    if mask_format not in MASK_FORMATS:
        raise InputError(
            f"unknown mask_format {mask_format!r}. Expected one of {MASK_FORMATS}."
            + did_you_mean(mask_format, MASK_FORMATS)
        )
    sources = list(inputs) if not isinstance(inputs, _SINGLE) else [inputs]
    if not sources:
        raise InputError("no scans to diagnose: inputs is empty. Pass one or more NIfTI files or DICOM folders.")
    if masks is None or isinstance(masks, _SINGLE):
        mask_list = [masks] * len(sources) if masks is None else [masks]
    else:
        mask_list = list(masks)
    if len(mask_list) != len(sources):
        raise InputError(
            f"got {len(sources)} scans and {len(mask_list)} masks. Expected one organ mask per scan, in the same order."
        )
    ids = scan_ids_for(sources) if scan_ids is None else _check_ids(scan_ids, len(sources))

    organs = model.organs
    asked = tuple(dict.fromkeys(s.organ for s in specs))
    extra = tuple(o for o in organs if o not in asked) if embeddings_path is not None else ()
    emb = np.full((len(sources), len(organs), model.config.embed_dim), np.nan, dtype=np.float32)
    report = DiagnosisReport(
        scans=tuple(ids), records=[], organs=organs, embeddings=emb, numerics=model.numerics.describe()
    )
    check_num_workers(num_workers)
    if dicom_out is not None:
        require_highdicom()  # before the first scan, not at the first DICOM scan's outputs
    if resume and journal is None:
        raise InputError("resume=True needs the journal of the interrupted run: pass journal=<its path>.")
    log = None
    if journal is not None:
        outputs = {
            "embeddings": embeddings_path is not None,
            "anomaly_maps": _path_key(anomaly_maps_dir),
            "numerics": model.numerics.describe(),  # a resumed run must not mix numerics
        }
        log = Journal(journal, fingerprint(model, specs, mask_format, outputs), emb.shape[1:], resume=resume)
    paths = [_path_key(s) for s in sources]
    reused = {i: log.reusable(ids[i], paths[i]) for i in range(len(ids))} if log is not None else {}
    todo = [i for i in range(len(ids)) if reused.get(i) is None]
    if log is not None and len(todo) < len(ids):
        logger.info("resuming: %d of %d scans taken from the journal %s", len(ids) - len(todo), len(ids), journal)

    from tqdm.auto import tqdm

    loaded = iter_cases(
        [ids[i] for i in todo], [sources[i] for i in todo], [mask_list[i] for i in todo], model.config,
        mask_format=mask_format, segment_dir=segment_dir, num_workers=num_workers,
    )
    bar = tqdm(total=len(sources), desc="visd diagnose", unit="scan", file=sys.stderr, disable=not progress)
    try:
        for n, scan in enumerate(ids):
            outcome = reused.get(n)
            if outcome is not None:
                report.resumed.append(scan)
            else:
                item = next(loaded)
                bar.set_postfix_str(scan[:30], refresh=False)
                outcome = _diagnose_one(item, paths[n], model, specs, extra, anomaly_maps_dir)
                if isinstance(outcome, ScanOutcome) and log is not None:
                    log.append(outcome)
                if isinstance(outcome, ScanOutcome) and dicom_out is not None:
                    write_scan_outputs(outcome, dicom_out)
            if isinstance(outcome, str):
                logger.warning("skipped scan %r: %s", scan, outcome)
                report.failed.append((scan, outcome))
                report.records += [_record(scan, s.organ, s.name, float("nan"), ERROR_PREFIX + outcome) for s in specs]
            else:
                report.records += [_record(scan, *row) for row in outcome.rows]
                emb[n] = outcome.embeddings
                if outcome.anomaly_maps is not None:
                    report.anomaly_maps[scan] = outcome.anomaly_maps
            bar.update(1)
    finally:
        bar.close()
    if embeddings_path is not None:
        from visd.evaluation import save_embeddings

        report.embeddings_path = save_embeddings(embeddings_path, emb, list(ids), list(organs))
    logger.info("diagnosed %d scans, %d failed", len(ids), len(report.failed))
    return report


def _record(scan: str, organ: str, finding: str, probability: float, status: str) -> dict[str, Any]:
    return {"scan": scan, "organ": organ, "finding": finding, "probability": float(probability), "status": status}


def _diagnose_one(
    item: LoadedCase, path: str | None, model: ViSDModel, specs: list[FindingSpec], extra: tuple[str, ...],
    anomaly_maps_dir: Any,
) -> ScanOutcome | str:
    """The outcome of one loaded scan, or why it was skipped."""
    case = item.case
    if case is None:
        return item.error or "unreadable"
    try:
        result = model.zero_shot_classify(case.image, case.mask, findings=specs)
        organ_emb = result.embeddings
        if extra:
            organ_emb = _merge(organ_emb, model.encode_image(case.image, case.mask, organs=extra))
    except InputError as e:
        return " ".join(str(e).split())
    organs = model.organs
    emb = np.full((len(organs), model.config.embed_dim), np.nan, dtype=np.float32)
    for row, organ in enumerate(organ_emb.organs):
        emb[organs.index(organ)] = organ_emb.embeddings[row].detach().float().cpu().numpy()
    maps = None
    if anomaly_maps_dir is not None:
        top: dict[str, tuple[str, float]] = {}  # each organ's most probable finding, for the PNG's titles
        for s in result.scores:
            if s.status == "scored" and (s.organ not in top or s.probability > top[s.organ][1]):
                top[s.organ] = (s.finding, float(s.probability))
        maps = write_anomaly_map(
            anomaly_map(organ_emb, case.mask, organs), case, anomaly_maps_dir, item.scan, organs=organs,
            spacing=model.config.preprocess.spacing, hu_window=model.config.preprocess.hu_window, scores=top,
        )
    rows = [(s.organ, s.finding, s.probability, s.status) for s in result.scores]
    return ScanOutcome(item.scan, path, rows, emb, maps)


def _path_key(source: Any) -> str | None:
    """How the journal recognises a scan's source or a folder: its absolute path (``None`` for in-memory images)."""
    return os.path.abspath(source) if isinstance(source, (str, os.PathLike)) else None


def _as_model(model: Any) -> ViSDModel:
    if isinstance(model, ViSDModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return ViSDModel.from_pretrained(model)
    raise InputError(
        f"model must be a ViSDModel or a model folder / Hub repo id, got {type(model).__name__}. "
        "Pass e.g. ViSDModel.from_pretrained('folder') or the folder path."
    )


def _as_specs(findings: Any, model: ViSDModel) -> list[FindingSpec]:
    if findings is None:
        return list(model.config.findings)
    if isinstance(findings, (str, os.PathLike)):
        return load_findings(findings, model.organs)
    return as_findings(findings, model.organs)


def _merge(first: OrganEmbeddings, second: OrganEmbeddings) -> OrganEmbeddings:
    import torch

    return OrganEmbeddings(
        organs=first.organs + second.organs,
        embeddings=torch.cat([first.embeddings, second.embeddings.to(first.embeddings)]),
        status={**first.status, **second.status},
        details={**first.details, **second.details},
    )


# -- scan ids ------------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name or Path(os.path.abspath(path)).name
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES[::-1]:  # .nii.gz before .nii
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _source_path(source: Any) -> Path | None:
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    if isinstance(source, nib.spatialimages.SpatialImage) and source.get_filename():
        return Path(source.get_filename())
    if isinstance(source, CTVolume) and ("/" in source.source or source.source.lower().endswith(NIFTI_SUFFIXES)):
        return Path(source.source)
    return None


def scan_ids_for(sources: Sequence[Any]) -> list[str]:
    """Distinct scan ids: the file name without ``.nii``/``.nii.gz``, or the DICOM folder name.

    Equal names get their parent folder as a prefix (``case1_ct``, ``case2_ct``), then a counter;
    sources without a file name are ``scan_<position>``.
    """
    paths = [_source_path(s) for s in sources]
    ids = [_stem(p) if p is not None else f"scan_{i + 1}" for i, p in enumerate(paths)]
    repeated = {s for s in ids if ids.count(s) > 1}
    for i, p in enumerate(paths):
        if p is not None and ids[i] in repeated:
            parent = Path(os.path.abspath(p)).parent.name
            ids[i] = f"{parent}_{ids[i]}" if parent else ids[i]
    seen: dict[str, int] = {}
    for i, s in enumerate(ids):
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            ids[i] = f"{s}-{seen[s]}"
    return ids


def _check_ids(scan_ids: Sequence[str], n: int) -> list[str]:
    ids = [scan_ids] if isinstance(scan_ids, str) else list(scan_ids)
    if len(ids) != n:
        raise InputError(f"got {n} scans and {len(ids)} scan ids. Expected one id per scan, or scan_ids=None.")
    for s in ids:
        if not isinstance(s, str) or not s.strip() or s in (".", "..") or "/" in s or "\\" in s:
            raise InputError(
                f"invalid scan id {s!r}. Expected a non-empty string usable as a file name (no '/' or '\\')."
            )
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise InputError(f"scan ids must be distinct: {dup[:5]} repeat. Give each scan its own id.")
    return ids
