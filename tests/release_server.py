"""A loopback emulator of GitHub's release-file downloads, for tests of visd's URL downloads.

``LoopbackRelease`` serves files on ``127.0.0.1`` the way GitHub serves Git LFS content of a repo:
``GET /<owner>/<repo>/raw/<commit>/<path>`` on the "github" origin answers ``302`` with a ``Location``
on a second origin, the "media" host (``/media/<owner>/<repo>/<commit>/<path>``, as
``media.githubusercontent.com``), which sends the bytes and honours ``Range: bytes=N-`` / ``N-M``
(``206`` with ``Content-Range``; ``416`` past the end). Any other path added with :meth:`add_file` is
served directly (``200``/``206``) by the origin, which is how a plain mirror (``VISD_RELEASE_MIRROR``)
looks. :meth:`cut_once` makes the next download of a file stop after some bytes: the headers announce
the full length, then the connection is closed mid-body, as a dropped connection does.

Every request is logged as ``(host, method, path, range)`` with host ``"github"`` or ``"media"``.
Used together with :mod:`hub_server` (the Hub's endpoints, for the text encoder).
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["LoopbackRelease"]

_RAW = re.compile(r"^/(?P<owner>[^/]+)/(?P<repo>[^/]+)/raw/(?P<commit>[^/]+)/(?P<path>.+)$")
_MEDIA = re.compile(r"^/media/(?P<owner>[^/]+)/(?P<repo>[^/]+)/(?P<commit>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class LoopbackRelease:
    """A GitHub-like file origin and its media host on ``127.0.0.1``; use as a context manager."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}  # origin path -> bytes
        self._cuts: dict[str, int] = {}  # origin path -> bytes to send before closing, once
        self._log: list[tuple[str, str, str, str | None]] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    def add_file(self, path: str, data: bytes) -> str:
        """Serve ``data`` at ``path`` (e.g. ``/org/repo/raw/<commit>/checkpoint.pth``); returns its URL."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        with self._lock:
            self._files[path] = bytes(data)
        return self.endpoint + path

    def cut_once(self, path: str, after: int) -> None:
        """The next body of ``path`` (on whichever host sends it) stops after ``after`` bytes."""
        with self._lock:
            self._cuts[path] = after

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the "github" origin."""
        return self._url(0)

    @property
    def media_endpoint(self) -> str:
        return self._url(1)

    def _url(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("LoopbackRelease is not started: use 'with LoopbackRelease() as release:'")
        return f"http://127.0.0.1:{self._servers[index].server_address[1]}"

    def __enter__(self) -> LoopbackRelease:
        for host in ("github", "media"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.release = self  # type: ignore[attr-defined]
            server.host_name = host  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    # -- request log ------------------------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str, str, str | None]]:
        """``(host, method, path, Range header or None)`` of every request, in arrival order."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def _record(self, entry: tuple[str, str, str, str | None]) -> None:
        with self._lock:
            self._log.append(entry)

    def _file(self, path: str) -> bytes | None:
        with self._lock:
            return self._files.get(path)

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)


class _Handler(BaseHTTPRequestHandler):
    server_version = "LoopbackRelease"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        release: LoopbackRelease = self.server.release  # type: ignore[attr-defined]
        host: str = self.server.host_name  # type: ignore[attr-defined]
        path = unquote(urlsplit(self.path).path)
        release._record((host, self.command, path, self.headers.get("Range")))
        if host == "media":
            match = _MEDIA.match(path)
            origin_path = f"/{match['owner']}/{match['repo']}/raw/{match['commit']}/{match['path']}" if match else ""
            return self._send_file(release, origin_path, send_body)
        if (match := _RAW.match(path)) and release._file(path) is not None:
            location = f"{release.media_endpoint}/media/{match['owner']}/{match['repo']}/{match['commit']}/{match['path']}"
            return self._send(302, {"Location": location, "Content-Length": "0"})
        self._send_file(release, path, send_body)

    def _send_file(self, release: LoopbackRelease, path: str, send_body: bool) -> None:
        data = release._file(path)
        if data is None:
            body = b"Not Found"
            self._send(404, {"Content-Type": "text/plain", "Content-Length": str(len(body))})
            return self.wfile.write(body) if send_body else None
        start, end, status = 0, len(data), 200
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if match := _RANGE.match(self.headers.get("Range", "")):
            start = int(match[1])
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            if start >= len(data):
                return self._send(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        headers["Content-Length"] = str(end - start)
        self._send(status, headers)
        if not send_body:
            return
        cut = release._take_cut(path)
        body = data[start:end]
        if cut is not None:  # announce everything, send part of it, drop the connection
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
