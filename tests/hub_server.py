"""A loopback emulator of the Hugging Face Hub's file endpoints, for tests of Hub loading and pushing.

``LoopbackHub`` serves model repos from local folders on ``127.0.0.1`` so that the real
``huggingface_hub`` client (``hf_hub_download``, ``snapshot_download``, ``HfApi().model_info``)
can download from it, and ``HfApi().create_repo`` / ``upload_folder`` / ``create_commit`` can push
to it. Downloads: it answers what huggingface_hub 2.x asks for:

* ``GET /api/models/{repo_id}`` and ``GET /api/models/{repo_id}/revision/{revision}``: model info
  with ``sha`` and ``siblings`` (``snapshot_download`` resolves the revision to a commit here);
* ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...``: the file listing
  ``snapshot_download`` downloads from;
* ``GET /api/models/{repo_id}/commits/{revision}``: the history (``HfApi().list_repo_commits``);
* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: file metadata and bytes. Regular files
  answer 200 with ``X-Repo-Commit``, ``ETag`` (the git blob id) and ``Content-Length``. LFS files
  (weights: see ``LFS_SUFFIXES``) answer 302 with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``
  and a ``Location`` on a second loopback server, the "CDN", as the Hub redirects to its CDN.
  No ``X-Xet-*`` header is ever sent, so the client uses plain HTTP downloads.

Uploads, as huggingface_hub 2.4 sends them (``create_repo`` then ``upload_folder``):

* ``POST /api/repos/create``: a new repo gets an initial commit holding ``.gitattributes`` (the LFS
  rules below), as on the Hub; an existing one answers 409 with its ``url``, which
  ``create_repo(exist_ok=True)`` accepts;
* ``POST /api/validate-yaml``: the model card front matter must be a closed ``---`` block;
* ``POST /api/models/{repo_id}/preupload/{revision}``: per file, ``uploadMode`` "lfs" (suffix in
  ``LFS_SUFFIXES`` or 10 MiB and more, the rule downloads use) or "regular", and the ``oid`` of the
  file already on the branch, so the client skips unchanged files (and a push that changes nothing
  makes no commit: the branch keeps its sha);
* ``POST /{repo_id}.git/info/lfs/objects/batch``: the LFS "basic" transfer: for each object not yet
  stored, an ``upload`` href on the CDN origin (``PUT /lfs-upload/{repo_id}/{sha256}``, accepted only
  for objects announced by a batch, and only if the bytes hash to the oid) and a ``verify`` href
  (``POST /{repo_id}.git/info/lfs/objects/verify``); stored objects get no actions;
* ``POST /api/models/{repo_id}/commit/{branch}``: the NDJSON commit (``header``; ``file`` with
  base64 content; ``lfsFile`` by sha256, which must have been uploaded; ``deletedFile``;
  ``deletedFolder``; ``parentCommit`` checked, 412 if stale). It moves the branch to a new commit whose
  sha hashes the repo id, parent, message and tree (so every commit is new, unlike ``add_repo``) and
  answers ``commitOid`` / ``commitUrl`` (``{endpoint}/{repo_id}/commit/{sha}``). Pushed files are
  served by the download endpoints above, byte for byte.

Writes need ``Authorization: Bearer <token>`` (any non-empty token); without one they answer 401, as
the Hub does. Reads need none. Xet is not emulated: huggingface_hub 2.4 picks Xet uploads on the client
side whenever ``hf_xet`` is installed (``upload_folder`` -> ``pipelined_upload``; the server is not
asked), so :func:`use_loopback_hub` and :func:`hf_subprocess_env` set ``HF_HUB_DISABLE_XET``, which
sends it through ``create_commit`` and the LFS batch API above; its Xet token endpoints answer 501
saying so. Pull requests (``create_pr``) answer 501 too.

Unknown repos, revisions and files answer 404 with the ``X-Error-Code`` the client maps to
``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``RemoteEntryNotFoundError``. Every
request is logged, so a test can assert what was fetched, what was pushed and that an offline load
sent nothing.

Only model repos with ``namespace/name`` ids are served; no pagination, no private-repo access checks
(``private`` is recorded and reported by model info only), no branches other than those made with
``add_repo``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

__all__ = [
    "LFS_SUFFIXES", "LoopbackHub", "force_hf_offline", "hf_subprocess_env", "loopback_hub", "use_loopback_hub",
]

# Files stored with git-lfs, as the Hub's default .gitattributes does for weights and archives.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy", ".npz", ".gz", ".zip",
)
_LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub refuses larger files outside LFS
_DATE = "2024-01-01T00:00:00.000Z"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|commits)/(?P<rev>[^/]+)(?P<path>/.*)?)?$"
)
_CDN = re.compile(r"^/cdn-lfs/(?P<repo>[^/]+/[^/]+)/(?P<sha256>[0-9a-f]{64})$")
_PUSH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)$")
_LFS_API = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)$")
_LFS_PUT = re.compile(r"^/lfs-upload/(?P<repo>[^/]+/[^/]+)/(?P<sha256>[0-9a-f]{64})$")
_XET = re.compile(r"^/api/models/[^/]+/[^/]+/xet-(?:read|write)-token(?:/.*)?$")
_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _stored_with_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= _LFS_MIN_SIZE


class _HubError(Exception):
    """An error answer: status, ``X-Error-Code`` (or None) and message."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class _File:
    data: bytes
    blob_id: str  # git blob id of what git stores: the bytes, or the LFS pointer
    sha256: str | None  # set for LFS files
    pointer_size: int | None

    @classmethod
    def read(cls, path: Path, relpath: str) -> _File:
        data = path.read_bytes()
        return cls.of(data, lfs=_stored_with_lfs(relpath, len(data)))

    @classmethod
    def of(cls, data: bytes, *, lfs: bool) -> _File:
        if not lfs:
            return cls(data, _git_blob_id(data), None, None)
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return cls(data, _git_blob_id(pointer), sha256, len(pointer))

    def tree_entry(self, path: str) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": self.pointer_size}
        return entry


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _File]  # posix path in the repo -> file
    parent: str | None = None
    title: str = "Add files with LoopbackHub.add_repo"
    message: str = ""


