"""A journal of a batch run's finished scans, so that an interrupted run resumes where it stopped.

:func:`~visd.zero_shot.diagnose` with ``journal=`` appends one JSON line per diagnosed scan (its table
rows, its embedding rows, its anomaly-map files) and flushes it to disk before the next scan starts. A
run started again with ``resume=True`` takes those scans from the journal and computes only the rest;
the report is the same as that of an uninterrupted run.

The first line holds a fingerprint of everything that decides a scan's result: the model's config and
weights, the findings, the mask format and the outputs asked for. A journal with another fingerprint
is refused, so results of two setups never mix. A scan is taken from the journal only when its source
path is the same (scans given as in-memory images are always computed) and its anomaly maps, if any,
still exist; skipped scans are not journaled (they are tried again). A last line cut off by a crash is
dropped. The file is written with the first diagnosed scan, so a run that stops before one (or whose
every scan fails) leaves no journal that would ask for ``resume``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visd import _fault
from visd._io import atomic_write_text
from visd.errors import InputError

__all__ = ["JOURNAL_FORMAT", "Journal", "ScanOutcome", "fingerprint", "holds_scans"]

logger = logging.getLogger(__name__)

JOURNAL_FORMAT = "visd.diagnose-journal/1"


@dataclass
class ScanOutcome:
    """What one diagnosed scan adds to a report.

    Attributes:
        scan: scan id.
        source: the scan's absolute path, or ``None`` for an in-memory image.
        rows: ``(organ, finding, probability, status)`` per finding, in catalogue order.
        embeddings: ``(N_organs, E)`` float32 organ embeddings (NaN rows where not scored), or ``None``.
        anomaly_maps: the ``(nifti, png)`` files written, or ``None``.
    """

    scan: str
    source: str | None
    rows: list[tuple[str, str, float, str]]
    embeddings: np.ndarray | None = None
    anomaly_maps: tuple[Path, Path] | None = None

    def to_json(self) -> str:
        emb = None
        if self.embeddings is not None:
            emb = base64.b64encode(np.ascontiguousarray(self.embeddings, dtype="<f4").tobytes()).decode("ascii")
        return json.dumps({
            "scan": self.scan,
            "source": self.source,
            "rows": [[o, f, None if np.isnan(p) else float(p), s] for o, f, p, s in self.rows],
            "embeddings": emb,
            "anomaly_maps": None if self.anomaly_maps is None else [str(p) for p in self.anomaly_maps],
        })

    @classmethod
    def from_json(cls, line: str, shape: tuple[int, int]) -> ScanOutcome:
        d = json.loads(line)
        emb = d["embeddings"]
        if emb is not None:
            emb = np.frombuffer(base64.b64decode(emb), dtype="<f4").reshape(shape).astype(np.float32)
        maps = d["anomaly_maps"]
        return cls(
            scan=d["scan"],
            source=d["source"],
            rows=[(o, f, float("nan") if p is None else float(p), s) for o, f, p, s in d["rows"]],
            embeddings=emb,
            anomaly_maps=None if maps is None else (Path(maps[0]), Path(maps[1])),
        )


def fingerprint(model: Any, specs: Sequence[Any], mask_format: str, options: dict[str, Any]) -> str:
    """SHA-256 over the model's config and weights (raw bytes), the findings, the mask format and ``options``."""
    h = hashlib.sha256()
    setup = {
        "config": model.config.model_dump(mode="json"),
        "findings": [s.model_dump(mode="json") for s in specs],
        "mask_format": mask_format,
        "options": options,
    }
    h.update(json.dumps(setup, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


class Journal:
    """The journal file of one run: the scans it holds, and appending new ones."""

    def __init__(self, path: str | os.PathLike, key: str, shape: tuple[int, int], *, resume: bool) -> None:
        self.path, self.key, self.shape = Path(path), key, shape
        self.done: dict[str, ScanOutcome] = {}
        self._header = json.dumps({"format": JOURNAL_FORMAT, "fingerprint": key, "embeddings_shape": list(shape)})
        self._on_disk = False  # the file is (re)written with the first scan, so a run that diagnosed none leaves none
        self._appended = 0
        if resume and self.path.is_file():
            self.done = self._read()
            logger.info("journal %s: %d scan(s) already diagnosed", self.path, len(self.done))
        elif resume:
            logger.info("journal %s not found: starting a new one", self.path)
        else:
            self.path.unlink(missing_ok=True)  # starting over

    def _read(self) -> dict[str, ScanOutcome]:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
            raise InputError(
                f"{self.path} is not a visd diagnose journal (its first line is not a {JOURNAL_FORMAT} header). "
                "Pass the journal of the interrupted run, or run without resume to start over."
            )
        if header.get("fingerprint") != self.key:
            raise InputError(
                f"journal {self.path} was written by a run with another model, findings, mask format or outputs. "
                "Resume with the same settings, or run without resume (the journal is then started over)."
            )
        done: dict[str, ScanOutcome] = {}
        body = lines[1:]
        complete = body[:-1] if not text.endswith("\n") else body  # the last line of a crash may be cut off
        if not text.endswith("\n") and body and body[-1]:
            logger.warning("journal %s: dropped a last line cut off by an interruption", self.path)
        for i, line in enumerate(complete):
            if not line:
                continue
            try:
                outcome = ScanOutcome.from_json(line, self.shape)
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                raise InputError(
                    f"journal {self.path}, line {i + 2}, cannot be read ({type(e).__name__}: {e}). "
                    "The file was changed or damaged; run without resume to start over."
                ) from e
            done[outcome.scan] = outcome
        return done

    def reusable(self, scan: str, source: str | None) -> ScanOutcome | None:
        """The journaled outcome of ``scan`` when it can stand for a new run of it, else ``None``."""
        outcome = self.done.get(scan)
        if outcome is None or source is None or outcome.source != source:
            return None
        if outcome.anomaly_maps is not None and not all(p.is_file() for p in outcome.anomaly_maps):
            return None
        return outcome

    def append(self, outcome: ScanOutcome) -> None:
        """Add a diagnosed scan, on disk before this returns."""
        if not self._on_disk:  # header, the scans taken over (without a line a crash cut off), this scan
            lines = [self._header, *(o.to_json() for o in self.done.values()), outcome.to_json()]
            atomic_write_text(self.path, "\n".join(lines) + "\n")
            self._on_disk = True
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(outcome.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.done[outcome.scan] = outcome
        self._appended += 1
        _fault.kill_if_armed(os.environ.get("RANK", "0"), self._appended, _fault.DIAGNOSE_ENV)  # tests only


def holds_scans(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that a new run must not replace: a journal with at least one diagnosed
    scan, or a file that is not a visd journal. A journal with only its header (a run that diagnosed
    nothing) holds nothing to resume."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        first, *rest = path.read_text(encoding="utf-8").split("\n")
        header = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError):
        return True
    if not isinstance(header, dict) or header.get("format") != JOURNAL_FORMAT:
        return True
    return any(line.strip() for line in rest)
