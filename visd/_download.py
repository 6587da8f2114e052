"""HTTP download of one release file: resumed with ``Range``, redirects followed, size and sha256 checked.

Standard library only (``urllib``), so it works with every huggingface_hub version visd supports and
honours the usual proxy variables (``HTTPS_PROXY``, ``NO_PROXY``). The bytes go to ``<dest>.part``;
only a file whose size and sha256 match is renamed to ``dest``. A file that fails the check is deleted.
A cut connection is resumed from the end of the partial file (a few times while it makes progress);
a partial file left by an earlier, killed run is resumed the same way, and the whole file is checked
at the end, so a bad partial can cost a download but never a wrong file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from visd.errors import CheckpointMismatchError, WeightsNotFoundError

__all__ = ["download_file", "file_matches", "DownloadUnreachable"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_ATTEMPTS = 5
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadUnreachable(WeightsNotFoundError):
    """The server could not be reached, or answered with an HTTP error: nothing was downloaded."""


def _sha256_of(path: Path, hasher=None):
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            hasher.update(block)
    return hasher


def file_matches(path: Path, *, size: int, sha256: str) -> bool:
    """True when ``path`` is a file of exactly ``size`` bytes hashing to ``sha256``."""
    return path.is_file() and path.stat().st_size == size and _sha256_of(path).hexdigest() == sha256


def _open(url: str, start: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "visd", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    # urllib follows redirects (GitHub's raw URL -> its media host) and keeps the Range header
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)


class _Restart(Exception):
    """The partial file cannot be resumed (the server refuses its range): start again from zero."""


def _wrong_size(url: str, got: int, size: int) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{url} is {got:,} bytes, expected {size:,}: the server holds another file. "
        "Check the URL (or VISD_RELEASE_MIRROR) and the registered size."
    )


def _body_start(response: http.client.HTTPResponse, start: int, size: int, url: str) -> int:
    """Where the body of ``response`` starts in the file; checks the announced size against ``size``."""
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != start:
            raise http.client.HTTPException(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        if match[3] != "*" and int(match[3]) != size:
            raise _wrong_size(url, int(match[3]), size)
        return start
    length = response.headers.get("Content-Length")
    if length is not None and int(length) != size:
        raise _wrong_size(url, int(length), size)
    return 0  # a server that ignores Range sends the whole file again


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fetch_once(url: str, part: Path, size: int, bar) -> None:
    """One request: append to ``part`` from its current end (or rewrite it); may stop short."""
    have = _size(part)
    try:
        response = _open(url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is not a prefix of anything the server has
            part.unlink()
            raise _Restart() from e
        raise
    with response:
        start = _body_start(response, have, size, url)
        if start == 0 and have:
            logger.info("%s: the server ignored the range request; downloading from the start", url)
        bar.reset(total=size)
        bar.update(start)
        with open(part, "ab" if start else "wb") as f:
            while block := response.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
                if f.tell() > size:
                    break
            f.flush()
            os.fsync(f.fileno())


def download_file(url: str, dest: Path, *, size: int, sha256: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the file; returns ``dest``.

    Raises :class:`DownloadUnreachable` when the download makes no progress (connection refused, DNS,
    an HTTP error, a connection that keeps dropping) and :class:`~visd.errors.CheckpointMismatchError`
    when the bytes do not match ``size`` and ``sha256`` (the file is deleted). The partial file
    ``<dest>.part`` survives other failures, for the next call to resume.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists():
        if file_matches(dest, size=size, sha256=sha256):
            return dest
        logger.warning("%s does not match its sha256; downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if _size(part) > size:
        part.unlink()
    resumed = _size(part) > 0
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress,
              leave=False) as bar:
        attempts = 0
        while (before := _size(part)) < size:
            error: BaseException | None = None
            try:
                _fetch_once(url, part, size, bar)
            except _Restart:
                if not resumed:
                    raise DownloadUnreachable(f"{url} refused the range request of a fresh download") from None
                resumed = False
                continue
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                error = e
            after = _size(part)
            if after >= size:
                break
            attempts += 1
            if after <= before or attempts >= _ATTEMPTS:
                if isinstance(error, urllib.error.HTTPError):
                    raise DownloadUnreachable(f"{url} answered HTTP {error.code} {error.reason}") from error
                if error is not None:
                    raise DownloadUnreachable(f"{url} could not be reached: {getattr(error, 'reason', error)}") from error
                raise DownloadUnreachable(f"{url} stopped sending at {after:,} of {size:,} bytes")
            logger.info("%s: download cut at %d of %d bytes; resuming with a range request", url, after, size)
        have = _size(part)
        if have == size and _sha256_of(part).hexdigest() == sha256:
            os.replace(part, dest)
            return dest
        part.unlink()
    if resumed:  # the old partial file may have been bad: one clean download from the start
        logger.warning("%s failed its check after resuming an earlier partial file; downloading it again", url)
        return download_file(url, dest, size=size, sha256=sha256, progress=progress)
    raise CheckpointMismatchError(
        f"the download of {url} does not match its registered checksum: expected {size:,} bytes with "
        f"sha256 {sha256}, got {have:,} bytes with another hash. The file was deleted. Run again; if it "
        "fails again, the server (or VISD_RELEASE_MIRROR) holds another file than the one registered."
    )
