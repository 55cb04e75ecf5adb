"""One thread per process drives a synchronous engine role; asyncio talks to it by message.

The role (`PrefillRole`, `DecodeRole`) is single-threaded. `EngineLoop` owns the thread:
between steps it runs the closures the event loop posted (`submit` / `call`), then lets
the role `poll()` its transport and `step()` its model. Results travel back as
`loop.call_soon_threadsafe` callbacks (`Sink`), so asyncio objects are only touched on the
event loop. An exception escaping the role kills the loop on purpose: `failure` is set,
every open sink gets `EngineStoppedError`, and the process reports NOT_SERVING and exits
non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from engine.roles.errors import EngineStoppedError

log = logging.getLogger("tandem.engine_loop")

T = TypeVar("T")
_IDLE_WAIT_S = 0.2  # nothing to do: how long to sleep on the inbox
_BUSY_WAIT_S = 0.002  # transfers pending but no model work: poll this often


class Role(Protocol):
    def poll(self) -> None:
        """Advance transfers and timeouts (never blocks)."""

    def step(self) -> bool:
        """Run one model step if there is work; False when there was none."""

    def has_work(self) -> bool:
        """Requests the model must step."""

    def has_pending(self) -> bool:
        """Work that needs polling soon even without model steps (transfers in flight)."""

    def fail_all(self, exc: Exception) -> None:
        """Fail every open request with `exc` (the loop is ending)."""


@dataclass
class Sink:
    """Engine thread → event loop channel for one request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self, timeout_s: float | None = None) -> Any:
        """The next item; an exception item is raised."""
        item = await asyncio.wait_for(self.queue.get(), timeout_s)
        if isinstance(item, BaseException):
            raise item
        return item


class EngineLoop:
    def __init__(self, role: Role, name: str = "tandem-engine") -> None:
        self.role = role
        self.failure: BaseException | None = None
        self._stopped = False
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout_s)

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread before its next step (fire and forget)."""
        self._inbox.put(fn)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread and await its result (or exception)."""
        if not self.is_alive:
            raise EngineStoppedError("the engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def run() -> None:
            value: Any
            try:
                if self._stopped:
                    raise EngineStoppedError("the engine stopped")
                result = fn()
            except Exception as exc:
                ok, value = False, exc
            else:
                ok, value = True, result
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, ok, value)

        self._inbox.put(run)
        return await future

    def _run(self) -> None:
        try:
            while self._drain(self._wait_s()):
                self.role.poll()
                self.role.step()
        except BaseException as exc:
            log.exception("the engine thread failed")
            self.failure = exc
        self._stopped = True
        stopped = EngineStoppedError("the engine stopped")
        with contextlib.suppress(Exception):
            self.role.fail_all(stopped)
        self._refuse_rest()

    def _wait_s(self) -> float:
        if self.role.has_work():
            return 0.0
        if self.role.has_pending():
            return _BUSY_WAIT_S
        return _IDLE_WAIT_S

    def _drain(self, wait_s: float) -> bool:
        """Run queued closures (waiting up to `wait_s` for the first); False on stop."""
        try:
            fn = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if fn is None:
                return False
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _refuse_rest(self) -> None:
        """Closures posted after the stop still run (and refuse), so every `call` gets an
        answer."""
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fn is not None:
                with contextlib.suppress(Exception):
                    fn()
