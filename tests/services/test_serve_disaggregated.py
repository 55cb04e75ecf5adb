"""`tandem serve` disaggregated (vision + prefill + decode + gateway) against `--colocate`."""

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
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tandem.launch import free_ports
from tandem.v1 import engine_pb2, engine_pb2_grpc
from tests.services.conftest import ROOT


class Serve:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, log: Path, grpc_ports: dict[str, int]
    ):
        self.proc, self.port, self.log, self.grpc_ports = proc, port, log, grpc_ports

    def chat(self, content: Any) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 16,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False},
        }
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()


def _start(tmp: Path, *extra: str) -> Serve:
    port, gateway_grpc, *role_ports = free_ports(5)  # distinct: bound all at once
    grpc_ports = dict(zip(("prefill", "decode", "vision"), role_ports, strict=True))
    log = tmp / f"serve-{port}.log"
    cmd = [
        sys.executable, "-m", "tandem.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "1024", "--max-num-seqs", "4", "--grpc-port", str(gateway_grpc),
        "--prefill-port", str(grpc_ports["prefill"]), "--decode-port", str(grpc_ports["decode"]),
        "--vision-port", str(grpc_ports["vision"]), *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    return Serve(proc, port, log, grpc_ports)


def _wait(serve: Serve) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert serve.proc.poll() is None, serve.log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, serve.log.read_text(errors="replace")[-4000:]
        try:
            if httpx.get(f"http://127.0.0.1:{serve.port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, Serve]]:
    tmp = tmp_path_factory.mktemp("serve")
    disagg, colocated = _start(tmp), _start(tmp, "--colocate")
    try:
        _wait(disagg)
        _wait(colocated)
        yield disagg, colocated
    finally:
        for s in (disagg, colocated):
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


CASES = {
    "text": "把李白的静夜思改写为现代诗",
    "image": [
        {"type": "image_url", "image_url": {"url": _image_url()}},
        {"type": "text", "text": "What is in the picture?"},
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_disaggregated_equals_colocated(servers: tuple[Serve, Serve], case: str) -> None:
    disagg, colocated = servers
    a, b = disagg.chat(CASES[case]), colocated.chat(CASES[case])
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 16
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


def test_every_service_is_healthy(servers: tuple[Serve, Serve]) -> None:
    disagg, _ = servers
    for name, port in disagg.grpc_ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def _blocks_in_use(serve: Serve) -> dict[str, int]:
    """Each engine's KV blocks in use, from its `Stats` RPC."""
    got = {}
    for role, stub_cls in (
        ("prefill", engine_pb2_grpc.PrefillStub),
        ("decode", engine_pb2_grpc.DecodeStub),
    ):
        with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_ports[role]}") as ch:
            got[role] = stub_cls(ch).Stats(engine_pb2.StatsRequest(), timeout=5).num_used_blocks
    return got


def _metric_blocks_in_use(serve: Serve) -> dict[str, float]:
    """The same from the gateway's /metrics (refreshed every 2 s)."""
    text = httpx.get(f"http://127.0.0.1:{serve.port}/metrics", timeout=5).text
    got = {}
    for line in text.splitlines():
        for role in ("prefill", "decode"):
            if line.startswith(f'tandem:kv_blocks_used{{role="{role}"}}'):
                got[role] = float(line.split()[-1])
    return got


def test_client_disconnect_mid_stream_frees_both_engines(servers: tuple[Serve, Serve]) -> None:
    disagg, _ = servers
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 600,
        "ignore_eos": True,
        "stream": True,
    }
    url = f"http://127.0.0.1:{disagg.port}/v1/chat/completions"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):  # a few chunks in: decode is streaming
            next(lines)
        assert _blocks_in_use(disagg)["decode"] > 0
    # the client went away: both engines free every block within a few seconds
    deadline = time.monotonic() + 5
    while (held := _blocks_in_use(disagg)) != {"prefill": 0, "decode": 0}:
        assert time.monotonic() < deadline, f"blocks still in use: {held}"
        time.sleep(0.1)
    deadline = time.monotonic() + 6  # /metrics lags by up to one stats refresh
    while (shown := _metric_blocks_in_use(disagg)) != {"prefill": 0.0, "decode": 0.0}:
        assert time.monotonic() < deadline, f"/metrics still shows {shown}"
        time.sleep(0.2)


def test_sigterm_stops_every_child(servers: tuple[Serve, Serve]) -> None:
    disagg, _ = servers
    disagg.proc.send_signal(signal.SIGTERM)
    assert disagg.proc.wait(60) == 0, disagg.log.read_text(errors="replace")[-4000:]
    for port in disagg.grpc_ports.values():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
