"""Reading media from local files, only below the configured media folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from gateway.media.errors import MediaFetchError

# O_NOFOLLOW: the last component was already resolved, so a symlink there now means it
# was swapped in after the check. O_NONBLOCK: opening a FIFO must not hang the thread.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_CHUNK = 1024 * 1024


def local_path_of(url: str) -> str:
    """The filesystem path a ``file:`` URL or a bare path names (not yet checked)."""
    if not url.lower().startswith("file:"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host part
        raise MediaFetchError.bad_request(f"malformed file URL: {exc}") from exc
    if parts.netloc not in ("", "localhost"):
        raise MediaFetchError.bad_request(
            f"file URL host {parts.netloc[:64]!r} is not allowed; use file:///path"
        )
    if parts.query or parts.fragment:
        raise MediaFetchError.bad_request("file URL must not have a query or fragment")
    try:
        return unquote(parts.path, errors="strict")
    except UnicodeDecodeError as exc:
        raise MediaFetchError.bad_request("file URL path is not valid UTF-8") from exc


def resolve_inside(path_text: str, root: Path) -> Path:
    """Resolve ``path_text`` (relative paths against ``root``) and refuse escapes.

    ``..`` is refused outright rather than resolved, so a path's meaning never depends on
    which folders happen to exist. Symlinks are resolved and the target must still lie
    below ``root``.
    """
    if not path_text or "\x00" in path_text:
        raise MediaFetchError.bad_request("local media path is empty or contains NUL")
    if ".." in PurePosixPath(path_text).parts:
        raise MediaFetchError.bad_request("local media path must not contain '..'")
    try:
        resolved = (root / path_text).resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise MediaFetchError.bad_request(f"local media file not found: {path_text[:256]}") from exc
    if not resolved.is_relative_to(root):
        raise MediaFetchError.bad_request(
            f"local media file {path_text[:256]} is outside the allowed media folder"
        )
    return resolved


def read_local_file(url: str, root: Path | None, max_bytes: int) -> bytes:
    """Read the file ``url`` names if it is a regular file below ``root`` (blocking)."""
    if root is None:
        raise MediaFetchError.bad_request(
            "local media files are not allowed (no allowed local media path is configured)"
        )
    path = resolve_inside(local_path_of(url), root.resolve())
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise MediaFetchError.bad_request(f"cannot open local media file: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaFetchError.bad_request("local media path is not a regular file")
        if info.st_size > max_bytes:
            raise MediaFetchError.bad_request(
                f"local media file is {info.st_size} bytes, more than the {max_bytes}-byte limit"
            )
        return _read_at_most(fd, max_bytes)
    except OSError as exc:
        raise MediaFetchError.bad_request(f"cannot read local media file: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _read_at_most(fd: int, max_bytes: int) -> bytes:
    """Read to EOF but never keep more than ``max_bytes`` (the file may grow meanwhile)."""
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, _READ_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise MediaFetchError.bad_request(
                f"local media file grew past the {max_bytes}-byte limit while being read"
            )
        chunks.append(chunk)
    return b"".join(chunks)
