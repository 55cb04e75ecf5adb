"""A local HTTP server that speaks the file APIs of Hugging Face, ModelScope and AIStudio.

The three hubs' routes do not overlap, so one server stands in for all of them. It serves
Range requests, records every request, and can misbehave on demand: cut a connection
mid-file, ignore Range, or serve bytes that differ from the listed checksum.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REVISIONS = ("main", "master", "v1")
LFS_SUFFIXES = (".safetensors", ".model")


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    range: str | None
    auth: str | None = None
    file: str | None = None
    """Repo path of the file whose bytes were requested, for content GETs."""


@dataclass
class FakeHub:
    """Repos by id, each a {path: bytes} map; start() binds 127.0.0.1 on a free port."""

    repos: dict[str, dict[str, bytes]]
    cut_after: dict[str, int] = field(default_factory=dict)
    """Repo path → bytes to send before dropping the connection (once, then removed)."""
    ignore_range: bool = False
    corrupt: set[str] = field(default_factory=set)
    page_size: int = 2
    """Entries per listing page (HF Link paging, AIStudio `truncated` paging)."""
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def file_gets(self) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.file is not None]

    def fetched(self) -> list[str]:
        """Repo paths whose bytes were requested, sorted (one entry per GET)."""
        return sorted(r.file for r in self.file_gets() if r.file is not None)

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.requests.append(seen)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each small reply waits ~40 ms for a delayed ACK
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        seen = Seen("GET", self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        self.fake.record(seen)
        for pattern, route in _ROUTES:
            m = re.fullmatch(pattern, parts.path)
            if m:
                route(self, seen, query, *m.groups())
                return
        self.send_json(404, {"error": f"no route {parts.path}"})

    # -- helpers -----------------------------------------------------------------------
    def repo(self, org: str, name: str, rev: str | None = None) -> dict[str, bytes] | None:
        if rev is not None and unquote(rev) not in REVISIONS:
            return None
        return self.fake.repos.get(f"{org}/{name}")

    def send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_file(self, seen: Seen, repo: dict[str, bytes] | None, path: str) -> None:
        if repo is None or path not in repo:
            self.send_json(404, {"error": "Entry not found"})
            return
        seen.file = path
        data = repo[path]
        if path in self.fake.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, rng = 0, self.headers.get("Range")
        if rng and not self.fake.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with self.fake.lock:
            cut = self.fake.cut_after.pop(path, None)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)  # the client sees a body cut short
            return
        self.wfile.write(body)


# -- Hugging Face ------------------------------------------------------------------------
def _hf_tree(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, rev: str) -> None:
    repo = h.repo(org, name, rev)
    if repo is None:  # HF answers 401 for unknown repos to anonymous callers
        h.send_json(401, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return
    entries: list[dict[str, Any]] = [{"type": "directory", "oid": "0" * 40, "path": "sub"}]
    for path, data in sorted(repo.items()):
        entry: dict[str, Any] = {"type": "file", "oid": git_sha1(data), "size": len(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
            entry["size"], entry["oid"] = 134, "f" * 40  # the pointer's, as HF reports them
        entries.append({**entry, "path": path})
    cursor, size = int(q.get("cursor", 0)), h.fake.page_size
    headers = {}
    if cursor + size < len(entries):
        nxt = (
            f"{h.fake.url}/api/models/{org}/{name}/tree/{rev}?recursive=true&cursor={cursor + size}"
        )
        headers["Link"] = f'<{nxt}>; rel="next"'
    h.send_json(200, entries[cursor : cursor + size], headers)


def _hf_resolve(
    h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, rev: str, path: str
) -> None:
    path = unquote(path)
    repo = h.repo(org, name, rev)
    if repo is not None and path.endswith(LFS_SUFFIXES):  # LFS files live behind a CDN redirect
        h.send_response(302)
        h.send_header("Location", f"/cdn/{org}/{name}/{path}")
        h.send_header("Content-Length", "0")
        h.end_headers()
        return
    h.send_file(seen, repo, path)


def _hf_cdn(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, path: str) -> None:
    h.send_file(seen, h.repo(org, name), unquote(path))


# -- ModelScope --------------------------------------------------------------------------
def _ms_files(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str) -> None:
    repo = h.repo(org, name, q.get("Revision"))
    if repo is None:
        h.send_json(404, {"Code": 10010205, "Message": "model not exists", "Success": False})
        return
    files: list[dict[str, Any]] = [{"Name": "sub", "Path": "sub", "Type": "tree", "Size": 0}]
    for path, data in sorted(repo.items()):
        files.append({"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob",
                      "Size": len(data), "Sha256": sha256(data)})  # fmt: skip
    h.send_json(200, {"Code": 200, "Data": {"Files": files}, "Success": True})


def _ms_file(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str) -> None:
    h.send_file(seen, h.repo(org, name, q.get("Revision")), q.get("FilePath", ""))


# -- AIStudio (Gitea) --------------------------------------------------------------------
def _ai_tree(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, rev: str) -> None:
    repo = h.repo(org, name, rev)
    if repo is None:
        h.send_json(404, {"message": "The target couldn't be found.", "errors": []})
        return
    entries = [{"path": "sub", "type": "tree", "size": 0, "sha": "0" * 40}]
    entries += [{"path": p, "type": "blob", "size": len(d), "sha": git_sha1(d)}
                for p, d in sorted(repo.items())]  # fmt: skip
    entries.append({"path": ".gitattributes", "type": "blob", "size": 10, "sha": "1" * 40})
    per_page = min(int(q.get("per_page", 30)), h.fake.page_size)
    page = int(q.get("page", 1))
    chunk = entries[(page - 1) * per_page : page * per_page]
    h.send_json(200, {"sha": "c" * 40, "url": f"{h.fake.url}/api/v1/repos/{org}/{name}/git/trees/"
                      f"{'c' * 40}", "tree": chunk, "truncated": page * per_page < len(entries),
                      "page": page, "total_count": len(entries)})  # fmt: skip


def _ai_contents(
    h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, path: str
) -> None:
    repo, path = h.repo(org, name, q.get("ref", "master")), unquote(path)
    if repo is None or path not in repo:
        h.send_json(404, {"message": "object does not exist"})
        return
    data = repo[path]
    info: dict[str, Any] = {"name": path.rsplit("/", 1)[-1], "path": path, "type": "file",
                            "size": len(data), "sha": git_sha1(data)}  # fmt: skip
    if path.endswith(LFS_SUFFIXES):
        info.update(size=134, lfs_oid=sha256(data), lfs_size=len(data))
    h.send_json(200, info)


def _ai_media(h: _Handler, seen: Seen, q: dict[str, str], org: str, name: str, path: str) -> None:
    h.send_file(seen, h.repo(org, name, q.get("ref", "master")), unquote(path))


_SEG = r"([^/]+)"
_ROUTES: list[tuple[str, Callable[..., None]]] = [
    (rf"/api/models/{_SEG}/{_SEG}/tree/{_SEG}", _hf_tree),
    (rf"/{_SEG}/{_SEG}/resolve/{_SEG}/(.+)", _hf_resolve),
    (rf"/cdn/{_SEG}/{_SEG}/(.+)", _hf_cdn),
    (rf"/api/v1/models/{_SEG}/{_SEG}/repo/files", _ms_files),
    (rf"/api/v1/models/{_SEG}/{_SEG}/repo", _ms_file),
    (rf"/api/v1/repos/{_SEG}/{_SEG}/git/trees/{_SEG}", _ai_tree),
    (rf"/api/v1/repos/{_SEG}/{_SEG}/contents/(.+)", _ai_contents),
    (rf"/api/v1/repos/{_SEG}/{_SEG}/media/(.+)", _ai_media),
]
