"""Per-hub adapters: how to list a model repo's files and where each file's bytes live.

Each hub is spoken over plain HTTP, as its own SDK does, so one downloader serves all three
and tests can stand a local server in for any of them. Endpoints and tokens come from the
same environment variables the official SDKs read, looked up at call time:

| source      | endpoint env (first set wins)          | token env             |
|-------------|----------------------------------------|-----------------------|
| aistudio    | STUDIO_GIT_HOST                        | AISTUDIO_ACCESS_TOKEN |
| huggingface | HF_ENDPOINT                            | HF_TOKEN              |
| modelscope  | MODELSCOPE_ENDPOINT, MODELSCOPE_DOMAIN | MODELSCOPE_API_TOKEN  |

Defaults: https://git.aistudio.baidu.com, https://huggingface.co, https://www.modelscope.cn.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus, urlsplit

import httpx

from engine.hub.download import RemoteFile
from engine.hub.errors import HubConnectionError, InvalidModelError, ModelNotFoundError
from engine.hub.http import RetryPolicy, check_status, json_body, with_retries


class HubSource(ABC):
    """One model hub: its endpoint, credentials and listing protocol."""

    name: ClassVar[str]
    default_revision: ClassVar[str]
    endpoint_envs: ClassVar[tuple[str, ...]]
    default_endpoint: ClassVar[str]
    token_env: ClassVar[str]
    auth_scheme: ClassVar[str] = "Bearer"

    def endpoint(self) -> str:
        """Base URL, from the first endpoint env var that is set, else the public hub.

        A bare host name (as MODELSCOPE_DOMAIN is usually given) gets https:// in front.
        """
        env = next((e for e in self.endpoint_envs if os.environ.get(e, "").strip()), None)
        value = os.environ[env].strip() if env else self.default_endpoint
        base = (value if "://" in value else f"https://{value}").rstrip("/")
        parts = urlsplit(base)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in base
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            valid = False
        if not valid:
            raise InvalidModelError(
                f"{env} is set to {value!r}, which is not an http(s) URL of a {self.name} hub"
            )
        return base

    def headers(self) -> dict[str, str]:
        """Headers for every request to this hub (the access token when one is set)."""
        token = os.environ.get(self.token_env, "").strip()
        return {"Authorization": f"{self.auth_scheme} {token}"} if token else {}

    def hint(self) -> str:
        """What to check when the hub cannot be reached."""
        envs = " or ".join(self.endpoint_envs)
        return (
            f"Check the network connection to {self.endpoint()}, set {envs} to a reachable "
            f"{self.name} endpoint or mirror, or pick another hub with --model-source."
        )

    @abstractmethod
    def list_files(
        self, client: httpx.Client, repo_id: str, revision: str, retry: RetryPolicy
    ) -> list[RemoteFile]:
        """Every file of `repo_id` at `revision` (directories left out)."""

    def _get_json(
        self,
        client: httpx.Client,
        url: str,
        *,
        repo_id: str,
        revision: str,
        retry: RetryPolicy,
        params: Mapping[str, str] | None = None,
    ) -> tuple[Any, httpx.Response]:
        what = f"listing {repo_id}@{revision} on {self.name}"

        def once() -> tuple[Any, httpx.Response]:
            resp = client.get(url, params=params, headers=self.headers())
            check_status(
                resp, what=what, not_found=lambda code: self._not_found(repo_id, revision, code)
            )
            return json_body(resp, what=what), resp

        return with_retries(once, retry=retry, what=what, hint=self.hint())

    def _not_found(self, repo_id: str, revision: str, code: int) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"{self.name} ({self.endpoint()}) has no model repo {repo_id!r} at revision "
            f"{revision!r} (HTTP {code}). Check the spelling, try another hub with "
            f"--model-source / TANDEM_MODEL_SOURCE, or for a private repo set {self.token_env}."
        )

    def _malformed(self, repo_id: str, detail: str) -> HubConnectionError:
        return HubConnectionError(
            f"{self.name} ({self.endpoint()}) sent an unexpected file listing for {repo_id!r}: "
            f"{detail}"
        )


class HuggingFaceSource(HubSource):
    """Hugging Face: `/api/models/{repo}/tree/{rev}` (paged by Link headers), `/resolve/`."""

    name = "huggingface"
    default_revision = "main"
    endpoint_envs = ("HF_ENDPOINT",)
    default_endpoint = "https://huggingface.co"
    token_env = "HF_TOKEN"

    def list_files(
        self, client: httpx.Client, repo_id: str, revision: str, retry: RetryPolicy
    ) -> list[RemoteFile]:
        base, rev = self.endpoint(), quote(revision, safe="")
        url: str | None = f"{base}/api/models/{repo_id}/tree/{rev}"
        params: dict[str, str] | None = {"recursive": "true"}
        files: list[RemoteFile] = []
        while url:
            data, resp = self._get_json(
                client, url, repo_id=repo_id, revision=revision, retry=retry, params=params
            )
            if not isinstance(data, list):
                raise self._malformed(repo_id, "expected a JSON list")
            for entry in data:
                if isinstance(entry, dict) and entry.get("type") == "file":
                    files.append(self._file(base, repo_id, rev, entry))
            url, params = resp.links.get("next", {}).get("url"), None
        return files

    def _file(self, base: str, repo_id: str, rev: str, entry: dict[str, Any]) -> RemoteFile:
        path = entry.get("path")
        if not isinstance(path, str):
            raise self._malformed(repo_id, f"entry without a path: {entry}")
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else None
        # LFS files: oid is the content's sha256; other files: oid is the git blob id.
        return RemoteFile(
            path=path,
            url=f"{base}/{repo_id}/resolve/{rev}/{quote(path)}",
            size=_int_or_none((lfs or entry).get("size")),
            sha256=_str_or_none(lfs.get("oid")) if lfs else None,
            git_sha1=None if lfs else _str_or_none(entry.get("oid")),
        )


class ModelScopeSource(HubSource):
    """ModelScope: `/api/v1/models/{repo}/repo/files` and `/api/v1/models/{repo}/repo?FilePath=`."""

    name = "modelscope"
    default_revision = "master"
    endpoint_envs = ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")
    default_endpoint = "https://www.modelscope.cn"
    token_env = "MODELSCOPE_API_TOKEN"

    def list_files(
        self, client: httpx.Client, repo_id: str, revision: str, retry: RetryPolicy
    ) -> list[RemoteFile]:
        base = self.endpoint()
        data, _ = self._get_json(
            client,
            f"{base}/api/v1/models/{repo_id}/repo/files",
            repo_id=repo_id,
            revision=revision,
            retry=retry,
            params={"Revision": revision, "Recursive": "True"},
        )
        # Errors can come back as HTTP 200 with Success false / a non-200 Code.
        if not isinstance(data, dict):
            raise self._malformed(repo_id, "expected a JSON object")
        if data.get("Success") is False or data.get("Code", 200) not in (200, 201):
            raise self._not_found(repo_id, revision, int(data.get("Code") or 404))
        body = data.get("Data")
        entries = body.get("Files") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise self._malformed(repo_id, "no Data.Files list")
        files = []
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("Type") == "tree":
                continue
            path = entry.get("Path")
            if not isinstance(path, str):
                raise self._malformed(repo_id, f"entry without a Path: {entry}")
            files.append(
                RemoteFile(
                    path=path,
                    url=f"{base}/api/v1/models/{repo_id}/repo?Revision={quote_plus(revision)}"
                    f"&FilePath={quote_plus(path)}",
                    size=_int_or_none(entry.get("Size")),
                    sha256=_str_or_none(entry.get("Sha256")),
                )
            )
        return files


class AIStudioSource(HubSource):
    """Baidu AIStudio, a Gitea server (as aistudio-sdk 0.3.9 speaks it).

    The tree API (paged by `truncated`) lists paths; per file, the contents API gives the
    real size and, for LFS files, the sha256 (`lfs_oid`); bytes come from the media API,
    which resolves LFS pointers.
    """

    name = "aistudio"
    default_revision = "master"
    endpoint_envs = ("STUDIO_GIT_HOST",)
    default_endpoint = "https://git.aistudio.baidu.com"
    token_env = "AISTUDIO_ACCESS_TOKEN"
    auth_scheme = "token"
    per_page = 1000

    def list_files(
        self, client: httpx.Client, repo_id: str, revision: str, retry: RetryPolicy
    ) -> list[RemoteFile]:
        repo = f"{self.endpoint()}/api/v1/repos/{repo_id}"
        files: list[RemoteFile] = []
        for path in self._tree_paths(client, repo, repo_id, revision, retry):
            if path in (".gitignore", ".gitattributes"):
                continue
            info, _ = self._get_json(
                client,
                f"{repo}/contents/{quote(path, safe='')}",
                repo_id=repo_id,
                revision=revision,
                retry=retry,
                params={"ref": revision},
            )
            if not isinstance(info, dict):
                raise self._malformed(repo_id, f"contents of {path} is not an object")
            lfs_size = _int_or_none(info.get("lfs_size"))
            files.append(
                RemoteFile(
                    path=path,
                    url=f"{repo}/media/{quote(path, safe='')}?ref={quote(revision, safe='')}",
                    size=lfs_size if lfs_size is not None else _int_or_none(info.get("size")),
                    sha256=_str_or_none(info.get("lfs_oid")),
                )
            )
        return files

    def _tree_paths(
        self, client: httpx.Client, repo: str, repo_id: str, revision: str, retry: RetryPolicy
    ) -> list[str]:
        paths: list[str] = []
        page, truncated = 1, True
        while truncated:
            data, _ = self._get_json(
                client,
                f"{repo}/git/trees/{quote(revision, safe='')}",
                repo_id=repo_id,
                revision=revision,
                retry=retry,
                params={"recursive": "true", "page": str(page), "per_page": str(self.per_page)},
            )
            tree = data.get("tree") if isinstance(data, dict) else None
            if not isinstance(tree, list):
                raise self._malformed(repo_id, "no tree list")
            for entry in tree:
                if isinstance(entry, dict) and entry.get("type") == "blob":
                    if not isinstance(entry.get("path"), str):
                        raise self._malformed(repo_id, f"entry without a path: {entry}")
                    paths.append(entry["path"])
            truncated = bool(data.get("truncated")) and bool(tree)
            page += 1
        return paths


SOURCES: dict[str, HubSource] = {
    s.name: s for s in (AIStudioSource(), HuggingFaceSource(), ModelScopeSource())
}
"""Hub adapters by their `--model-source` name."""


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
