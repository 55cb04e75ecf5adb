"""engine.hub: --model resolution and resumable downloads against a local stand-in hub."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.hub import (
    DownloadIntegrityError,
    HubConnectionError,
    InvalidModelError,
    ModelNotFoundError,
    ModelResolutionError,
    RetryPolicy,
    resolve_model,
)
from tests.engine.hub_fixtures.fake_hub import FakeHub

REPO = "baidu/ERNIE-4.5-VL-Tiny-Paddle"
WEIGHTS = "model-00001-of-00001.safetensors"
SOURCES = ["aistudio", "huggingface", "modelscope"]
FAST = RetryPolicy(attempts=3, backoff_s=0.01)
ENDPOINT_ENVS = ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "STUDIO_GIT_HOST")


def _repo_files() -> dict[str, bytes]:
    rng = random.Random(0)
    return {
        "config.json": json.dumps(
            {"architectures": ["Ernie4_5_VLMoeForConditionalGeneration"]}
        ).encode(),
        WEIGHTS: rng.randbytes(1_000_003),
        "tokenizer.model": rng.randbytes(20_000),
        "tokenizer_config.json": b'{"model_max_length": 131072}',
        "sub/preprocessor_config.json": b'{"patch_size": 14}',
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub(repos={REPO: _repo_files()}).start()
    for env in ("TANDEM_MODEL_SOURCE", "TANDEM_CACHE_DIR", "HF_TOKEN",
                "MODELSCOPE_API_TOKEN", "AISTUDIO_ACCESS_TOKEN"):  # fmt: skip
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", fake.url)
    monkeypatch.setenv("STUDIO_GIT_HOST", fake.url)
    yield fake
    fake.stop()


def _resolve(tmp_path: Path, source: str, **kw: object) -> Path:
    return resolve_model(REPO, source=source, cache_dir=tmp_path, retry=FAST, **kw)  # type: ignore[arg-type]


def _assert_identical(model_dir: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (model_dir / path).read_bytes() == data, path
    assert not list(model_dir.rglob("*.part"))


# -- local paths and bad names --------------------------------------------------------------
def test_local_dir_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_model(f"  {tmp_path}/ ") == tmp_path.resolve()


def test_local_dir_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_local_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidModelError, match="is a file"):
        resolve_model(str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(
    "name",
    ["", "   ", "ERNIE-4.5-VL", "a/b/c", "/no/such/dir", "./missing", "org/", "../x", "o/.."],
)
def test_bad_names_are_rejected_before_any_request(hub: FakeHub, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidModelError, match=r"empty|neither an existing directory"):
        resolve_model(name, cache_dir=tmp_path)
    assert hub.requests == []


def test_unknown_source_and_bad_revision(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"unknown model source 'github'.*huggingface"):
        resolve_model(REPO, source="github", cache_dir=tmp_path)
    with pytest.raises(InvalidModelError, match="invalid revision"):
        resolve_model(REPO, source="huggingface", cache_dir=tmp_path, revision="../../etc")
    assert hub.requests == []


# -- downloads ------------------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_download_from_each_source(hub: FakeHub, tmp_path: Path, source: str) -> None:
    model_dir = _resolve(tmp_path, source)
    assert model_dir == tmp_path / source / "baidu" / "ERNIE-4.5-VL-Tiny-Paddle"
    _assert_identical(model_dir, hub.repos[REPO])
    assert not (model_dir / ".gitattributes").exists()
    assert hub.fetched() == sorted(hub.repos[REPO])
    # Nothing resumed: no Range on a fresh download.
    assert all(r.range is None for r in hub.file_gets())


@pytest.mark.parametrize("source", SOURCES)
def test_second_resolve_makes_no_requests(hub: FakeHub, tmp_path: Path, source: str) -> None:
    first = _resolve(tmp_path, source)
    hub.requests.clear()
    assert _resolve(tmp_path, source) == first
    assert hub.requests == []


def test_missing_file_after_download_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    model_dir = _resolve(tmp_path, "huggingface")
    (model_dir / "tokenizer.model").unlink()
    hub.requests.clear()
    _resolve(tmp_path, "huggingface")
    assert [r.file for r in hub.file_gets()] == ["tokenizer.model"]
    _assert_identical(model_dir, hub.repos[REPO])


@pytest.mark.parametrize("source", SOURCES)
def test_cut_connection_resumes_with_range(hub: FakeHub, tmp_path: Path, source: str) -> None:
    hub.cut_after[WEIGHTS] = 300_000
    model_dir = _resolve(tmp_path, source)
    _assert_identical(model_dir, hub.repos[REPO])
    gets = [r for r in hub.file_gets() if r.file == WEIGHTS]
    assert [r.range for r in gets] == [None, "bytes=300000-"]


def test_leftover_part_file_resumes(hub: FakeHub, tmp_path: Path) -> None:
    data = hub.repos[REPO][WEIGHTS]
    part = tmp_path / "modelscope/baidu/ERNIE-4.5-VL-Tiny-Paddle/.tandem-download" / WEIGHTS
    part = part.with_name(WEIGHTS + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:400_000])  # as a killed process would leave it
    model_dir = _resolve(tmp_path, "modelscope")
    _assert_identical(model_dir, hub.repos[REPO])
    assert [r.range for r in hub.file_gets() if r.file == WEIGHTS] == ["bytes=400000-"]


def test_server_ignoring_range_still_gives_the_right_bytes(hub: FakeHub, tmp_path: Path) -> None:
    hub.cut_after[WEIGHTS] = 250_000
    hub.ignore_range = True
    _assert_identical(_resolve(tmp_path, "aistudio"), hub.repos[REPO])


def test_sha256_mismatch_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add(WEIGHTS)
    with pytest.raises(DownloadIntegrityError, match="sha256"):
        _resolve(tmp_path, "huggingface")
    model_dir = tmp_path / "huggingface" / REPO
    assert not (model_dir / WEIGHTS).exists()
    assert not list(model_dir.rglob("*.part"))  # bad bytes are never resumed from


def test_git_blob_id_mismatch_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("tokenizer_config.json")  # a small non-LFS file: checked by git blob id
    with pytest.raises(DownloadIntegrityError, match="git blob id"):
        _resolve(tmp_path, "huggingface")


def test_concurrent_resolves_fetch_each_file_once(hub: FakeHub, tmp_path: Path) -> None:
    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(_resolve(tmp_path, "huggingface"))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 2 and all(isinstance(r, Path) for r in results), results
    assert hub.fetched() == sorted(hub.repos[REPO])


def test_revision_gets_its_own_directory(hub: FakeHub, tmp_path: Path) -> None:
    model_dir = _resolve(tmp_path, "huggingface", revision="v1")
    assert model_dir.name == "ERNIE-4.5-VL-Tiny-Paddle@v1"
    assert all("/v1/" in r.path for r in hub.file_gets() if "cdn" not in r.path)


# -- errors from the hub ---------------------------------------------------------------------
@pytest.mark.parametrize("source", SOURCES)
def test_unknown_repo(hub: FakeHub, tmp_path: Path, source: str) -> None:
    with pytest.raises(ModelNotFoundError, match=f"{source} .*no model repo 'baidu/nope'"):
        resolve_model("baidu/nope", source=source, cache_dir=tmp_path, retry=FAST)
    with pytest.raises(ModelNotFoundError, match="revision 'dev'"):
        _resolve(tmp_path, source, revision="dev")
    assert not (tmp_path / source / "baidu" / "nope").exists()


def test_repo_without_config_json(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["baidu/dataset"] = {"data.bin": b"123"}
    with pytest.raises(InvalidModelError, match=r"no config\.json"):
        resolve_model("baidu/dataset", source="modelscope", cache_dir=tmp_path, retry=FAST)
    assert hub.file_gets() == []


def test_unsafe_path_in_listing(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO]["../../evil.sh"] = b"rm -rf"
    with pytest.raises(HubConnectionError, match="unsafe file path"):
        _resolve(tmp_path, "modelscope")
    assert hub.file_gets() == []


@pytest.mark.parametrize("source", SOURCES)
def test_unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for env in ENDPOINT_ENVS:
        monkeypatch.setenv(env, dead)
    with pytest.raises(HubConnectionError, match=r"failed after 3 attempt\(s\).*set [A-Z_]+"):
        _resolve(tmp_path, source)


@pytest.mark.parametrize("value", ["http://", "ftp://mirror", "::::", "http://a b"])
def test_malformed_endpoint_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", value)
    with pytest.raises(InvalidModelError, match=r"HF_ENDPOINT is set to .* not an http"):
        _resolve(tmp_path, "huggingface")


def test_errors_share_one_base_class() -> None:
    for cls in (InvalidModelError, ModelNotFoundError, HubConnectionError, DownloadIntegrityError):
        assert issubclass(cls, ModelResolutionError)


# -- environment ----------------------------------------------------------------------------
def test_env_selects_source_and_cache_dir(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_MODEL_SOURCE", "ModelScope")
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MODELSCOPE_ENDPOINT")
    monkeypatch.setenv("MODELSCOPE_DOMAIN", hub.url)  # the older variable still works
    model_dir = resolve_model(REPO, retry=FAST)
    assert model_dir == tmp_path / "cache" / "modelscope" / REPO
    assert all("/api/v1/models/" in r.path for r in hub.requests)


@pytest.mark.parametrize(
    ("source", "env", "expected"),
    [
        ("aistudio", "AISTUDIO_ACCESS_TOKEN", "token secret"),
        ("huggingface", "HF_TOKEN", "Bearer secret"),
        ("modelscope", "MODELSCOPE_API_TOKEN", "Bearer secret"),
    ],
)
def test_token_is_sent(
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    env: str,
    expected: str,
) -> None:
    monkeypatch.setenv(env, "secret")
    _resolve(tmp_path, source)
    # The HF CDN redirect goes to the same (test) origin, so every request carries it.
    assert {r.auth for r in hub.requests} == {expected}
