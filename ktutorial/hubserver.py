"""A local stand-in for the Hugging Face hub: serves folders as model repos over HTTP, with the
routes the real `huggingface_hub` client uses, so a download can be shown and tested offline.

    with LocalHub.serving("ktutorial/tiny", tiny.ensure().hf_dir) as hub:
        ktutorial.download.download("ktutorial/tiny", "out", endpoint=hub.endpoint)

Routes (as huggingface_hub 2.4 calls them, see FACTS.md):
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model_info (siblings, sizes, lfs sha256)
  GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=  the file listing, one page
  HEAD /{repo}/resolve/{rev}/{path}                       X-Repo-Commit, ETag / X-Linked-Etag, sizes
  GET  /{repo}/resolve/{rev}/{path}                       the bytes; `Range: bytes=N-` gives 206
Unknown repo, revision or file answer 404 with `X-Error-Code` RepoNotFound, RevisionNotFound or
EntryNotFound; a repo added with `token=` answers 401 GatedRepo to requests without that token.

It binds 127.0.0.1 on a free port. Faults can be injected to show resume and its limits:
`drop_after(repo, path, n)` closes the connection after byte n of a file (once by default);
`stall_after(repo, path, n)` sends n bytes and then holds the connection until `release()`.
Files are hashed when added: change a served folder, then add it again.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Suffixes the hub stores with git-lfs (its default .gitattributes); their ETag is the sha256.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".model")
LFS_MIN_BYTES = 10 * 1024 * 1024  # big files go to lfs whatever their suffix
LFS_POINTER_BYTES = 134
SEND_CHUNK_BYTES = 256 * 1024

_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class HubFile:
    path: str  # relative, with '/'
    source: Path
    size: int
    blob_id: str  # git blob sha1, as the hub's tree reports it
    sha256: str
    lfs: bool


@dataclass
class HubRepo:
    repo_id: str
    root: Path
    commit: str
    branches: dict[str, str]
    files: dict[str, HubFile]
    token: str | None = None


@dataclass
class _Fault:
    mode: str  # "drop" | "stall"
    after_bytes: int
    times: int
    hits: int = 0


@dataclass
class HubRequest:
    """One request the hub answered, for tests: what was asked and what came back."""

    method: str
    path: str
    status: int
    range: str | None = None
    bearer: str | None = field(default=None, repr=False)  # never printed


def _hash_file(path: Path) -> tuple[str, str]:
    size = path.stat().st_size
    blob = hashlib.sha1(f"blob {size}\0".encode())
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
            sha.update(chunk)
    return blob.hexdigest(), sha.hexdigest()


def scan_folder(root: Path) -> dict[str, HubFile]:
    """Every file under root (hidden folders such as .git or .cache left out), hashed."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(".") and rel.name != ".gitattributes":
            continue
        blob_id, sha256 = _hash_file(p)
        size = p.stat().st_size
        lfs = p.suffix in LFS_SUFFIXES or size >= LFS_MIN_BYTES
        files[rel.as_posix()] = HubFile(rel.as_posix(), p, size, blob_id, sha256, lfs)
    return files


