"""Engine role `decode`: reserve KV blocks, receive the prompt's KV, generate the rest.

`reserve` comes first, before any prefill work: the request's blocks for the whole prompt
are taken at once (query/commit through `KVCacheManager`, so a full pool refuses at once
and changes nothing; so does a decode already holding `max_num_seqs` requests, reserved
ones included), decode's own prefix-cache hits are counted (`num_cached_blocks`:
prefill sends only the rest), and the `KVReceiver` gets a one-time reservation with a
deadline. When the receiver reports DONE (every lacking block of every layer plus the
first token), the prompt's blocks join the prefix cache and the request joins the running
batch with `num_computed_tokens = prompt length`, and the transfer's duration
(reservation handed out → DONE) waits in `pop_kv_transfer_s` for the caller. A FAILED
transfer, a deadline or an abort frees the blocks; the caller's stream ends with the error.

Prompts arrive already expanded; media need no pixels here (the KV is computed by
prefill), only their grids for the 3-D positions of generated tokens. A request that the
scheduler preempts is recomputed locally, which needs media embeddings decode does not
have: such a request fails instead of producing wrong text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.kv_transfer.base import (
    KVReceiver,
    KVReservation,
    TransferError,
    TransferEvent,
    new_transfer_token,
)
from engine.llm_engine import LLMEngine, RequestError
from engine.multimodal import MediaInput, PreparedPrompt, layout_prompt
from engine.request import Request, RequestOutput
from engine.roles.errors import NoCapacityError, TransferFailedError, TransferTimeoutError
from engine.roles.loop import Sink
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class MediaLayout:
    """What decode needs to know of one image/video: its kind, grid and content hash."""

    kind: str
    grid: tuple[int, int, int]
    content_hash: str


class DecodeRole:
    def __init__(self, engine: LLMEngine, receiver: KVReceiver) -> None:
        self.engine = engine
        self.receiver = receiver
        self._waiting: dict[str, Request] = {}  # reserved, KV not complete yet
        self._sinks: dict[str, Sink] = {}  # every open request
        self._reserved_at: dict[str, float] = {}  # waiting requests: perf_counter at reserve
        self._kv_transfer_s: dict[str, float] = {}  # joined, not yet taken by the caller
        self.num_failed_transfers = 0

    # -- commands (engine thread) ---------------------------------------------------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        media: list[MediaLayout],
        cache_salt: str | None,
        sink: Sink,
        timeout_s: float,
    ) -> KVReservation:
        """Take blocks for the whole prompt; `sink` then gets `RequestOutput`s or an error."""
        engine = self.engine
        if request_id in self._sinks or request_id in engine.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if self.num_requests >= engine.args.max_num_seqs:
            raise NoCapacityError(
                f"decode holds {self.num_requests} requests (max_num_seqs "
                f"{engine.args.max_num_seqs})"
            )
        inputs = [
            MediaInput(m.kind, torch.empty(0), m.grid, content_hash=m.content_hash) for m in media
        ]
        prompt = self._layout(prompt_token_ids, inputs)
        req = engine.make_request(
            request_id, prompt_token_ids, params, inputs, cache_salt, prompt=prompt
        )
        blocks, num_cached = engine.kv.get_computed_blocks(req)
        if engine.kv.allocate_slots(req, req.num_prompt_tokens - num_cached, blocks) is None:
            engine.kv.free(request_id)  # drops the memoised hashes of the lookup
            raise NoCapacityError(
                f"no KV blocks for a {req.num_prompt_tokens}-token prompt "
                f"({engine.kv.num_free_blocks} free)"
            )
        try:
            reservation = self.receiver.expect(
                request_id,
                new_transfer_token(),
                engine.kv.block_ids(request_id),
                num_cached // engine.args.block_size,
                timeout_s,
            )
        except BaseException:
            engine.kv.free(request_id)
            raise
        self._waiting[request_id] = req
        self._sinks[request_id] = sink
        self._reserved_at[request_id] = time.perf_counter()
        return reservation

    def abort(self, request_id: str) -> None:
        """Free the request wherever it is (idempotent)."""
        self._sinks.pop(request_id, None)
        self._reserved_at.pop(request_id, None)
        self._kv_transfer_s.pop(request_id, None)
        req = self._waiting.pop(request_id, None)
        if req is not None:
            self.receiver.abort(request_id)
            self.engine.kv.free(request_id)
        else:
            self.engine.abort(request_id)

    def pop_kv_transfer_s(self, request_id: str) -> float | None:
        """Seconds from the request's reservation to its KV transfer's DONE, once (None:
        not joined yet, or already taken). Safe from the caller's thread once the request's
        first output came through its sink: the value is stored before that output is put,
        and a single dict pop is atomic."""
        return self._kv_transfer_s.pop(request_id, None)

    def stop(self, request_id: str) -> None:
        """Finish as stopped (a stop string matched on the text side)."""
        self._sinks.pop(request_id, None)
        self.engine.stop_request(request_id)

    # -- Role protocol --------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def has_pending(self) -> bool:
        return bool(self._waiting)

    def poll(self) -> None:
        for event in self.receiver.poll():
            req = self._waiting.pop(event.request_id, None)
            reserved_at = self._reserved_at.pop(event.request_id, None)
            if req is None:
                continue
            if event.ok:
                self._join(req, event, reserved_at)
            else:
                self._fail_transfer(req, event)

    def step(self) -> bool:
        if not self.engine.has_unfinished_requests():
            return False
        outputs = self.engine.step()
        for req in self.engine.last_preempted:
            if req.media:
                self._fail(
                    req.request_id,
                    TransferFailedError(
                        "decode ran out of KV blocks and cannot recompute a prompt with media"
                    ),
                )
        for out in outputs:
            self._deliver(out)
        return True

    def fail_all(self, exc: Exception) -> None:
        for request_id in list(self._sinks):
            self._fail(request_id, exc)

    @property
    def num_requests(self) -> int:
        """Requests counting toward `max_num_seqs`: reserved (KV on its way), running, and
        preempted ones waiting to be recomputed."""
        return len(self._waiting) + self.engine.scheduler.num_unfinished

    def stats(self) -> dict[str, int]:
        """pb `EngineStats` fields: what this role holds now, and its counters."""
        engine, receiver = self.engine, self.receiver
        return {
            "num_used_blocks": engine.num_used_blocks,
            "num_free_blocks": engine.kv.num_free_blocks,
            "num_requests": len(self._sinks),
            "num_requests_running": len(engine.scheduler.running),
            "num_requests_waiting": len(self._waiting) + len(engine.scheduler.waiting),
            "num_prefix_cache_queries": engine.kv.prefix_cache_queries,
            "num_prefix_cache_hits": engine.kv.prefix_cache_hits,
            "max_num_seqs": engine.args.max_num_seqs,
            "kv_bytes": int(receiver.bytes_received),
            "num_frames_rejected": int(receiver.num_frames_rejected),
            "num_transfers_done": int(receiver.num_transfers_done),
            "num_transfer_failures": int(receiver.num_transfers_failed),
        }

    # -- internals ------------------------------------------------------------------------

    def _layout(self, token_ids: list[int], media: list[MediaInput]) -> PreparedPrompt:
        """Positions and vision rows of the prompt, without running the vision tower."""
        return layout_prompt(self.engine.model_config, token_ids, media)

    def _join(self, req: Request, event: TransferEvent, reserved_at: float | None) -> None:
        engine = self.engine
        if event.first_token_id is None:
            self._fail_transfer(req, event)
            return
        if reserved_at is not None and req.request_id in self._sinks:
            self._kv_transfer_s[req.request_id] = time.perf_counter() - reserved_at
        engine.kv.cache_blocks(req, req.num_prompt_tokens)
        req.num_cached_tokens = int(event.extra.get("num_cached_tokens") or 0)
        raw = event.extra.get("logprobs")
        logprobs = [{int(k): float(v) for k, v in d} for d in raw] if raw else None
        self._deliver(engine.join_running(req, event.first_token_id, logprobs))

    def _fail_transfer(self, req: Request, event: TransferEvent) -> None:
        self.num_failed_transfers += 1
        self.engine.kv.free(req.request_id)
        what = event.error.value if event.error else "no first token"
        if event.error is TransferError.TIMEOUT:
            exc: Exception = TransferTimeoutError(f"prefill's KV did not arrive in time ({what})")
        else:
            exc = TransferFailedError(f"KV transfer from prefill failed ({what}): {event.detail}")
        sink = self._sinks.pop(req.request_id, None)
        if sink is not None:
            sink.put(exc)

    def _fail(self, request_id: str, exc: Exception) -> None:
        sink = self._sinks.get(request_id)
        self.abort(request_id)
        if sink is not None:
            sink.put(exc)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        sink.put(out)
