"""`tandem serve`: FastDeploy's command line, its refusals, and a real server process."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tandem.cli import build_parser, main
from tandem.launch import free_ports

ROOT = Path(__file__).resolve().parents[1]

# The FastDeploy guide's command line, verbatim (ports and model aside).
SEED_FLAGS = [
    "--engine-worker-queue-port", "8181",
    "--cache-queue-port", "8182", "--metrics-port", "8182",
    "--tensor-parallel-size", "8",
    "--quantization", "wint4",
    "--max-model-len", "32768",
    "--max-num-seqs", "32",
    "--mm-processor-kwargs", '{"video_max_frames": 30}',
    "--limit-mm-per-prompt", '{"image": 10, "video": 3}',
    "--reasoning-parser", "ernie-45-vl",
]  # fmt: skip


def test_seed_command_line_parses() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "baidu/ERNIE-4.5-VL-424B-A47B-Paddle", "--port", "8180", *SEED_FLAGS]
    )
    assert args.port == 8180 and args.metrics_port == 8182 and args.cache_queue_port == 8182
    assert args.engine_worker_queue_port == 8181
    assert args.tensor_parallel_size == 8 and args.quantization == "wint4"
    assert args.max_model_len == 32768 and args.max_num_seqs == 32
    assert args.mm_processor_kwargs == {"video_max_frames": 30}
    assert args.limit_mm_per_prompt == {"image": 10, "video": 3}


def test_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.port, args.host) == ("tiny-ernie-vl", 8180, "0.0.0.0")


def test_seed_command_line_names_why_tp8_cannot_split_the_embedded_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The seed serves the 424B model on 8 GPUs; the embedded model has 4 attention heads,
    # so the same flags are refused before any process starts, with the reason.
    assert main(["serve", *SEED_FLAGS]) == 1
    err = capsys.readouterr().err
    assert "tensor parallel size 8 does not divide the model's attention heads (4)" in err


def test_tensor_parallel_on_missing_gpus_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--device", "cuda", "--tensor-parallel-size", "2"]) == 1
    assert "needs 2 GPUs" in capsys.readouterr().err


def test_unknown_quantization_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--quantization", "int3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--quantization: invalid choice: 'int3'" in err and "wint8" in err and "wint4" in err


def test_bad_json_flag_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--limit-mm-per-prompt", "{image: 1}"])
    assert exc.value.code == 2


def test_unknown_mm_processor_kwarg(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--mm-processor-kwargs", '{"bogus": 1}']) == 1
    assert "bogus" in capsys.readouterr().err


def test_help_explains_ports(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--engine-worker-queue-port", "--cache-queue-port", "--metrics-port"):
        assert flag in out
    assert "unused" in out and "ENABLE_V1_KVCACHE_SCHEDULER" in out


# -- a real `tandem serve` process --------------------------------------------------------


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, metrics_port: int) -> None:
        self.proc, self.port, self.metrics_port = proc, port, metrics_port
        self.grpc_port = 0
        self.lines: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    yield from _serve()


def _serve(*extra: str) -> Iterator[Served]:
    port, worker_port, cache_port, grpc_port = free_ports(4)
    # FastDeploy's guide passes the same port to --cache-queue-port and --metrics-port.
    cmd = [
        sys.executable, "-m", "tandem.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--engine-worker-queue-port", str(worker_port),
        "--cache-queue-port", str(cache_port), "--metrics-port", str(cache_port),
        "--grpc-port", str(grpc_port), "--max-model-len", "1024", "--max-num-seqs", "4",
        "--mm-processor-kwargs", '{"video_max_frames": 30}',
        "--limit-mm-per-prompt", '{"image": 10, "video": 3}',
        "--reasoning-parser", "ernie-45-vl", *extra,
    ]  # fmt: skip
    env = {**os.environ, "ENABLE_V1_KVCACHE_SCHEDULER": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = Served(proc, port, cache_port)
    server.grpc_port = grpc_port
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"tandem serve exited: {proc.stdout.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "tandem serve did not become healthy"
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_prints_endpoints_and_answers(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="null", max_retries=0)
    stream = client.chat.completions.create(
        model="null",
        messages=[{"role": "user", "content": "把李白的静夜思改写为现代诗"}],
        stream=True,
        max_tokens=4,
    )
    chunks = [c for c in stream]
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    r = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=5)
    assert r.status_code == 200 and "tandem_http_requests_total" in r.text


def test_seed_curl_thinking_off_with_image(served: Served) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (90, 60, 30)).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "图中的文物属于哪个年代"},
                ],
            }
        ],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 4,
    }
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and isinstance(message["content"], str)


def test_serve_answers_public_grpc(served: Served) -> None:
    import grpc

    from tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        # REST answering /health does not mean the gRPC listener is bound yet
        grpc.channel_ready_future(channel).result(timeout=90)
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            tokens=generation_pb2.TokenInput(token_ids=[5, 6, 7]),
            sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0),
        )
        deltas = [r.delta for r in stub.Generate(request, timeout=60)]
    assert sum(len(d.token_ids) for d in deltas) == 3
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert deltas[-1].usage.completion_tokens == 3


def test_sigterm_stops_cleanly(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    out, _ = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 0, out
    assert f"Launching chat completion service at http://127.0.0.1:{served.port}" in out
    assert f"Launching completion service at http://127.0.0.1:{served.port}" in out
    assert f"Launching metrics service at http://127.0.0.1:{served.metrics_port}/metrics" in out


@pytest.fixture(scope="module")
def served_wint8() -> Iterator[Served]:
    yield from _serve("--quantization", "wint8")


def _chat_four_tokens(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="null", max_retries=0)
    reply = client.chat.completions.create(
        model="null", messages=[{"role": "user", "content": "你好"}], max_tokens=4
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


def test_serve_wint8_answers_chat(served_wint8: Served) -> None:
    _chat_four_tokens(served_wint8)
    served_wint8.proc.send_signal(signal.SIGTERM)
    out, _ = served_wint8.proc.communicate(timeout=30)
    # prefill and decode each quantize their copy of the language model
    assert out.count("weight-only wint8: quantized") == 2, out


@pytest.fixture(scope="module")
def served_tp2() -> Iterator[Served]:
    yield from _serve("--tensor-parallel-size", "2")


def test_serve_tensor_parallel_answers_chat_and_stops_its_workers(served_tp2: Served) -> None:
    # prefill and decode each split the model over 2 CPU ranks (a worker process each)
    _chat_four_tokens(served_tp2)
    workers = _descendants(served_tp2.proc.pid, b"engine.tp_executor")
    assert len(workers) == 2, workers
    served_tp2.proc.send_signal(signal.SIGTERM)
    out, _ = served_tp2.proc.communicate(timeout=60)
    assert served_tp2.proc.returncode == 0, out
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # state, ppid, ...


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _descendants(root: int, needle: bytes) -> list[int]:
    """Live descendants of `root` whose command line contains `needle`."""
    parent = {}
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            parent[int(entry.name)] = int(stat[1])
    found = []
    for pid in parent:
        p = pid
        while p in parent and p != root:
            p = parent[p]
        if p == root and pid != root:
            try:
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
    return found
