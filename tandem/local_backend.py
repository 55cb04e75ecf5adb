"""`LocalBackend`: the gateway's `Backend` with the engine in this process.

The engine is synchronous and single-threaded, so it gets one thread of its own that loops
`step()` while any request is unfinished and sleeps on its inbox otherwise. The event loop
and that thread share nothing but two channels:

* inbox (`queue.SimpleQueue`, loop → engine): add, abort and stop commands, applied in order
  between steps;
* each request's `asyncio.Queue` (engine → loop), filled through
  `loop.call_soon_threadsafe`, so the queue is only ever touched on the loop.

A request's stream cleans up without awaiting (it only posts an abort), so cancellation by
a dropped client cannot skip it.

For /metrics the engine thread also publishes a `BackendStats` snapshot after every loop
turn (one reference assignment, so `stats()` never reads the engine mid-step), and times
each request: queued (from `generate`) until its first step, prefill until its first
token, decode until its last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from engine.llm_engine import EngineArgs, LLMEngine
from engine.multimodal import MediaInput
from engine.request import RequestOutput, RequestStatus
from engine.sampling_params import SamplingParams
from gateway.backend import (
    BackendStats,
    EncodedMedia,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    MediaItem,
    RequestTimings,
)
from gateway.errors import BackendUnavailableError, InvalidRequestError, OverloadedError
from vision_svc.processing import MediaConfig, MediaError, MediaProcessor

log = logging.getLogger("tandem.local_backend")
_IDLE_POLL_S = 0.5  # how often an idle engine thread looks for a stop


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerateDelta | Exception]
    arrived: float
    """`time.monotonic()` at `generate`; the times below are set by the engine thread."""
    scheduled: float | None = None
    first_token: float | None = None

    def put(self, item: GenerateDelta | Exception) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    media: list[MediaInput]
    sink: _Sink


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class LocalBackend:
    """Runs an `LLMEngine` on one background thread behind the `Backend` protocol."""

    def __init__(
        self,
        engine: LLMEngine,
        media_processor: MediaProcessor,
        *,
        model_name: str,
        max_queue_size: int = 256,
    ) -> None:
        """`max_queue_size`: requests allowed to wait beyond `max_num_seqs` before new ones
        get 503."""
        self.engine = engine
        self.media_processor = media_processor
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.capacity = engine.args.max_num_seqs + max_queue_size
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._unscheduled: dict[str, _Sink] = {}  # engine thread only: not stepped yet
        self._num_active = 0  # event loop only
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._stats = self._snapshot()

    @classmethod
    def create(
        cls,
        args: EngineArgs,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
        *,
        max_queue_size: int = 256,
    ) -> LocalBackend:
        """Load the model and start the engine thread."""
        media = MediaProcessor(MediaConfig.from_mm_processor_kwargs(mm_processor_kwargs))
        engine = LLMEngine(args)
        backend = cls(engine, media, model_name=args.model, max_queue_size=max_queue_size)
        backend.start()
        return backend

    @property
    def num_active_requests(self) -> int:
        return self._num_active

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; requests still running end with a 503 error."""
        if self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.engine.shutdown()  # tensor-parallel workers, if any

    # -- Backend protocol -----------------------------------------------------------------

    async def check_health(self) -> bool:
        return self._thread.is_alive() and self._failure is None

    def stats(self) -> BackendStats:
        """The engine's state as of the engine thread's last loop turn (role `both`)."""
        return self._stats

    async def encode_media(self, item: MediaItem) -> EncodedMedia:
        try:
            processed = await asyncio.to_thread(
                self.media_processor.process, item.kind, item.data, dict(item.overrides) or None
            )
        except MediaError as exc:
            raise InvalidRequestError(f"cannot use this {item.kind}: {exc}") from exc
        payload = MediaInput(
            kind=processed.kind,
            pixel_values=torch.from_numpy(processed.pixel_values),
            grid=processed.grid_thw,
            content_hash=processed.content_hash,
        )
        return EncodedMedia(
            processed.kind,
            processed.grid_thw,
            processed.num_tokens,
            processed.content_hash,
            payload,
        )

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[GenerateDelta, None]:
        if not await self.check_health():
            raise BackendUnavailableError("the engine is not running")
        if self._num_active >= self.capacity:
            raise OverloadedError(f"the server is at capacity ({self.capacity} requests)")
        try:
            params = SamplingParams(n=1, **asdict(req.sampling))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        media = [m.payload for m in req.media]
        self._num_active += 1
        self._inbox.put(_Add(req.request_id, list(req.prompt_token_ids), params, media, sink))
        done = False
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            # No await here: this must run even while the task is being cancelled.
            self._num_active -= 1
            if not done:
                self._inbox.put(_Abort(req.request_id))

    # -- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    step_start = time.monotonic()
                    outputs = self.engine.step()
                    self._mark_scheduled(step_start)
                    for output in outputs:
                        self._deliver(output)
                self._stats = self._snapshot()
        except BaseException as exc:  # a bug or a device failure: fail loudly, not silently
            log.exception("the engine thread failed")
            self._failure = exc
        self._fail_all(BackendUnavailableError("the engine stopped"))

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        try:
            command = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            self._apply(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._unscheduled.pop(command.request_id, None)
            if self._sinks.pop(command.request_id, None) is not None:
                self.engine.abort(command.request_id)
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, command.media
            )
        except ValueError as exc:
            command.sink.put(InvalidRequestError(str(exc)))
            return
        except Exception as exc:  # one bad request must not take the engine thread down
            log.exception("add_request failed for %s", command.request_id)
            command.sink.put(exc)
            return
        self._sinks[command.request_id] = command.sink
        self._unscheduled[command.request_id] = command.sink

    def _mark_scheduled(self, step_start: float) -> None:
        """Requests that left the waiting queue in the step that began at `step_start`."""
        for request_id, sink in list(self._unscheduled.items()):
            req = self.engine.requests.get(request_id)
            if req is None or req.status != RequestStatus.WAITING:
                sink.scheduled = step_start
                del self._unscheduled[request_id]

    def _timings(self, sink: _Sink, finished: bool) -> RequestTimings | None:
        now = time.monotonic()
        first = sink.first_token is None
        if first:
            sink.first_token = now
        if not (first or finished) or sink.scheduled is None:
            return None
        assert sink.first_token is not None
        return RequestTimings(
            queue_s=sink.scheduled - sink.arrived if first else None,
            prefill_s=sink.first_token - sink.scheduled if first else None,
            decode_s=now - sink.first_token if finished else None,
        )

    def _snapshot(self) -> BackendStats:
        kv = self.engine.kv
        scheduler = self.engine.scheduler
        engine = EngineStats(
            role="both",
            num_requests_running=len(scheduler.running),
            num_requests_waiting=len(scheduler.waiting),
            num_kv_blocks_used=kv.num_used_blocks,
            num_kv_blocks_total=kv.pool.num_total_blocks,
            num_prefix_cache_queries=kv.prefix_cache_queries,
            num_prefix_cache_hits=kv.prefix_cache_hits,
        )
        return BackendStats(engines=(engine,), num_kv_transfer_failures=0)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished or out.error:
            del self._sinks[out.request_id]
            self._unscheduled.pop(out.request_id, None)
        if out.error:
            sink.put(BackendUnavailableError(out.error))
            return
        sink.put(
            GenerateDelta(
                token_ids=list(out.new_token_ids),
                logprobs=out.new_logprobs,
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens,
                num_output_tokens=out.num_output_tokens,
                timings=self._timings(sink, out.finished),
            )
        )

    def _fail_all(self, exc: Exception) -> None:
        for sink in self._sinks.values():
            sink.put(exc)
        self._sinks.clear()
        self._unscheduled.clear()
        while True:  # requests sent after the stop still get an answer
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.sink.put(exc)

    def num_engine_requests(self) -> int:
        """Unfinished requests inside the engine (for tests and debugging; racy by nature)."""
        return self.engine.scheduler.num_unfinished
