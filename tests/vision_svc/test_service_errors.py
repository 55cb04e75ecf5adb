"""The error policy over real gRPC (fake model and pool), and the preprocessing pool's bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
import pytest
import torch

from tests.vision_svc.service_helpers import encode, image_item, noise_png, running
from vision_svc.cache import EmbeddingCache
from vision_svc.encoder import MediaEncoder
from vision_svc.pool import PoolBrokenError, PoolBusyError, PreprocessPool
from vision_svc.processing import MediaProcessor, MediaTooLargeError, ProcessedMedia


class ExplodingModel:
    def encode_media(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        raise RuntimeError("secret internal detail")


class InlinePool:
    """Preprocesses in the calling thread; `error` makes every call fail with it."""

    def __init__(self, processor: MediaProcessor, error: Exception | None = None) -> None:
        self.processor, self.error = processor, error

    async def process(
        self, kind: str, data: bytes, overrides: Mapping[str, Any] | None = None
    ) -> ProcessedMedia:
        if self.error is not None:
            raise self.error
        return self.processor.process(kind, data, overrides)

    def shutdown(self, wait: bool = True) -> None:
        pass


def fake_encoder(pool_error: Exception | None = None) -> MediaEncoder:
    processor = MediaProcessor()
    pool = InlinePool(processor, pool_error)
    return MediaEncoder(ExplodingModel(), processor, EmbeddingCache(1 << 20), pool)  # type: ignore[arg-type]


def status_of(encoder: MediaEncoder) -> grpc.RpcError:
    with running(encoder) as (_, channel), pytest.raises(grpc.RpcError) as err:
        encode(channel, image_item(noise_png(56, 56)))
    return err.value


def test_internal_failure_is_internal_without_details() -> None:
    err = status_of(fake_encoder())
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error"


def test_pool_busy_is_unavailable() -> None:
    err = status_of(fake_encoder(PoolBusyError("12 media items in flight; retry later")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in err.details()


def test_oversized_media_is_invalid_argument() -> None:
    err = status_of(fake_encoder(MediaTooLargeError("image is 9000x9000, above the cap")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "above the cap" in err.details()


def test_pool_bounds_work_in_flight_and_refuses_after_shutdown() -> None:
    pool = PreprocessPool(MediaProcessor(), num_workers=1, max_pending=1)
    data = noise_png(56, 56)

    async def two_at_once() -> list[Any]:
        return await asyncio.gather(
            pool.process("image", data), pool.process("image", data), return_exceptions=True
        )

    try:
        assert not pool.started  # spawned lazily
        first, second = asyncio.run(two_at_once())
        assert isinstance(first, ProcessedMedia) and first.grid_thw == (1, 4, 4)
        assert isinstance(second, PoolBusyError)
        assert pool.num_pending == 0 and pool.started
    finally:
        pool.shutdown()
    with pytest.raises(PoolBrokenError, match="shut down"):
        asyncio.run(pool.process("image", data))


def test_pool_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        PreprocessPool(MediaProcessor(), num_workers=0)
    with pytest.raises(ValueError, match="max_pending"):
        PreprocessPool(MediaProcessor(), max_pending=0)


_ORPHAN_PARENT = """
import asyncio, os, sys, time
from tests.vision_svc.service_helpers import noise_png
from vision_svc.pool import PreprocessPool
from vision_svc.processing import MediaProcessor

pool = PreprocessPool(MediaProcessor(), num_workers=1)
asyncio.run(pool.process("image", noise_png(56, 56)))
print(" ".join(str(p) for p in pool._executor._processes), flush=True)
time.sleep(600)
"""


def test_pool_workers_exit_when_the_service_is_killed() -> None:
    """A SIGKILLed service (no shutdown runs) leaves no preprocessing worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_PARENT], stdout=subprocess.PIPE, text=True, env=env, cwd=root
    )
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 1 and all(Path(f"/proc/{p}").exists() for p in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), "preprocessing workers outlived the service"
