"""Building an index from scans or an embedding file, and searching it by text, finding or scan.

:func:`index_scans` and :func:`index_embeddings` are what ``visd index`` runs, :func:`search` what
``visd search`` runs. Scores are cosine similarities of unit vectors (a free-text query or a scan
query), or, for a catalogue finding, the zero-shot probability of its positive prompt, exactly as
``visd diagnose`` computes it. Exact search ranks every row of the organ (ties in index order);
``approximate=True`` asks the HNSW index of :mod:`visd.retrieval.approximate` instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visd.errors import InputError, did_you_mean

from .store import ScanIndex

__all__ = ["index_embeddings", "index_scans", "search"]

logger = logging.getLogger(__name__)


def _open_or_create(out: str | os.PathLike, organs: Sequence[str], dim: int, model: str | None,
                    approximate: bool) -> ScanIndex:
    if (Path(out) / "index.json").is_file():
        index = ScanIndex.open(out)
        if index.dim != dim or set(organs) - set(index.organs):
            raise InputError(
                f"the embeddings (dimension {dim}, organs {list(organs)}) do not fit the index in {out} "
                f"(dimension {index.dim}, organs {list(index.organs)}). Append embeddings of the same model, "
                "or build a new index in another folder."
            )
        if approximate and not index.approximate:
            index.set_approximate(True)
        return index
    return ScanIndex.create(out, organs, dim, model=model, approximate=approximate)


def index_embeddings(
    embeddings: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None, approximate: bool = False
) -> ScanIndex:
    """Add the scans of an embedding file (``visd diagnose --embeddings``) to the index in ``out``.

    ``out`` is created when it holds no index yet, else appended to. ``model`` (a folder or Hub repo
    id) is recorded so that ``search`` can encode text and scans without being told it again.
    """
    from visd.evaluation import load_embeddings

    emb = load_embeddings(embeddings)
    index = _open_or_create(out, emb.organs, emb.embeddings.shape[2], model, approximate)
    index.add(emb.embeddings, emb.scans, emb.organs)
    return index


def index_scans(
    inputs: Sequence[Any],
    masks: Sequence[Any],
    model: Any,
    out: str | os.PathLike,
    *,
    scan_ids: Sequence[str] | None = None,
    mask_format: str = "auto",
    approximate: bool = False,
    progress: bool = True,
) -> tuple[ScanIndex, list[tuple[str, str]]]:
    """Embed every organ of each scan and add the scans to the index in ``out`` (created or appended).

    Args:
        inputs, masks: CT files / DICOM folders and their organ masks, as :func:`visd.zero_shot.diagnose`
            takes them.
        model: a :class:`~visd.ViSDModel`, or a folder / Hub repo id (recorded in the index).

    Returns:
        The index and the scans that were skipped, with why (a bad scan never stops the others).
    """
    from tqdm.auto import tqdm

    from visd.zero_shot.loading import iter_cases
    from visd.zero_shot.pipeline import _as_model, _check_ids, _path_key, scan_ids_for

    source = None if not isinstance(model, (str, os.PathLike)) else str(model)
    model = _as_model(model)
    inputs, masks = list(inputs), list(masks)
    if len(inputs) != len(masks):
        raise InputError(f"got {len(inputs)} scans and {len(masks)} masks. Expected one organ mask per scan.")
    ids = scan_ids_for(inputs) if scan_ids is None else _check_ids(scan_ids, len(inputs))
    organs = model.organs
    if (Path(out) / "index.json").is_file():  # refuse known scan ids before the work, not after
        known = set(ScanIndex.open(out).rows()["scan"])
        clash = [s for s in ids if s in known]
        if clash:
            raise InputError(
                f"scan ids must be distinct across the index: {clash[:5]} are already indexed in {out}. "
                "Give each scan its own id (a scan column in the manifest)."
            )
    emb = np.full((len(inputs), len(organs), model.config.embed_dim), np.nan, dtype=np.float32)
    failed: list[tuple[str, str]] = []
    cases = iter_cases(ids, inputs, masks, model.config, mask_format=mask_format)
    for n, item in enumerate(tqdm(cases, total=len(ids), desc="visd index", unit="scan", file=sys.stderr,
                                  disable=not progress)):
        if item.case is None:
            logger.warning("skipped scan %r: %s", item.scan, item.error)
            failed.append((item.scan, item.error or "unreadable"))
            continue
        try:
            out_emb = model.encode_image(item.case.image, item.case.mask)
        except InputError as e:
            failed.append((item.scan, " ".join(str(e).split())))
            continue
        emb[n] = out_emb.embeddings.detach().float().cpu().numpy()
    bad = {s for s, _ in failed}
    keep = [n for n in range(len(ids)) if ids[n] not in bad]
    index = _open_or_create(out, organs, model.config.embed_dim, source, approximate)
    index.add(emb[keep], [ids[n] for n in keep], organs, [_path_key(inputs[n]) for n in keep])
    return index, failed


def _finding_spec(model: Any, name: str):
    names = [f.name for f in model.config.findings]
    if name not in names:
        raise InputError(
            f"unknown finding {name!r}: not in the model's catalogue. Expected one of {names[:8]}"
            f"{' ...' if len(names) > 8 else ''}.{did_you_mean(name, names)} Use --text for a free-text query."
        )
    return model.config.findings[names.index(name)]


def _query(index: ScanIndex, model: Any, *, text, finding, scan, mask, organ, mask_format):
    """(organ, query direction (E,), how to turn inner products into scores)."""
    import torch

    if finding is not None:
        spec = _finding_spec(model, finding)
        if organ is not None and organ != spec.organ:
            raise InputError(
                f"finding {finding!r} belongs to organ {spec.organ!r}, not {organ!r}. Drop --organ or pass "
                f"--organ {spec.organ}."
            )
        pair = model.prompt_embeddings([spec])[0].detach().float().cpu().numpy()  # (2, E): negative, positive
        scale = 1.0 / float(model.temperature.detach())

        def probability(vectors: np.ndarray) -> np.ndarray:
            logits = torch.from_numpy(vectors @ pair.T * scale)
            return torch.softmax(logits, dim=-1)[:, 1].numpy()

        return spec.organ, pair[1] - pair[0], probability
    if organ is None:
        raise InputError(f"a text or scan query needs an organ: pass --organ, one of {list(index.organs)}.")
    index.check_organ(organ)
    if text is not None:
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"the text query is empty: {text!r}. Pass a phrase such as 'pleural effusion'.")
        with torch.no_grad():
            q = model.encode_text([text])[0].float().cpu().numpy()
    else:
        from visd.data import load_case

        case = load_case(scan, mask, model.config, mask_format=mask_format)
        with torch.no_grad():
            emb = model.encode_image(case.image, case.mask, organs=[organ])
        if emb.status[organ] != "scored":
            raise InputError(
                f"the query scan has no embedding of organ {organ!r}: {emb.status[organ]}. Pick an organ its mask "
                "holds inside the field of view."
            )
        q = emb[organ].detach().float().cpu().numpy()
    q = q / np.linalg.norm(q)
    return organ, q, None


def search(
    index: ScanIndex | str | os.PathLike,
    *,
    text: str | None = None,
    finding: str | None = None,
    scan: Any = None,
    mask: Any = None,
    organ: str | None = None,
    top: int = 20,
    model: Any = None,
    approximate: bool = False,
    mask_format: str = "auto",
) -> pd.DataFrame:
    """The ``top`` scans most similar to one query, best first.

    Args:
        index: a :class:`ScanIndex` or its folder.
        text: a free-text query, scored by cosine similarity with each scan's ``organ`` embedding.
        finding: a finding of the model's catalogue, scored by its zero-shot probability (its organ is
            the finding's own).
        scan, mask: a query CT and its organ mask, scored by cosine similarity of the ``organ`` embeddings.
        organ: the organ to compare (needed for ``text`` and ``scan``).
        top: how many results.
        model: a :class:`~visd.ViSDModel` or a folder / Hub repo id (default: the model the index records).
        approximate: ask the HNSW index (``visd index --approximate``) instead of ranking every row.

    Returns:
        A table with columns ``rank`` (1-based), ``scan``, ``organ``, ``score``, ``image``.
    """
    from visd.zero_shot.pipeline import _as_model

    index = index if isinstance(index, ScanIndex) else ScanIndex.open(index)
    given = [name for name, v in (("text", text), ("finding", finding), ("scan", scan)) if v is not None]
    if len(given) != 1:
        raise InputError(f"pass exactly one query (text, finding or scan): got {given or 'none'}.")
    if scan is not None and mask is None:
        raise InputError("a scan query needs its organ mask: pass mask= (--mask), e.g. its TotalSegmentator output.")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top must be an integer >= 1, got {top!r}.")
    if model is None:
        if index.model is None:
            raise InputError(
                f"the index in {index.folder} does not record its model. Pass the model the embeddings came from "
                "(--model)."
            )
        model = index.model
    model = _as_model(model)
    if model.config.embed_dim != index.dim:
        raise InputError(
            f"the model's embedding dimension {model.config.embed_dim} differs from the index's {index.dim}. "
            "Pass the model the index was built with."
        )
    organ, q, to_score = _query(
        index, model, text=text, finding=finding, scan=scan, mask=mask, organ=organ, mask_format=mask_format
    )
    rows, vectors = index.vectors(organ)
    if approximate:
        from .approximate import nearest

        order = nearest(index, organ, q, top)
    else:
        order = np.argsort(-(vectors @ q), kind="stable")[:top]
    picked = vectors[order]
    scores = to_score(picked) if to_score is not None else picked @ q
    table = rows.iloc[order].reset_index(drop=True)[["scan", "organ", "image"]]
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.insert(3, "score", scores.astype(np.float64))
    return table