class LocalHub:
    """A threaded HTTP server on 127.0.0.1 answering like the hub for the repos added to it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("LocalHub binds loopback only: it serves files without any auth")
        self._host, self._port = host, port
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[HubRequest] = []
        self._faults: dict[tuple[str, str], _Fault] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def serving(cls, repo_id: str, folder: str | Path, branch: str = "main") -> "LocalHub":
        """A started hub serving one folder: `with LocalHub.serving("ktutorial/tiny", d) as hub:`."""
        hub = cls().start()
        try:
            hub.add_repo(repo_id, folder, branch)
        except BaseException:
            hub.stop()
            raise
        return hub

    # --- repos and faults ------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: str | Path, branch: str = "main",
                 token: str | None = None) -> str:
        """Serve `folder` as `repo_id` at `branch`; returns the commit sha (from the contents)."""
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        files = scan_folder(root)
        listing = "\n".join(f"{f.path} {f.blob_id}" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        with self._lock:
            self.repos[repo_id] = HubRepo(repo_id, root, commit, {branch: commit}, files, token)
        return commit

    def drop_after(self, repo_id: str, path: str, after_bytes: int, times: int = 1) -> None:
        """Close the connection once byte `after_bytes` of the file has been sent (`times` times)."""
        self._faults[(repo_id, path)] = _Fault("drop", after_bytes, times)

    def stall_after(self, repo_id: str, path: str, after_bytes: int) -> None:
        """Send `after_bytes` of the file, then hold the connection until `release()` or stop."""
        self._release.clear()
        self._faults[(repo_id, path)] = _Fault("stall", after_bytes, 1)

    def release(self) -> None:
        self._release.set()

    def fault_hits(self, repo_id: str, path: str) -> int:
        fault = self._faults.get((repo_id, path))
        return fault.hits if fault else 0

    def _take_fault(self, repo_id: str, path: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get((repo_id, path))
            if fault is None or fault.hits >= fault.times:
                return None
            fault.hits += 1
            return fault

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started: use it as a context manager or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer((self._host, self._port), Handler)
        server.daemon_threads = True  # a stalled handler must not keep the interpreter alive
        self._server = server
        self._closing.clear()
        self._thread = threading.Thread(target=server.serve_forever, name="ktutorial-localhub",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._closing.set()
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer carries Content-Length
    server_version = "ktutorial-localhub"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # requests are kept in hub.requests, not printed

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # --- plumbing ----------------------------------------------------------------------------

    def _bearer(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:] if auth.startswith("Bearer ") else None

    def _record(self, status: int) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(
            HubRequest(self.command, unquote(url.path), status, self.headers.get("Range"), self._bearer())
        )

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, head: bool = False) -> None:
        self._send(200, json.dumps(obj).encode(), head=head)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _repo_and_commit(self, repo_id: str, rev: str | None, head: bool):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.token is not None and self._bearer() != repo.token:
            self._error(401, "GatedRepo", "Access to this repository is restricted", head)
            return None
        if rev is None:
            return repo, repo.commit
        commit = repo.branches.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return None
        return repo, commit

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        m = _API.match(url.path)
        if m:
            repo_id = unquote(m["repo"])
            rev = unquote(m["rev"]) if m["rev"] else None
            found = self._repo_and_commit(repo_id, rev, head)
            if found is None:
                return
            repo, commit = found
            if m["kind"] == "tree":
                sub = unquote(m["sub"] or "").strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(_tree(repo, sub, recursive), head)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            return self._json(_model_info(repo, commit, blobs), head)
        m = _RESOLVE.match(url.path)
        if m:
            found = self._repo_and_commit(unquote(m["repo"]), unquote(m["rev"]), head)
            if found is None:
                return
            repo, commit = found
            hub_file = repo.files.get(unquote(m["path"]))
            if hub_file is None:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            return self._file(repo, commit, hub_file, head)
        self._error(404, "NotFound", f"no such route: {url.path}", head)

    def _file(self, repo: HubRepo, commit: str, f: HubFile, head: bool) -> None:
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.blob_id}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        start, end = 0, f.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m[1]) >= max(f.size, 1):
                headers["Content-Range"] = f"bytes */{f.size}"
                return self._send(416, b"", headers, head=head)
            start = int(m[1])
            end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = end - start + 1 if f.size else 0
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head or length == 0:
            return
        fault = None
        pending = self.hub._faults.get((repo.repo_id, f.path))
        if pending is not None and start < pending.after_bytes <= end:
            fault = self.hub._take_fault(repo.repo_id, f.path)
        self._stream(f.source, start, end + 1, fault)

    def _stream(self, source: Path, start: int, stop: int, fault: _Fault | None) -> None:
        cut = fault.after_bytes if fault else stop
        pos = start
        try:
            with source.open("rb") as fh:
                fh.seek(start)
                while pos < min(cut, stop):
                    chunk = fh.read(min(SEND_CHUNK_BYTES, min(cut, stop) - pos))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    pos += len(chunk)
            if fault is None:
                return
            self.wfile.flush()
            if fault.mode == "stall":
                while not self.hub._release.wait(0.1) and not self.hub._closing.is_set():
                    pass
            # Drop: the client sees fewer bytes than Content-Length, as after a network cut.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _lfs_entry(f: HubFile) -> dict | None:
    return {"oid": f.sha256, "size": f.size, "pointerSize": LFS_POINTER_BYTES} if f.lfs else None


def _tree(repo: HubRepo, sub: str, recursive: bool) -> list[dict]:
    entries: dict[str, dict] = {}
    prefix = f"{sub}/" if sub else ""
    for f in repo.files.values():
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix):]
        parts = rest.split("/")
        # Folders on the way (all of them when recursive, the first level otherwise).
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            d = prefix + "/".join(parts[:depth])
            entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                   "size": 0, "path": d})
        if recursive or len(parts) == 1:
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                entry["lfs"] = _lfs_entry(f)
            entries[f.path] = entry
    return [entries[k] for k in sorted(entries)]


def _model_info(repo: HubRepo, commit: str, blobs: bool) -> dict:
    siblings = []
    for f in repo.files.values():
        s: dict = {"rfilename": f.path}
        if blobs:
            s.update({"size": f.size, "blobId": f.blob_id})
            if f.lfs:
                s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": LFS_POINTER_BYTES}
        siblings.append(s)
    return {
        "_id": commit[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "sha": commit,
        "private": False,
        "gated": "manual" if repo.token else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "library_name": "transformers",
        "siblings": siblings,
        "usedStorage": sum(f.size for f in repo.files.values()),
    }
