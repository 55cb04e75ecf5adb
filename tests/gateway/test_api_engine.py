"""The REST front on the real engine (embedded tiny-ernie-vl, CPU) with the official client.

One `LocalBackend` and one uvicorn server (in a thread, 127.0.0.1, free port) per module.
The tiny model writes fluent nonsense, so the checks are about the protocol: shapes,
determinism, stop strings, usage, logprobs, media and cancellation.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from engine.llm_engine import EngineArgs
from gateway.app import GatewayConfig, create_app
from tandem.local_backend import LocalBackend
from tests.gateway.servers import ServerThread

MAX_MODEL_LEN = 512
MESSAGES = [{"role": "user", "content": "把李白的静夜思改写为现代诗"}]


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    args = EngineArgs(max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
    b = LocalBackend.create(args, {"video_max_frames": 30})
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def server(backend: LocalBackend) -> Iterator[ServerThread]:
    engine = backend.engine
    config = GatewayConfig(limit_mm_per_prompt={"image": 2, "video": 1})
    app = create_app(backend, engine.tokenizer, engine.chat_template, config)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    # As in FastDeploy's guide: any key, model "null".
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="null", max_retries=0)


def _wait_idle(backend: LocalBackend, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while backend.num_engine_requests() or backend.num_active_requests:
        assert time.monotonic() < deadline, "the engine still has requests"
        time.sleep(0.05)


def test_chat_thinking_on_and_off(client: openai.OpenAI) -> None:
    on = client.chat.completions.create(
        model="null", messages=MESSAGES, max_tokens=6, temperature=0
    )
    msg = on.choices[0].message
    assert isinstance(msg.reasoning_content, str)  # type: ignore[attr-defined]
    assert on.usage is not None and on.usage.completion_tokens == 6
    assert on.usage.prompt_tokens_details is not None
    assert on.usage.completion_tokens_details is not None
    off = client.chat.completions.create(
        model="null",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert off.choices[0].message.reasoning_content is None  # type: ignore[attr-defined]
    assert off.choices[0].message.content
    assert off.choices[0].finish_reason == "length"


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="tiny-ernie-vl", prompt="The moon over the river", max_tokens=6, temperature=0
    )
    whole = client.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )  # type: ignore[call-overload]
    text, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        text += "".join(c.text for c in chunk.choices)
    assert text == whole.choices[0].text
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_async_client_streams_chat(server: ServerThread) -> None:
    async def run() -> tuple[str, str | None]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="null", max_retries=0)
        stream = await aclient.chat.completions.create(
            model="null",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,  # type: ignore[arg-type]
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta:
                delta = chunk.choices[0].delta
                text += (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
                finish = chunk.choices[0].finish_reason or finish
        await aclient.close()
        return text, finish

    text, finish = asyncio.run(run())
    assert text and finish == "length"


def test_seed_reproducible_and_n(client: openai.OpenAI) -> None:
    def ask(seed: int, n: int = 1) -> list[str]:
        r = client.completions.create(
            model="null", prompt="Once upon a time", max_tokens=5, temperature=1.0, seed=seed, n=n
        )
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(1234, n=2)
    assert len(first) == 2
    assert ask(1234, n=2) == first
    assert ask(1234) == first[:1]


def test_stop_string(client: openai.OpenAI) -> None:
    base = (
        client.completions.create(model="null", prompt="Spring rain", max_tokens=8, temperature=0)
        .choices[0]
        .text
    )
    stop = base[len(base) // 2 : len(base) // 2 + 2]
    assert stop.strip(), f"unusable output {base!r}"
    r = client.completions.create(
        model="null", prompt="Spring rain", max_tokens=8, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == base[: base.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="null", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def _png_data_url(size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_seed_curl_with_image_data_url(server: ServerThread) -> None:
    # FastDeploy guide's image request, the picture sent inline as a data URL.
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _png_data_url()}},
                    {"type": "text", "text": "图中的文物属于哪个年代?"},
                ],
            }
        ],
        "max_tokens": 4,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "default"
    text_only = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "图中的文物属于哪个年代?"}],
            "max_tokens": 1,
        },
        timeout=60,
    ).json()
    assert data["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 4
    # The same image again: its prompt prefix comes from the prefix cache.
    again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_prompt_over_max_model_len_is_400(server: ServerThread) -> None:
    body = {"messages": [{"role": "user", "content": "静夜思 " * MAX_MODEL_LEN}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": [10**7], "max_tokens": 1}, timeout=30
    )
    assert r.status_code == 400  # engine-side validation (token id outside the vocabulary)


def test_streaming_disconnect_frees_the_engine(server: ServerThread, backend: LocalBackend) -> None:
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 400, "ignore_eos": True}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
        assert backend.num_engine_requests() == 1
    _wait_idle(backend)


def test_health(server: ServerThread) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny-ernie-vl"
