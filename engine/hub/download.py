"""A small resumable downloader: one hub file into one local file, safely.

Bytes go to `<model dir>/.tandem-download/<path>.part`; an interrupted download (a cut
connection in this process, or a `.part` left by a killed one) resumes with an HTTP Range
request. Only a file whose size and checksum match the hub's listing is renamed (atomically)
to its final name, so a file under its final name is always complete. A `.lock` beside the
`.part` (flock, released by the kernel if the holder dies) keeps two processes from writing
the same file: the second waits, then finds the file done.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from engine.hub.errors import DownloadIntegrityError, ModelNotFoundError
from engine.hub.http import RetryPolicy, TransientError, check_status, with_retries

log = logging.getLogger(__name__)

WORK_DIR = ".tandem-download"
"""Folder inside a model directory for partial files, locks and the completion manifest."""
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub repo, as the hub's listing describes it."""

    path: str
    """Path inside the repo, '/'-separated."""
    url: str
    """Where to GET its bytes (redirects are followed)."""
    size: int | None
    """Size in bytes, when the hub tells it."""
    sha256: str | None = None
    """Hex sha256 of the content, when the hub tells it (LFS files)."""
    git_sha1: str | None = None
    """Hex git blob id of the content (small non-LFS files on git-backed hubs)."""


def repo_relpath(path: str) -> PurePosixPath:
    """`path` as a relative path that cannot leave the model directory, else ValueError."""
    rel = PurePosixPath(path)
    bad_part = any(p in ("", ".", "..") for p in rel.parts)
    if not path or rel.is_absolute() or "\\" in path or bad_part:
        raise ValueError(f"unsafe file path in hub listing: {path!r}")
    if rel.parts[0] == WORK_DIR:
        raise ValueError(f"hub listing uses the reserved folder {WORK_DIR!r}: {path!r}")
    return rel


def is_complete(dest: Path, file: RemoteFile) -> bool:
    """Whether `dest` already holds `file` (final names only ever hold verified files)."""
    return dest.is_file() and (file.size is None or dest.stat().st_size == file.size)


def download_file(
    client: httpx.Client,
    file: RemoteFile,
    model_dir: Path,
    *,
    headers: Mapping[str, str],
    retry: RetryPolicy,
    hint: str,
) -> bool:
    """Make `model_dir/file.path` hold `file`; return True if any bytes were fetched.

    Raises `HubConnectionError` once retries are spent, `DownloadIntegrityError` when the
    finished bytes do not match the listing, `ModelNotFoundError` when the hub refuses the file.
    """
    rel = repo_relpath(file.path)
    dest = model_dir.joinpath(*rel.parts)
    if is_complete(dest, file):
        return False
    work = model_dir.joinpath(WORK_DIR, *rel.parts)
    work.parent.mkdir(parents=True, exist_ok=True)
    part = work.with_name(work.name + ".part")
    with _file_lock(work.with_name(work.name + ".lock"), file.path):
        if is_complete(dest, file):  # another process finished it while we waited
            return False
        digests = with_retries(
            lambda: _fetch_into(client, file, part, headers),
            retry=retry,
            what=f"downloading {file.path} from {file.url}",
            hint=hint,
        )
        problem = digests.mismatch(part)
        if problem:
            part.unlink(missing_ok=True)  # never resume from bytes known to be wrong
            raise DownloadIntegrityError(f"{file.path} from {file.url}: {problem}; run again")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
    log.info("downloaded %s (%s bytes)", file.path, dest.stat().st_size)
    return True


@contextmanager
def _file_lock(path: Path, name: str) -> Iterator[None]:
    with path.open("a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process downloading %s", name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Digests:
    """Running checksums of a file being written, for whatever the listing announced."""

    def __init__(self, file: RemoteFile) -> None:
        self.file = file
        self.sha256 = hashlib.sha256() if file.sha256 else None
        # A git blob id hashes a "blob <size>\0" header first, so it needs the size up front.
        self.sha1 = None
        if file.git_sha1 and file.size is not None:
            self.sha1 = hashlib.sha1(f"blob {file.size}\0".encode(), usedforsecurity=False)

    def update(self, chunk: bytes) -> None:
        if self.sha256 is not None:
            self.sha256.update(chunk)
        if self.sha1 is not None:
            self.sha1.update(chunk)

    def add_prefix(self, part: Path, length: int) -> None:
        """Hash the first `length` bytes already on disk (resuming)."""
        if length <= 0 or (self.sha256 is None and self.sha1 is None):
            return
        with part.open("rb") as fh:
            while length > 0:
                chunk = fh.read(min(_CHUNK, length))
                if not chunk:
                    break
                self.update(chunk)
                length -= len(chunk)

    def mismatch(self, part: Path) -> str | None:
        """A description of what is wrong with the finished `part`, or None when it is right."""
        size = part.stat().st_size
        f = self.file
        if f.size is not None and size != f.size:
            return f"got {size} bytes, the hub announced {f.size}"
        if self.sha256 is not None and f.sha256 and self.sha256.hexdigest() != f.sha256.lower():
            return f"sha256 {self.sha256.hexdigest()} differs from the hub's {f.sha256}"
        if self.sha1 is not None and f.git_sha1 and self.sha1.hexdigest() != f.git_sha1.lower():
            return f"git blob id {self.sha1.hexdigest()} differs from the hub's {f.git_sha1}"
        return None


def _fetch_into(
    client: httpx.Client, file: RemoteFile, part: Path, headers: Mapping[str, str]
) -> _Digests:
    """One attempt: append the missing bytes of `file` to `part`; return its checksums.

    Raises a transport or `TransientError` when the body is cut short, for a retry to resume.
    """
    offset = part.stat().st_size if part.exists() else 0
    if file.size is not None and offset > file.size:  # a stale part from another revision
        offset = 0
    digests = _Digests(file)
    if offset and offset == file.size:  # finished before an interruption hit the rename
        digests.add_prefix(part, offset)
        return digests
    # Identity encoding: Range offsets must count the bytes we store, not gzip's.
    req_headers = {**headers, "Accept-Encoding": "identity"}
    if offset:
        req_headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", file.url, headers=req_headers) as resp:
        if resp.status_code == 416:  # our part is no prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise TransientError(f"server refused to resume {file.path} at byte {offset}")
        check_status(
            resp,
            what=f"downloading {file.path}",
            not_found=lambda code: ModelNotFoundError(
                f"{file.url} answered HTTP {code}: the hub lists {file.path} but will not "
                "serve it (a gated or private repo needs an access token)"
            ),
        )
        offset = _resume_offset(resp, offset, part)
        digests.add_prefix(part, offset)
        with part.open("r+b" if part.exists() else "wb") as fh:
            fh.seek(offset)
            fh.truncate()
            for chunk in resp.iter_bytes():  # as received: a cut body keeps its bytes
                fh.write(chunk)
                digests.update(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    written = part.stat().st_size
    if file.size is not None and written < file.size:
        raise TransientError(f"{file.path}: body ended at byte {written} of {file.size}")
    return digests


def _resume_offset(resp: httpx.Response, offset: int, part: Path) -> int:
    """Where the response's bytes start: `offset` for a matching 206, else 0 (full body)."""
    if resp.status_code != 206:
        if offset:
            log.info("server ignored the Range request for %s; downloading it whole", part.name)
        return 0
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    if match is None or int(match.group(1)) != offset:
        part.unlink(missing_ok=True)
        raise TransientError(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
    return offset
