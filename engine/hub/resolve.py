"""`--model` → a local directory holding config.json and the weights.

A local directory is used as is. A hub id `org/name` is downloaded once into
`<cache root>/<source>/<org>/<name>` (`<name>@<revision>` for an explicit revision) and
reused from there without contacting the hub: a finished download leaves a manifest, and
while it and every file it lists are present, the directory is returned as is. Delete the
directory to fetch the repo again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import ssl
import threading
from pathlib import Path

import certifi
import httpx

from engine.hub.download import WORK_DIR, RemoteFile, download_file, is_complete, repo_relpath
from engine.hub.errors import HubConnectionError, InvalidModelError
from engine.hub.http import RetryPolicy
from engine.hub.sources import SOURCES, HubSource

log = logging.getLogger(__name__)

ENV_SOURCE = "TANDEM_MODEL_SOURCE"
"""Which hub a hub id downloads from when no source is passed."""
ENV_CACHE_DIR = "TANDEM_CACHE_DIR"
"""Cache root when no cache_dir is passed."""
DEFAULT_SOURCE = "aistudio"
DEFAULT_CACHE_DIR = Path("~/.cache/tandem/models")
MANIFEST = "complete.json"
"""Written into WORK_DIR when every file is in place."""

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def resolve_model(
    name_or_path: str,
    *,
    source: str | None = None,
    cache_dir: Path | str | None = None,
    revision: str | None = None,
    retry: RetryPolicy | None = None,
) -> Path:
    """Return a local directory holding the model `name_or_path` (config.json and the rest).

    `name_or_path` is an existing directory (returned as is; it must contain config.json) or
    a hub id `org/name`, downloaded from `source` ("aistudio", "huggingface", "modelscope";
    default: env TANDEM_MODEL_SOURCE, else "aistudio") at `revision` (default: the hub's main
    branch) into `cache_dir` (default: env TANDEM_CACHE_DIR, else ~/.cache/tandem/models).
    Downloads resume after an interruption and are checked against the hub's sizes and
    sha256s. The built-in name `tiny-ernie-vl` is not handled here: callers check for it
    first. Raises a `ModelResolutionError` subclass with a readable message on any failure.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise InvalidModelError("--model is empty: give a model directory or a hub id org/name")
    name = name_or_path.strip()
    local = Path(name).expanduser()
    if local.is_dir():
        return _local_model_dir(local)
    if local.exists():
        raise InvalidModelError(f"--model {name!r} is a file; give the model's directory")
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise InvalidModelError(
            f"--model {name!r} is neither an existing directory nor a hub id of the form "
            "org/name (e.g. baidu/ERNIE-4.5-VL-28B-A3B-Paddle)"
        )
    hub = _source(source)
    rev = _revision(revision, hub)
    target = _cache_root(cache_dir) / hub.name / _repo_dirname(name, revision)
    if _manifest_ok(target):
        log.info("using cached %s from %s", name, target)
        return target
    return _download_snapshot(hub, name, rev, target, retry or RetryPolicy())


def _local_model_dir(path: Path) -> Path:
    path = path.resolve()
    if not (path / "config.json").is_file():
        raise InvalidModelError(
            f"model directory {str(path)!r} has no config.json; point --model at the folder "
            "that holds config.json and the weights"
        )
    return path


def _source(source: str | None) -> HubSource:
    name = (source or os.environ.get(ENV_SOURCE) or DEFAULT_SOURCE).strip().lower()
    if name not in SOURCES:
        raise InvalidModelError(
            f"unknown model source {name!r} (from --model-source or {ENV_SOURCE}); "
            f"choose one of {', '.join(sorted(SOURCES))}"
        )
    return SOURCES[name]


def _revision(revision: str | None, hub: HubSource) -> str:
    if revision is None:
        return hub.default_revision
    rev = revision.strip()
    if not rev or any(c in rev for c in "\x00\n\r") or ".." in rev or rev.startswith("/"):
        raise InvalidModelError(f"invalid revision {revision!r}: give a branch, tag or commit")
    return rev


def _cache_root(cache_dir: Path | str | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def _repo_dirname(repo_id: str, revision: str | None) -> Path:
    org, repo = repo_id.split("/")
    if revision is None:
        return Path(org, repo)
    # One folder per pinned revision; '/' in branch names must not nest folders.
    return Path(org, f"{repo}@{revision.strip().replace('/', '--')}")


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading a CA bundle costs ~0.1 s, and contexts are safe to share.
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


def _manifest_ok(target: Path) -> bool:
    """Whether a previous download of `target` finished and its files are all still there."""
    try:
        manifest = json.loads((target / WORK_DIR / MANIFEST).read_text())
        return all(
            is_complete(target.joinpath(*repo_relpath(f["path"]).parts), _listed(f))
            for f in manifest["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _listed(entry: dict[str, object]) -> RemoteFile:
    size = entry.get("size")
    return RemoteFile(path=str(entry["path"]), url="", size=size if isinstance(size, int) else None)


def _download_snapshot(
    hub: HubSource, repo_id: str, revision: str, target: Path, retry: RetryPolicy
) -> Path:
    """List `repo_id` on `hub`, fetch what `target` lacks, then write the manifest."""
    with httpx.Client(timeout=_TIMEOUT, follow_redirects=True, verify=_ssl_context()) as client:
        files = hub.list_files(client, repo_id, revision, retry)
        _check_listing(hub, repo_id, revision, files)
        log.info("fetching %d files of %s from %s into %s", len(files), repo_id, hub.name, target)
        try:
            (target / WORK_DIR).mkdir(parents=True, exist_ok=True)
            for f in files:
                download_file(
                    client, f, target, headers=hub.headers(), retry=retry, hint=hub.hint()
                )
            _write_manifest(target, hub, repo_id, revision, files)
        except OSError as exc:  # disk full, read-only or foreign-owned cache dir
            raise InvalidModelError(
                f"cannot write the model into {target}: {exc}. Free space or choose another "
                f"cache directory ({ENV_CACHE_DIR})"
            ) from exc
    return target


def _write_manifest(
    target: Path, hub: HubSource, repo_id: str, revision: str, files: list[RemoteFile]
) -> None:
    manifest = {
        "source": hub.name,
        "repo_id": repo_id,
        "revision": revision,
        "files": [{"path": f.path, "size": f.size} for f in files],
    }
    # A private temp name: two resolvers of the same repo may finish at the same moment.
    tmp = target / WORK_DIR / f"{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target / WORK_DIR / MANIFEST)


def _check_listing(hub: HubSource, repo_id: str, revision: str, files: list[RemoteFile]) -> None:
    for f in files:
        try:
            repo_relpath(f.path)
        except ValueError as exc:
            raise HubConnectionError(f"{hub.name} listing of {repo_id!r}: {exc}") from exc
    if not any(f.path == "config.json" for f in files):
        raise InvalidModelError(
            f"{hub.name} repo {repo_id!r}@{revision} has no config.json at its root, so it is "
            f"not a model Tandem can load (found {len(files)} files)"
        )
