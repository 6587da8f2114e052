"""Sharded diagnosis under ``torchrun``: every rank diagnoses its share, rank 0 merges one table.

``torchrun --nproc_per_node N [--nnodes M ...] -m visd.cli diagnose --manifest cases.csv --out results.csv``:

* **Shares.** Rank ``r`` of ``W`` takes the scans that a longest-first greedy assignment of the scan
  sizes (bytes of the file, or of the DICOM folder's files) gives it: each scan, largest first (ties
  in manifest order), goes to the rank with the fewest bytes so far (ties: the lowest rank). The shares
  depend only on the manifest, the files and ``W``; each rank diagnoses its share in manifest order.
* **Journals.** Rank ``r`` journals its scans to ``OUT.journal.rank<r>`` (:mod:`visd.zero_shot.journal`).
  ``--resume`` reads every journal there is (those of any world size, and the ``OUT.journal`` of a
  one-process run), and each rank starts its new journal with the lines of its own share, so a run
  resumes with another number of ranks too, or as one plain process (``visd diagnose --resume``).
* **Merge.** Rank 0 gathers the ranks' results (gloo, also when the ranks use GPUs) and writes the
  table, JSON and embedding file in manifest order, atomically, then removes the journals. A bad scan
  is skipped on its rank as in one process; it never stops the others.
* **Devices.** One GPU per rank (``LOCAL_RANK``) when CUDA is available, else the CPU. The process group
  is joined as in training (:func:`visd._distributed.join_process_group`).

A crash of any rank ends the whole ``torchrun`` job (its agent stops the other ranks); what the ranks
journaled is kept, and the next ``--resume`` diagnoses only the rest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visd.errors import InputError

__all__ = ["rank_journals", "run_sharded", "shares", "wanted"]

logger = logging.getLogger(__name__)


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank_journals(out: str | os.PathLike) -> list[Path]:
    """The per-rank journals of a sharded run writing ``out``."""
    out = Path(out)
    return sorted(out.parent.glob(out.name + ".journal.rank*"))


def wanted(out: str | os.PathLike) -> bool:
    """True when ``visd diagnose`` runs under torchrun or the journals of a sharded run are there."""
    return _under_torchrun() or bool(rank_journals(out))


def _size(source: Any) -> int:
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None:
        return 0
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def shares(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Indices of each rank's scans (longest-first greedy on ``sizes``), each share in manifest order."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += sizes[i]
    return [sorted(s) for s in out]


def _journaled(paths: Sequence[Path]) -> tuple[str | None, dict[str, str]]:
    """(the common header line, scan -> its journal line) over all ``paths``; cut-off lines are dropped."""
    header, lines = None, {}
    for path in paths:
        text = path.read_text(encoding="utf-8").split("\n")
        if header is not None and text[0] != header:
            raise InputError(
                f"the journals {[str(p) for p in paths]} come from runs with different settings (model, findings, "
                "mask format or outputs). Keep the journals of one run only, or start over without --resume."
            )
        header = text[0]
        for line in text[1:]:
            try:
                lines[json.loads(line)["scan"]] = line
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the last line of a crash, cut off
    return header, lines


def run_sharded(args, inputs: list, masks: list, scan_ids: list[str] | None, segment_dir: Any) -> int:
    """``visd diagnose`` as one rank of a torchrun job (or alone, resuming a sharded run)."""
    import torch
    import torch.distributed as dist

    from visd._distributed import join_process_group
    from visd._io import atomic_write_text
    from visd.models.model import ViSDModel
    from visd.models.numerics import numerics_for
    from visd.pretrained import DEFAULT_MODEL

    from .findings import load_findings
    from .pipeline import _check_ids, diagnose, scan_ids_for
    from .report import DiagnosisReport

    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if torch.cuda.is_available() and local >= gpus:
        raise InputError(
            f"rank with LOCAL_RANK={local} has no GPU of its own: this node has {gpus}. Start at most {gpus} "
            "processes per node (torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU."
        )
    env = join_process_group(None, "gloo")  # gloo also when the ranks use GPUs: the merge sends objects
    try:
        out = Path(args.out)
        ids = scan_ids_for(inputs) if scan_ids is None else _check_ids(scan_ids, len(inputs))
        old = [p for p in [Path(str(out) + ".journal"), *rank_journals(out)] if p.is_file()]
        if args.resume and not old:
            raise InputError(f"--resume: no journal of an interrupted run next to {out}. Run without --resume.")
        if not args.resume and old:
            raise InputError(
                f"{old[0]} holds the scans of an interrupted run. Pass --resume to continue it (with any number of "
                "ranks), or delete the journals to start over."
            )
        model = ViSDModel.from_pretrained(args.model if args.model is not None else DEFAULT_MODEL).to(env.device)
        numerics, numerics_note = numerics_for(args.numerics, env.device)
        model.set_numerics(numerics)
        findings = load_findings(args.findings, model.organs) if args.findings else None
        share = shares([_size(s) for s in inputs], env.world)[env.rank]
        header, lines = _journaled(old) if args.resume else (None, {})
        env.barrier()  # every rank has read the old journals before any is rewritten
        journal = Path(f"{out}.journal.rank{env.rank}")
        if header is not None:
            body = [lines[ids[i]] for i in share if ids[i] in lines]
            atomic_write_text(journal, "\n".join([header, *body]) + "\n")
        emb_path = Path(f"{out}.rank{env.rank}.embeddings.safetensors") if args.embeddings else None
        report = DiagnosisReport(scans=(), records=[], organs=model.organs, embeddings=None, numerics=model.numerics.describe())
        if share:  # more ranks than scans leaves some ranks without any
            report = diagnose(
                [inputs[i] for i in share], [masks[i] for i in share], model, findings=findings,
                mask_format=args.mask_format, anomaly_maps_dir=args.anomaly_maps, embeddings_path=emb_path,
                progress=not args.no_progress and env.rank == 0, scan_ids=[ids[i] for i in share],
                segment_dir=segment_dir, num_workers=args.workers, journal=journal, resume=header is not None,
                dicom_out=args.dicom_out,
            )
        if emb_path is not None:
            emb_path.unlink(missing_ok=True)  # rank 0 writes the merged file
        part = (share, report)
        parts = [part]
        if env.world > 1:
            parts = [None] * env.world if env.rank == 0 else None
            dist.gather_object(part, parts, dst=0)
        code = 0
        if env.rank == 0:
            merged = _merge(parts, ids, model.organs, DiagnosisReport)
            merged.numerics = model.numerics.describe()
            written = [str(merged.to_csv(out))]
            if args.json:
                written.append(str(merged.to_json(args.json)))
            if args.embeddings:
                from visd.evaluation import save_embeddings

                written.append(str(save_embeddings(args.embeddings, merged.embeddings, list(ids), list(model.organs))))
            for path in [Path(str(out) + ".journal"), *rank_journals(out)]:
                path.unlink(missing_ok=True)  # every output is written
            print(merged.format_table())
            print()
            n, bad = len(ids), len(merged.failed)
            resumed = f" ({len(merged.resumed)} taken from the journals)" if merged.resumed else ""
            print(f"diagnosed {n} scan(s) on {env.world} rank(s): {n - bad} ok{resumed}, {bad} failed; "
                  f"numerics {merged.numerics} ({numerics_note}); wrote {', '.join(written)}")
            code = 1 if bad else 0
        if env.world > 1:  # every rank exits with the run's code (1: some scans were skipped)
            box = [code]
            dist.broadcast_object_list(box, src=0)
            code = box[0]
        return code
    finally:
        if env.created:
            dist.destroy_process_group()


def _merge(parts, ids: Sequence[str], organs: tuple[str, ...], report_cls):
    """One report over the whole manifest, in manifest order, from each rank's (share, report)."""
    by_scan: dict[str, list] = {}
    emb = None
    failed, resumed, maps = {}, set(), {}
    for share, report in parts:
        for r in report.records:
            by_scan.setdefault(r["scan"], []).append(r)
        failed.update(report.failed)
        resumed.update(report.resumed)
        maps.update(report.anomaly_maps)
        if report.embeddings is not None and share:
            if emb is None:
                emb = np.full((len(ids), *report.embeddings.shape[1:]), np.nan, dtype=np.float32)
            emb[share] = report.embeddings
    return report_cls(
        scans=tuple(ids), records=[r for s in ids for r in by_scan[s]], organs=organs, embeddings=emb,
        failed=[(s, failed[s]) for s in ids if s in failed], anomaly_maps={s: maps[s] for s in ids if s in maps},
        resumed=[s for s in ids if s in resumed],
    )
