"""Retrieval over an archive: an appendable index of per-organ embeddings, searched by text, finding or scan.

Typical use::

    from visd.retrieval import index_scans, search
    index, failed = index_scans(images, masks, "visd-model/", "archive/")
    search("archive/", text="pleural effusion", organ="lung", top=20)      # text -> scan
    search("archive/", scan="ct.nii.gz", mask="ct_seg.nii.gz", organ="heart")  # scan -> scan

See ``docs/retrieval.md`` for the on-disk format and the approximate index.
"""

from .search import index_embeddings, index_scans, search
from .store import INDEX_FORMAT, ScanIndex

__all__ = ["INDEX_FORMAT", "ScanIndex", "index_embeddings", "index_scans", "search"]
