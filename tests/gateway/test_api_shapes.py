"""REST shapes and error codes of the gateway, over real HTTP, against a scripted backend.

The fake backend answers every prompt with a fixed script (reasoning, `</think>`, answer),
one token per delta, so the reasoning split, stop strings, n > 1, usage and logprobs can be
checked exactly. Real-engine tests live in test_api_engine.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from chat.build_tokenizer import build_tokenizer
from chat.template import ChatTemplate
from chat.tokenizer import Tokenizer
from gateway.app import GatewayConfig, create_app
from gateway.backend import EncodedMedia, GenerateDelta, GenerateRequest, MediaItem
from gateway.errors import OverloadedError
from tests.gateway.servers import ServerThread

SCRIPT_REASONING = "Let me think about it."
SCRIPT_ANSWER = "The answer is 42. Done."
MAX_MODEL_LEN = 256
API_KEY = "sk-test"


@dataclass
class FakeBackend:
    """Replays `script` token by token; records what it was asked and what was closed."""

    tokenizer: Tokenizer
    model_name: str = "fake-ernie"
    max_model_len: int = MAX_MODEL_LEN
    delay_s: float = 0.0
    overloaded: bool = False
    requests: list[GenerateRequest] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def script(self, req: GenerateRequest) -> list[int]:
        prompt = self.tokenizer.decode(req.prompt_token_ids)
        thinking = prompt.rstrip().endswith("<think>")
        text = f"{SCRIPT_REASONING}</think>{SCRIPT_ANSWER}" if thinking else SCRIPT_ANSWER
        return [*self.tokenizer.encode(text), self.tokenizer.token_to_id("</s>")]

    async def encode_media(self, item: MediaItem) -> EncodedMedia:
        return EncodedMedia(item.kind, (1, 2, 2), 1, "hash")

    async def check_health(self) -> bool:
        return True

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        if self.overloaded:
            raise OverloadedError("queue full", retry_after_s=3)
        self.requests.append(req)
        ids = self.script(req)
        limit = req.sampling.max_tokens or len(ids)
        try:
            for i, token in enumerate(ids[:limit]):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                last = i + 1 == min(limit, len(ids))
                reason = ("stop" if i + 1 == len(ids) else "length") if last else None
                top = req.sampling.logprobs
                yield GenerateDelta(
                    [token],
                    logprobs=None if top is None else [{token: -0.5, 7: -1.0, 8: -2.0}],
                    finished=last,
                    finish_reason=reason,
                    num_prompt_tokens=len(req.prompt_token_ids),
                    num_cached_tokens=4,
                    num_output_tokens=i + 1,
                )
            self.finished.append(req.request_id)
        finally:
            if req.request_id not in self.finished:
                self.closed.append(req.request_id)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def backend(tokenizer: Tokenizer) -> FakeBackend:
    return FakeBackend(tokenizer)


@pytest.fixture(scope="module")
def server(backend: FakeBackend, tokenizer: Tokenizer) -> Iterator[ServerThread]:
    config = GatewayConfig(
        api_key=API_KEY, limit_mm_per_prompt={"image": 1}, max_request_body_bytes=64 * 1024
    )
    app = create_app(backend, tokenizer, ChatTemplate(), config)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        yield c


MESSAGES = [{"role": "user", "content": "What is the answer?"}]


def test_chat_splits_reasoning_from_content(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="null", messages=MESSAGES)
    msg = r.choices[0].message
    assert msg.reasoning_content == SCRIPT_REASONING  # type: ignore[attr-defined]
    assert msg.content == SCRIPT_ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    details = r.usage.completion_tokens_details
    assert details is not None and 0 < details.reasoning_tokens < r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_thinking_off_gives_null_reasoning(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}}
    data = http.post("/v1/chat/completions", json=body).json()
    message = data["choices"][0]["message"]
    assert "reasoning_content" in message and message["reasoning_content"] is None
    assert message["content"] == SCRIPT_ANSWER
    assert data["model"] == "default"  # FastDeploy reports "default" when no model is given
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_streaming_deltas_rebuild_the_message(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-ernie", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    reasoning, content, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(reasoning) == SCRIPT_REASONING
    assert "".join(content) == SCRIPT_ANSWER
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_stream_ends_with_done(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 3}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_content(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="null",
        messages=MESSAGES,
        stop=["42"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].message.content == "The answer is 42"
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="null", messages=MESSAGES, stop="42")
    assert r.choices[0].message.content == "The answer is "


def test_stop_reason_names_what_ended_the_choice(http: httpx.Client, tokenizer: Tokenizer) -> None:
    def choice(body: dict) -> dict:
        return http.post("/v1/chat/completions", json={"messages": MESSAGES, **body}).json()[
            "choices"
        ][0]

    assert choice({"stop": ["42"]})["stop_reason"] == "42"
    eos = choice({})  # the script ends on </s>: a stop token
    assert (eos["finish_reason"], eos["stop_reason"]) == ("stop", tokenizer.token_to_id("</s>"))
    cut = choice({"max_tokens": 2})
    assert (cut["finish_reason"], cut["stop_reason"]) == ("length", None)
    text = http.post("/v1/completions", json={"prompt": "hi", "stop": "answer"}).json()
    assert text["choices"][0]["stop_reason"] == "answer"


def test_streamed_stop_reason_comes_with_the_finish(http: httpx.Client) -> None:
    body = {"messages": MESSAGES, "stream": True, "stop": ["42"]}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [
            json.loads(line.removeprefix("data: "))
            for line in r.iter_lines()
            if line.startswith("data: {")
        ]
    choices = [c for e in events for c in e["choices"]]
    assert [c["stop_reason"] for c in choices if c["finish_reason"]] == ["42"]
    assert all(c["stop_reason"] is None for c in choices if not c["finish_reason"])


def test_stop_string_cancels_backend_stream(client: openai.OpenAI, backend: FakeBackend) -> None:
    before = len(backend.closed)
    client.completions.create(model="null", prompt="hello", stop=["answer"], max_tokens=50)
    assert len(backend.closed) == before + 1


def test_n_choices_and_seeds(client: openai.OpenAI, backend: FakeBackend) -> None:
    r = client.chat.completions.create(model="null", messages=MESSAGES, n=3, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    seeds = [req.sampling.seed for req in backend.requests[-3:]]
    assert seeds == [11, 12, 13]
    one = r.usage.completion_tokens // 3  # type: ignore[union-attr]
    assert r.usage.completion_tokens == 3 * one  # type: ignore[union-attr]


def test_streaming_n_choices(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="null", prompt="hi", n=2, stream=True, max_tokens=4)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert set(texts) == {0, 1} and texts[0] == texts[1]


def test_completion_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model="null", prompt="hi", max_tokens=5, logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.object == "text_completion"
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 5
    assert choice.logprobs.token_logprobs == [-0.5] * 5
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs or [])


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="null", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert content[0].logprob == -0.5 and len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob == -0.5


def test_token_prompts_and_return_token_ids(http: httpx.Client, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello world")
    body = {"prompt": [ids, ids], "max_tokens": 2, "return_token_ids": True}
    data = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["choices"][0]["prompt_token_ids"] == ids
    assert len(data["choices"][0]["completion_token_ids"]) == 2
    assert data["usage"]["prompt_tokens"] == 2 * len(ids)


def test_models_and_probes(http: httpx.Client, server: ServerThread) -> None:
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake-ernie"
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    bare = httpx.Client(base_url=server.url)  # health and liveness need no key
    assert bare.get("/health").status_code == 200
    assert bare.get("/live").status_code == 200
    assert "tandem_http_requests_total" in bare.get("/metrics").text


def _png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_part_expands_placeholder(http: httpx.Client, backend: FakeBackend) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": _png_data_url()}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    req = backend.requests[-1]
    assert len(req.media) == 1
    image_id = backend.tokenizer.token_to_id("<|IMAGE_PLACEHOLDER|>")
    assert req.prompt_token_ids.count(image_id) == 1


# -- errors ------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES, "temperature": 5},
        {"messages": MESSAGES, "max_tokens": 0},
        {"messages": MESSAGES, "n": 0},
        {"messages": MESSAGES, "top_logprobs": 99, "logprobs": True},
        {"messages": []},
        {"model": "null"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        {"messages": MESSAGES, "min_tokens": 9, "max_tokens": 2},
    ],
)
def test_bad_fields_are_400(http: httpx.Client, body: dict) -> None:
    _error(http.post("/v1/chat/completions", json=body), 400)


def test_bad_json_is_400(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    _error(r, 400)


def test_prompt_too_long_is_400(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 400}]}
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded"
    body = {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}
    _error(http.post("/v1/completions", json=body), 400)


def test_too_many_images_is_400(http: httpx.Client) -> None:
    part = {"type": "image_url", "image_url": {"url": _png_data_url()}}
    body = {"messages": [{"role": "user", "content": [part, part]}]}
    err = _error(http.post("/v1/chat/completions", json=body), 400)
    assert "limit-mm-per-prompt" in err["message"]


def test_bad_media_url_is_400(http: httpx.Client) -> None:
    part = {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}
    body = {"messages": [{"role": "user", "content": [part]}]}
    _error(http.post("/v1/chat/completions", json=body), 400)


def test_wrong_key_is_401(server: ServerThread) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="null", messages=MESSAGES)  # type: ignore[arg-type]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"})
    _error(r, 401)


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert _error(http.get("/v1/nothing-here"), 404)


def test_large_body_is_413(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    err = _error(http.post("/v1/chat/completions", json=body), 413)
    assert err["code"] == "request_too_large"


def test_queue_full_is_503_with_retry_after(http: httpx.Client, backend: FakeBackend) -> None:
    backend.overloaded = True
    try:
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES})
    finally:
        backend.overloaded = False
    _error(r, 503)
    assert r.headers["Retry-After"] == "3"


def test_client_disconnect_cancels_stream(http: httpx.Client, backend: FakeBackend) -> None:
    backend.delay_s = 0.05
    try:
        body = {"prompt": "hi", "stream": True, "max_tokens": 200}
        with http.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        rid = backend.requests[-1].request_id
        deadline = time.monotonic() + 5
        while rid not in backend.closed:
            assert time.monotonic() < deadline, "the backend stream was not closed"
            time.sleep(0.02)
    finally:
        backend.delay_s = 0.0


def test_client_disconnect_cancels_non_streaming(
    server: ServerThread, backend: FakeBackend
) -> None:
    backend.delay_s = 0.05
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/completions",
                json={"prompt": "x", "max_tokens": 200},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=0.3,
            )
        rid = backend.requests[-1].request_id
        deadline = time.monotonic() + 5
        while rid not in backend.closed:
            assert time.monotonic() < deadline, "the backend stream was not closed"
            time.sleep(0.02)
    finally:
        backend.delay_s = 0.0


def test_gateway_never_imports_torch() -> None:
    root = Path(__file__).resolve().parents[2] / "gateway"
    for file in root.rglob("*.py"):
        text = file.read_text()
        assert "import torch" not in text and "from engine" not in text, file


def test_streaming_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="null", prompt="hi", max_tokens=6, logprobs=1, stream=True
    )
    tokens = [
        t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.tokens or []
    ]
    assert len(tokens) == 6
