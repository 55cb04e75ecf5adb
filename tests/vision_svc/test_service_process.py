"""`vision_svc.server.serve` as its own process: serves, answers, stops on SIGTERM with
exit code 0 and no worker process left behind; and its command-line flags."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.tiny import ensure_tiny_model
from tests.vision_svc.service_helpers import TIMEOUT_S, encode, image_item, noise_png
from vision_svc.processing import InvalidMediaOptionsError
from vision_svc.server import (
    DEFAULT_CACHE_BYTES,
    add_cli_arguments,
    parse_bytes,
    serve,
)

REPO = Path(__file__).resolve().parents[2]
SERVE = (
    "from vision_svc.server import serve; "
    "serve(port=0, host='127.0.0.1', device='cpu', dtype='float32', num_workers=1, grace_s=1)"
)


def _stat(pid: int) -> list[str] | None:
    """(state, ppid, ...) of a process, None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> set[int]:
    """Live child pids of `pid` (from /proc)."""
    pids = [int(p.name) for p in Path("/proc").glob("[0-9]*")]
    stats = {p: _stat(p) for p in pids}
    return {c for c, f in stats.items() if f and int(f[1]) == pid and f[0] != "Z"}


def wait_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    """Those of `pids` still running (not exited, not zombie) after up to `timeout_s`.

    multiprocessing's resource tracker exits only once its parent has, so allow a moment.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {p for p in pids if (f := _stat(p)) is not None and f[0] != "Z"}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def read_port(proc: subprocess.Popen[str]) -> int:
    """The port from the 'serving ... on host:port' line, within TIMEOUT_S."""
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=TIMEOUT_S)
        m = re.search(r"VisionEncoder serving .* on 127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))


def test_serve_answers_then_stops_on_sigterm() -> None:
    ensure_tiny_model()  # built once, outside the child's startup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        port = read_port(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            [item] = encode(channel, image_item(noise_png(56, 56))).items
            assert tuple(item.grid_thw) == (1, 4, 4) and item.num_tokens == 4
        workers = children_of(proc.pid)
        assert workers, "a cache miss should have spawned a preprocessing worker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0
        assert wait_gone(workers) == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)


def test_serve_refuses_bad_options_before_loading() -> None:
    with pytest.raises(InvalidMediaOptionsError, match="unknown mm-processor-kwargs"):
        serve(model="/nonexistent", mm_processor_kwargs={"video_max_frame": 3})
    with pytest.raises(ValueError, match="port"):
        serve(model="/nonexistent", port=70000)


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args([])
    assert args.model == "tiny-ernie-vl" and args.embedding_cache_bytes == DEFAULT_CACHE_BYTES
    args = parser.parse_args(
        [
            "--port=0",
            "--embedding-cache-bytes=512MiB",
            '--mm-processor-kwargs={"video_max_frames": 30}',
            "--preprocess-workers=3",
        ]
    )
    assert (args.port, args.embedding_cache_bytes, args.preprocess_workers) == (0, 512 << 20, 3)
    assert args.mm_processor_kwargs == {"video_max_frames": 30}
    assert [parse_bytes(s) for s in ("1024", "2G", "2GB", "2GiB", "3k")] == [
        1024,
        2 << 30,
        2 << 30,
        2 << 30,
        3072,
    ]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