def _tree(files: dict[str, _File]) -> str:
    return "".join(f"{path}\0{f.blob_id}\n" for path, f in sorted(files.items()))


def _pushed_commit(repo_id: str, parent: str | None, title: str, message: str, files: dict[str, _File]) -> _Commit:
    sha = hashlib.sha1(f"{repo_id}\n{parent}\n{title}\n{message}\n{_tree(files)}".encode()).hexdigest()
    return _Commit(sha, files, parent, title, message)


class LoopbackHub:
    """A Hub emulator on ``127.0.0.1`` (ephemeral ports) serving repos added with :meth:`add_repo`.

    Use as a context manager (or :meth:`start` / :meth:`stop`). ``endpoint`` is the value for
    ``HF_ENDPOINT``; ``requests`` is the log of ``(method, path)`` received by the Hub and its CDN,
    paths percent-decoded and without query string, in arrival order.
    """

    def __init__(self) -> None:
        self._repos: dict[str, dict[str, _Commit]] = {}  # repo id -> revision name or commit sha -> commit
        self._private: set[str] = set()
        self._lfs: dict[str, bytes] = {}  # sha256 -> bytes of every LFS object stored
        self._lfs_expected: dict[str, int] = {}  # sha256 -> size, announced by a batch, not yet PUT
        self._log: list[tuple[str, str]] = []
        self._downloads: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- repos ------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str | os.PathLike, *, revision: str = "main") -> str:
        """Serve the files under ``folder`` as ``repo_id`` at ``revision``; returns the commit sha.

        The files are read now (later edits to ``folder`` are not seen). Adding the same repo
        again under another revision name adds a revision; under the same name it moves that
        branch to the new commit. The commit sha (40 hex) is a hash of the repo id and the file
        tree, so identical content gives the same commit. The commit sha also works as a revision.
        """
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo id must be 'namespace/name', got {repo_id!r}")
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"repo folder not found: {root}")
        files = {
            p.relative_to(root).as_posix(): _File.read(p, p.relative_to(root).as_posix())
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        sha = hashlib.sha1(f"{repo_id}\n{_tree(files)}".encode()).hexdigest()
        commit = _Commit(sha, files)
        with self._lock:
            self._lfs |= {f.sha256: f.data for f in files.values() if f.sha256 is not None}
            revisions = self._repos.setdefault(repo_id, {})
            revisions[revision] = commit
            revisions[sha] = commit
        return sha

    # -- server lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the Hub (not the CDN); valid once started."""
        return self._url(0)

    @property
    def cdn_endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the CDN server that serves LFS files: another origin."""
        return self._url(1)

    def _url(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("LoopbackHub is not started: use 'with LoopbackHub() as hub:' or hub.start()")
        return f"http://127.0.0.1:{self._servers[index].server_address[1]}"

    def start(self) -> LoopbackHub:
        if self._servers:
            raise RuntimeError("LoopbackHub is already started")
        for is_cdn in (False, True):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            server.is_cdn = is_cdn  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- request log ------------------------------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of the request log: ``(method, path)`` for every request to the Hub or CDN."""
        with self._lock:
            return list(self._log)

    def downloads(self) -> list[tuple[str, str]]:
        """``(repo_id, path)`` of every file whose bytes were served by a GET, in order."""
        with self._lock:
            return list(self._downloads)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()
            self._downloads.clear()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._log.append((method, path))

    def _record_download(self, repo_id: str, path: str) -> None:
        with self._lock:
            self._downloads.append((repo_id, path))

    def _lookup(self, repo_id: str, revision: str) -> tuple[dict[str, _Commit] | None, _Commit | None]:
        with self._lock:
            revisions = self._repos.get(repo_id)
            return revisions, (revisions or {}).get(revision)

    def _is_private(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._private

    # -- writes, called by the handler ----------------------------------------------------------------
    def _create_repo(self, repo_id: str, *, private: bool) -> bool:
        """Create ``repo_id`` with the Hub's initial commit; False if it exists already."""
        gitattributes = {".gitattributes": _File.of(_GITATTRIBUTES, lfs=False)}
        initial = _pushed_commit(repo_id, None, "initial commit", "", gitattributes)
        with self._lock:
            if repo_id in self._repos:
                return False
            self._repos[repo_id] = {"main": initial, initial.sha: initial}
            if private:
                self._private.add(repo_id)
        return True

    def _require_repo(self, repo_id: str) -> None:
        with self._lock:
            if repo_id not in self._repos:
                raise _HubError(404, "RepoNotFound", "Repository not found")

    def _lfs_wanted(self, sha256: str, size: int) -> bool:
        """True (and expect a PUT) unless the object is stored already."""
        with self._lock:
            stored = self._lfs.get(sha256)
            if stored is not None and len(stored) == size:
                return False
            self._lfs_expected[sha256] = size
            return True

    def _lfs_receive(self, sha256: str, data: bytes) -> None:
        with self._lock:
            size = self._lfs_expected.get(sha256)
            if size is None:
                raise _HubError(403, None, f"no upload of LFS object {sha256} was announced: ask the batch API first")
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
                raise _HubError(400, None, f"uploaded bytes do not match LFS object {sha256} of size {size}")
            del self._lfs_expected[sha256]
            self._lfs[sha256] = data

    def _lfs_object(self, sha256: str) -> bytes | None:
        with self._lock:
            return self._lfs.get(sha256)

    def _commit(
        self, repo_id: str, branch: str, header: dict, operations: list[tuple[str, str, _File | None]]
    ) -> _Commit:
        """Apply ``(key, path, file)`` operations on top of ``branch`` and move it to the new commit."""
        with self._lock:
            revisions = self._repos.get(repo_id)
            if revisions is None:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            head = revisions.get(branch)
            if head is None or head.sha == branch:
                raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {branch} (commits go to a branch)")
            parent = header.get("parentCommit")
            if parent is not None and not head.sha.startswith(parent):
                raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for key, path, file in operations:
                if key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside:
                        raise _HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                    for p in inside:
                        del files[p]
                elif file is None:
                    if files.pop(path, None) is None:
                        raise _HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                else:
                    files[path] = file
            commit = _pushed_commit(repo_id, head.sha, header.get("summary", ""), header.get("description", ""), files)
            revisions[branch] = commit
            revisions[commit.sha] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the Hub or CDN answers. HTTP/1.0: one request per connection."""

    server_version = "LoopbackHub"

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_POST(self) -> None:
        self._dispatch_write()

    def do_PUT(self) -> None:
        self._dispatch_write()

    def _dispatch(self, send_body: bool) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        hub._record(self.command, unquote(split.path))
        self._send_body = send_body
        if self.server.is_cdn:  # type: ignore[attr-defined]
            return self._cdn(hub, split.path, parse_qs(split.query))
        if _XET.match(split.path):
            return self._error(501, None, _NO_XET)
        if match := _RESOLVE.match(split.path):
            return self._resolve(hub, unquote(match["repo"]), unquote(match["rev"]), unquote(match["path"]))
        if match := _API.match(split.path):
            rev = unquote(match["rev"]) if match["rev"] else "main"
            if match["kind"] == "tree":
                folder = unquote(match["path"] or "").strip("/")
                return self._tree(hub, unquote(match["repo"]), rev, folder, parse_qs(split.query))
            if match["kind"] == "commits" and not match["path"]:
                return self._commits(hub, unquote(match["repo"]), rev)
            return self._model_info(hub, unquote(match["repo"]), rev, parse_qs(split.query))
        self._error(404, None, f"no such endpoint: {split.path}")

    def _dispatch_write(self) -> None:
        hub: LoopbackHub = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        hub._record(self.command, unquote(split.path))
        self._send_body = True
        body = self._read_body()
        try:
            self._route_write(hub, split.path, parse_qs(split.query), body)
        except _HubError as e:
            self._error(e.status, e.code, e.message)
        except (ValueError, KeyError, TypeError) as e:  # malformed JSON, NDJSON or base64
            self._error(400, None, f"malformed request body: {e!r}")

    def _route_write(self, hub: LoopbackHub, path: str, query: dict[str, list[str]], body: bytes) -> None:
        if self.server.is_cdn:  # type: ignore[attr-defined]  # the presigned-URL-like upload target
            if self.command == "PUT" and (match := _LFS_PUT.match(path)):
                hub._lfs_receive(match["sha256"], body)
                return self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            raise _HubError(404, None, f"no such endpoint: {self.command} {path}")
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._post_validate_yaml(json.loads(body))
        if self.command != "POST" or not (path == "/api/repos/create" or _PUSH.match(path) or _LFS_API.match(path)):
            if _XET.match(path):
                raise _HubError(501, None, _NO_XET)
            raise _HubError(404, None, f"no such endpoint: {self.command} {path}")
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _HubError(401, None, "Invalid username or password.")
        if path == "/api/repos/create":
            return self._post_create_repo(hub, json.loads(body))
        if match := _PUSH.match(path):
            if "create_pr" in query:
                raise _HubError(501, None, "pull requests (create_pr) are not emulated by LoopbackHub")
            repo_id, rev = unquote(match["repo"]), unquote(match["rev"])
            if match["op"] == "preupload":
                return self._post_preupload(hub, repo_id, rev, json.loads(body))
            return self._post_commit(hub, repo_id, rev, body)
        match = _LFS_API.match(path)
        repo_id = unquote(match["repo"])
        hub._require_repo(repo_id)
        if match["op"] == "batch":
            return self._post_lfs_batch(hub, repo_id, json.loads(body))
        request = json.loads(body)
        data = hub._lfs_object(request["oid"])
        if data is None or len(data) != request["size"]:
            raise _HubError(404, None, f"LFS object {request['oid']} of size {request['size']} is not stored")
        self._send_json({"success": True})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    # -- answers to writes --------------------------------------------------------------------------
    def _post_validate_yaml(self, request: dict) -> None:
        lines = str(request["content"]).splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            message = "README.md metadata: the front matter opened by '---' is never closed"
            return self._send(400, json.dumps({"errors": [{"message": message}], "warnings": []}).encode(),
                              {"X-Error-Message": message}, "application/json")
        self._send_json({"errors": [], "warnings": []})

    def _post_create_repo(self, hub: LoopbackHub, request: dict) -> None:
        if request.get("type", "model") not in (None, "model"):
            raise _HubError(400, None, f"only model repos are emulated, got type {request['type']!r}")
        if not request.get("organization") or not request.get("name"):
            raise _HubError(400, None, "LoopbackHub needs a 'namespace/name' repo id (it has no users)")
        repo_id = f"{request['organization']}/{request['name']}"
        url = f"{hub.endpoint}/{repo_id}"
        if not hub._create_repo(repo_id, private=request.get("visibility") == "private"):
            message = "You already created this model repo"
            return self._send(409, json.dumps({"error": message, "url": url}).encode(), {"X-Error-Message": message},
                              "application/json")
        self._send_json({"url": url, "name": repo_id})

    def _post_preupload(self, hub: LoopbackHub, repo_id: str, revision: str, request: dict) -> None:
        head = self._find(hub, repo_id, revision)
        if head is None:
            return
        answers = []
        for file in request["files"]:
            mode = "lfs" if _stored_with_lfs(file["path"], file["size"]) else "regular"
            answer = {"path": file["path"], "uploadMode": mode, "shouldIgnore": False}
            if (remote := head.files.get(file["path"])) is not None:  # lets the client skip unchanged files
                answer["oid"] = remote.sha256 if remote.sha256 is not None else remote.blob_id
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": head.sha})

    def _post_lfs_batch(self, hub: LoopbackHub, repo_id: str, request: dict) -> None:
        if request.get("operation") != "upload":
            raise _HubError(501, None, "only LFS uploads go through the batch API of LoopbackHub")
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if hub._lfs_wanted(obj["oid"], obj["size"]):
                entry["actions"] = {
                    "upload": {"href": f"{hub.cdn_endpoint}/lfs-upload/{repo_id}/{obj['oid']}", "expires_in": 3600},
                    "verify": {"href": f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), {},
                   "application/vnd.git-lfs+json")

    def _post_commit(self, hub: LoopbackHub, repo_id: str, branch: str, body: bytes) -> None:
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not items or items[0].get("key") != "header" or not items[0]["value"].get("summary"):
            raise _HubError(400, None, "the commit must start with a header line with a non-empty summary")
        operations: list[tuple[str, str, _File | None]] = []
        for item in items[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                content = value["content"]
                base64_encoded = value.get("encoding") == "base64"
                data = base64.b64decode(content, validate=True) if base64_encoded else content.encode()
                operations.append((key, value["path"], _File.of(data, lfs=False)))
            elif key == "lfsFile":
                data = hub._lfs_object(value["oid"])
                if data is None or value.get("size", len(data)) != len(data):
                    raise _HubError(422, None, f"LFS pointer of {value['path']} points to an object never uploaded: "
                                               f"{value['oid']}")
                operations.append((key, value["path"], _File.of(data, lfs=True)))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, value["path"], None))
            else:
                raise _HubError(400, None, f"unknown commit operation {key!r}")
        commit = hub._commit(repo_id, branch, items[0]["value"], operations)
        url = f"{hub.endpoint}/{repo_id}/commit/{commit.sha}"
        self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""})

    # -- answers ----------------------------------------------------------------------------------
    def _find(self, hub: LoopbackHub, repo_id: str, revision: str) -> _Commit | None:
        revisions, commit = hub._lookup(repo_id, revision)
        if revisions is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _resolve(self, hub: LoopbackHub, repo_id: str, revision: str, path: str) -> None:
        commit = self._find(hub, repo_id, revision)
        if commit is None:
            return
        file = commit.files.get(path)
        if file is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{file.blob_id}"'}
        if file.sha256 is not None:  # LFS: metadata on the redirect itself, bytes from the CDN origin
            location = f"{hub.cdn_endpoint}/cdn-lfs/{repo_id}/{file.sha256}?filename={quote(path)}"
            headers |= {"Location": location, "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data))}
            return self._send(302, b"", headers)
        if self._send_body:
            hub._record_download(repo_id, path)
        self._send(200, file.data, headers, "application/octet-stream")

    def _cdn(self, hub: LoopbackHub, raw_path: str, query: dict[str, list[str]]) -> None:
        match = _CDN.match(raw_path)
        repo_id = unquote(match["repo"]) if match else ""
        path = query.get("filename", [""])[0]
        with hub._lock:
            candidates = [c.files.get(path) for c in hub._repos.get(repo_id, {}).values()]
        file = next((f for f in candidates if f is not None and f.sha256 == match["sha256"]), None) if match else None
        if file is None:
            return self._send(404, b"NoSuchKey", {}, "text/plain")
        if self._send_body:
            hub._record_download(repo_id, path)
        self._send(200, file.data, {"ETag": f'"{file.sha256}"'}, "application/octet-stream")

    def _model_info(self, hub: LoopbackHub, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        commit = self._find(hub, repo_id, revision)
        if commit is None:
            return
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, f in commit.files.items():
            sibling: dict = {"rfilename": path}
            if with_blobs:
                sibling |= {"size": len(f.data), "blobId": f.blob_id}
                if f.sha256 is not None:
                    sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
            siblings.append(sibling)
        info = {
            "_id": commit.sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": _DATE, "createdAt": _DATE, "private": hub._is_private(repo_id),
            "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(len(f.data) for f in commit.files.values()),
        }
        if "expand" in query:  # the Hub then returns only the requested properties
            info = {k: v for k, v in info.items() if k in {"_id", "id", *query["expand"]}}
        self._send_json(info)

    def _tree(self, hub: LoopbackHub, repo_id: str, revision: str, folder: str, query: dict[str, list[str]]) -> None:
        commit = self._find(hub, repo_id, revision)
        if commit is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder}/" if folder else ""
        dirs: set[str] = set()
        files = []
        for path, f in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(min(depth, len(parts) - 1)))
            if recursive or len(parts) == 1:
                files.append(f.tree_entry(path))
        if folder and not dirs and not files:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"", commit.sha)
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in dirs]
        self._send_json(sorted(folders, key=lambda e: e["path"]) + files)

    def _commits(self, hub: LoopbackHub, repo_id: str, revision: str) -> None:
        commit = self._find(hub, repo_id, revision)
        history = []
        while commit is not None:
            history.append({"id": commit.sha, "title": commit.title, "message": commit.message, "date": _DATE,
                            "authors": [{"user": "loopback"}]})
            commit = hub._lookup(repo_id, commit.parent)[1] if commit.parent else None
        if history:
            self._send_json(history)

    # -- responses --------------------------------------------------------------------------------
    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, "application/json")

    def _send_json(self, payload: object) -> None:
        self._send(200, json.dumps(payload).encode(), {}, "application/json")

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self._send_body:
            self.wfile.write(body)


_NO_XET = "Xet storage is not emulated by LoopbackHub: set HF_HUB_DISABLE_XET=1 (use_loopback_hub does)"


# -- pointing huggingface_hub at the emulator ---------------------------------------------------------
def use_loopback_hub(
    monkeypatch: pytest.MonkeyPatch, hub: LoopbackHub, *, cache_dir: str | os.PathLike | None = None
) -> None:
    """Point the already-imported huggingface_hub of this process at ``hub`` for one test.

    Setting ``HF_ENDPOINT`` alone does nothing here: huggingface_hub reads it once, at import, into
    ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_url`` and so
    by ``hf_hub_download``) and the module-level ``hf_api.api = HfApi()`` (behind the top-level
    ``huggingface_hub.model_info`` etc.). So this patches those three, and sets the env var too, for
    child processes. ``HfApi()`` objects created later read ``constants.ENDPOINT`` and follow (ones
    created earlier, e.g. at import by the code under test, keep their endpoint: create them late).
    It also turns telemetry off (otherwise the client fetches ``/api/agent-harnesses`` from the
    endpoint and pings it), stops a stored token from being sent (``HF_TOKEN`` unset, implicit
    tokens off: only an explicit ``token=`` authenticates), turns Xet off (``HF_HUB_DISABLE_XET``,
    read per call from ``constants``: uploads then use ``create_commit`` and the LFS batch API, see
    the module docstring), forces online mode, keeps any
    proxy away from 127.0.0.1, and, with ``cache_dir``, makes it the default ``HF_HUB_CACHE`` so
    code that passes ``cache_dir=None`` cannot touch the user's cache. monkeypatch undoes it all.
    The shared HTTP client is closed, so the next request builds one that sees the proxy settings.
    For a child process use :func:`hf_subprocess_env` instead (env read at its import).
    """
    from huggingface_hub import close_session, constants, hf_api

    endpoint = hub.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
    if cache_dir is not None:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    close_session()


def force_hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force huggingface_hub (and transformers, which asks it) into offline mode for one test.

    ``HF_HUB_OFFLINE`` is read once, at import, into ``constants.HF_HUB_OFFLINE``; the client checks
    that constant (``is_offline_mode()``) before every request and raises ``OfflineModeIsEnabled``
    instead of sending it, then falls back to the cache. So patching the constant is what works in
    this process; the env var is set too, for child processes and code that reads it directly.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def hf_subprocess_env(
    *, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None, offline: bool = False
) -> dict[str, str]:
    """The environment for a child Python process whose huggingface_hub should use ``endpoint``.

    The child imports huggingface_hub after these variables are set, so ``HF_ENDPOINT``,
    ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` take effect the documented way, with no patching.
    """
    env = dict(os.environ)
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_XET": "1"}
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1"]))
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    if cache_dir is not None:
        env["HF_HUB_CACHE"] = str(cache_dir)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture
def loopback_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LoopbackHub]:
    """A started :class:`LoopbackHub` with huggingface_hub pointed at it and its default cache in
    ``tmp_path / "hf-cache"``. Import it into a test module to use it: ``from tests.hub_server import loopback_hub``.
    """
    with LoopbackHub() as hub:
        use_loopback_hub(monkeypatch, hub, cache_dir=tmp_path / "hf-cache")
        yield hub
    from huggingface_hub import close_session

    close_session()
