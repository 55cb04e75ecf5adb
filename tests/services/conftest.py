"""Real service processes on 127.0.0.1 for the disaggregation tests (killed in teardown)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.launch import free_ports

ROOT = Path(__file__).resolve().parents[2]
MODEL_FLAGS = ["--max-model-len", "1024", "--max-num-seqs", "4"]
STARTUP_S = 180.0


def free_port() -> int:
    return free_ports(1)[0]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_service(role: str, tmp: Path, *flags: str, port: int | None = None) -> Service:
    port = port or free_port()
    log = tmp / f"{role}-{port}.log"
    cmd = [sys.executable, "-m", "tandem.cli", role, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, *flags], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    return Service(role, proc, port, log)


def wait_serving(services: list[Service], timeout_s: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout_s
    for svc in services:
        with grpc.insecure_channel(svc.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert svc.proc.poll() is None, f"{svc.name} exited:\n{svc.output()}"
                assert time.monotonic() < deadline, f"{svc.name} not healthy:\n{svc.output()}"
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)


@dataclass
class EnginePair:
    prefill: Service
    decode: Service
    tmp: Path
    extra: list[Service] = field(default_factory=list)

    def stop(self) -> None:
        for svc in (self.prefill, self.decode, *self.extra):
            svc.kill()


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnginePair]:
    """Prefill (small step budget: a long prompt takes many steps) and decode."""
    tmp = tmp_path_factory.mktemp("svc")
    prefill = start_service("prefill", tmp, *MODEL_FLAGS, "--max-num-batched-tokens", "32")
    decode = start_service("decode", tmp, *MODEL_FLAGS, "--num-kv-blocks", "48")
    pair = EnginePair(prefill, decode, tmp)
    try:
        wait_serving([prefill, decode])
        yield pair
    finally:
        pair.stop()


def run(coro: object, timeout_s: float = 60.0) -> object:
    """Run a coroutine with a bound on its duration."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))  # type: ignore[arg-type]


def sigterm(svc: Service) -> int:
    svc.proc.send_signal(signal.SIGTERM)
    return svc.proc.wait(30)
