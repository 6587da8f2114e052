"""Stand-in for the registry branch's named pretrained models (only what ``visd demo`` needs).

Replaced by the registry branch: drop this commit when merging.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "cache_folder", "cached_folder"]

DEFAULT_MODEL = "visd-boost-ctrate"


def cache_folder(name: str) -> Path:
    """Where the converted folder of the named model lives (``$VISD_HOME`` or ``~/.cache/visd``)."""
    home = os.environ.get("VISD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "visd")
    return Path(home) / "models" / name


def cached_folder(name: str) -> Path | None:
    """The converted folder of the named model when it is complete in the cache, else ``None`` (no network)."""
    folder = cache_folder(name)
    complete = all((folder / f).is_file() for f in ("config.json", "model.safetensors", ".complete"))
    return folder if complete else None
