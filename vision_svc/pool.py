"""`PreprocessPool`: media decoding and preprocessing off the event loop, in worker processes.

Decoding a JPEG or sampling a video is CPU-bound Python/numpy that holds the GIL for long
stretches, so it runs in a `ProcessPoolExecutor` over the picklable `MediaProcessor`.
Workers are *spawned* (never forked: the parent has torch and gRPC threads) and only on the
first miss, so a service that answers from its cache never starts them. Work in flight is
bounded: beyond `max_pending` items a call fails at once with `PoolBusyError` (UNAVAILABLE,
retriable) instead of queueing without limit. A worker that dies (e.g. killed for memory)
breaks the executor; the pool then replaces it for the next call. A worker exits by itself
once the service's process is gone (killed, say), so none is left orphaned.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from engine.orphans import exit_when_orphaned
from vision_svc.processing import MediaProcessor, ProcessedMedia

log = logging.getLogger("tandem.vision.pool")


class PoolBusyError(RuntimeError):
    """More media in flight than the pool accepts; retry later."""


class PoolBrokenError(RuntimeError):
    """A worker process died while preprocessing (the pool restarts for the next call)."""


class PreprocessPool:
    """Runs `MediaProcessor.process` in up to `num_workers` spawned processes."""

    def __init__(
        self, processor: MediaProcessor, num_workers: int = 2, max_pending: int = 64
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.processor = processor
        self.num_workers = num_workers
        self.max_pending = max_pending
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._num_pending = 0
        self._closed = False

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def started(self) -> bool:
        return self._executor is not None

    async def process(
        self, kind: str, data: bytes, overrides: Mapping[str, Any] | None = None
    ) -> ProcessedMedia:
        """Decode and preprocess one item in a worker; raises the worker's `MediaError`."""
        with self._lock:
            if self._num_pending >= self.max_pending:
                raise PoolBusyError(
                    f"{self._num_pending} media items are already being preprocessed "
                    f"(limit {self.max_pending}); retry later"
                )
            self._num_pending += 1
        try:
            executor = self._ensure_executor()
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(
                executor, self.processor.process, kind, data, dict(overrides or {})
            )
            return await call
        except BrokenProcessPool as e:
            self._discard(executor)
            raise PoolBrokenError("a preprocessing worker died; the pool was restarted") from e
        finally:
            with self._lock:
                self._num_pending -= 1

    def _ensure_executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise PoolBrokenError("the preprocessing pool is shut down")
            if self._executor is None:
                log.info("starting %d preprocessing worker process(es)", self.num_workers)
                self._executor = ProcessPoolExecutor(
                    self.num_workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=exit_when_orphaned,  # a killed service leaves no workers
                    initargs=(os.getpid(),),
                )
            return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the workers (queued work is cancelled); later calls fail."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)
