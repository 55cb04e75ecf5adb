"""Engine role `prefill`: compute a prompt, stream its KV to decode, hand over the first token.

A prefill request is an ordinary engine request capped at one output token: it gets the
prefix cache, chunked prefill and continuous batching for free. What the role adds is the
KV hand-off, layer by layer and chunk by chunk: in each step that computes a chunk of a
request's prompt, the role gives the `KVSender` the request's block table so far (`begin`,
then `extend`) and, after each layer, queues that layer's blocks the chunk completed
(`send_layer`; the first chunk also carries the blocks prefill's prefix cache supplied, the
last one the partial tail block; blocks decode holds are skipped by the sender). Transfer
thus overlaps the remaining chunks' compute. Then the first token is sampled and sent with
`finish`; the engine frees the request's blocks in the same step (the sender staged every
block it needs). The caller's answer waits for the sender's DONE (every frame on the wire)
or fails on FAILED / the deadline; any failure aborts the request on this side and tells
decode (`KVSender.abort`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.kv_transfer.base import KVReservation, KVSender, TransferError
from engine.llm_engine import LLMEngine, RequestError
from engine.model_runner import ModelRunner
from engine.multimodal import MediaInput
from engine.request import Request, RequestOutput
from engine.roles.errors import TransferFailedError, TransferTimeoutError
from engine.roles.loop import Sink
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledStep


@dataclass(frozen=True)
class PrefillResult:
    first_token_id: int
    num_cached_tokens: int
    """Prompt tokens prefill took from its own prefix cache."""
    logprobs: list[dict[int, float]] | None
    kv_bytes_sent: int


@dataclass
class _Job:
    reservation: KVReservation
    sink: Sink
    deadline: float
    begun: bool = False
    num_sent_blocks: int = 0
    """Leading prompt blocks whose layers are queued (or that decode holds)."""
    chunk: range = range(0)
    """Prompt block positions the current step sends after each layer."""
    result: PrefillResult | None = None


class PrefillRole:
    def __init__(self, engine: LLMEngine, sender: KVSender) -> None:
        self.engine = engine
        self.sender = sender
        self._jobs: dict[str, _Job] = {}
        self.num_transfers_done = 0
        self._bytes_per_block = ModelRunner.kv_bytes_per_block(
            engine.model_config, engine.args.block_size, engine.dtype
        )

    # -- commands (engine thread) ---------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        media: list[MediaInput],
        cache_salt: str | None,
        reservation: KVReservation,
        sink: Sink,
        timeout_s: float,
    ) -> None:
        """Queue a prompt; `sink` gets a `PrefillResult` or an exception."""
        if request_id in self._jobs:
            raise RequestError(f"request id {request_id!r} is already in use")
        block_size = self.engine.args.block_size
        if reservation.block_size != block_size:
            raise RequestError(
                f"decode uses {reservation.block_size}-token KV blocks, this prefill "
                f"{block_size}: start both with the same block size"
            )
        num_blocks = -(-len(prompt_token_ids) // block_size)
        if len(reservation.block_ids) != num_blocks:
            raise RequestError(
                f"the reservation has {len(reservation.block_ids)} blocks, the prompt "
                f"needs {num_blocks}"
            )
        req = self.engine.make_request(request_id, prompt_token_ids, params, media, cache_salt)
        req.max_tokens = 1  # decode generates the rest
        self.engine.enqueue(req)
        self._jobs[request_id] = _Job(reservation, sink, time.monotonic() + timeout_s)

    def abort(self, request_id: str) -> None:
        """Free the request here and tell decode (idempotent)."""
        if self._jobs.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            self.sender.abort(request_id)

    # -- Role protocol --------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def has_pending(self) -> bool:
        return bool(self._jobs)

    def poll(self) -> None:
        for event in self.sender.poll():
            job = self._jobs.pop(event.request_id, None)
            if job is None:
                continue
            if event.ok and job.result is not None:
                self.num_transfers_done += 1
                job.sink.put(job.result)
                continue
            self.engine.abort(event.request_id)
            error = event.error.value if event.error else "unknown"
            if event.error is TransferError.TIMEOUT:
                job.sink.put(
                    TransferTimeoutError(f"KV transfer to decode timed out: {event.detail}")
                )
            else:
                job.sink.put(
                    TransferFailedError(f"KV transfer to decode failed ({error}): {event.detail}")
                )
        now = time.monotonic()
        for request_id, job in list(self._jobs.items()):
            if now > job.deadline:
                self.abort(request_id)
                job.sink.put(TransferTimeoutError("prefill did not complete within its deadline"))

    def step(self) -> bool:
        if not self.engine.has_unfinished_requests():
            return False
        for out in self.engine.step(self._after_layer, self._before_run):
            self._hand_over(out)
        return True

    def fail_all(self, exc: Exception) -> None:
        for request_id, job in list(self._jobs.items()):
            self.abort(request_id)
            job.sink.put(exc)

    # -- internals ------------------------------------------------------------------------

    def _before_run(self, plan: ScheduledStep) -> list[int]:
        """Each job's chunk of blocks for this step; the source blocks every layer sends."""
        blocks: list[int] = []
        for req, n in zip(plan.requests, plan.num_tokens, strict=True):
            job = self._jobs.get(req.request_id)
            if job is None:
                continue
            job.chunk = self._next_chunk(req, job, req.num_computed_tokens + n)
            if job.chunk:
                blocks += self.sender.source_blocks(req.request_id, job.chunk)
        return blocks

    def _after_layer(self, plan: ScheduledStep, layer: int) -> None:
        for req in plan.requests:
            job = self._jobs.get(req.request_id)
            if job is not None and job.chunk:
                self.sender.send_layer(req.request_id, layer, job.chunk)

    def _next_chunk(self, req: Request, job: _Job, end: int) -> range:
        """The blocks complete once this step computed the prompt up to token `end` (the
        partial tail block too on the last chunk), less those already sent; the sender
        gets the block table that covers them."""
        if end >= req.num_prompt_tokens:
            upto = len(job.reservation.block_ids)
        else:
            upto = end // self.engine.args.block_size
        src = self.engine.kv.block_ids(req.request_id)[:upto]
        if job.begun:
            self.sender.extend(req.request_id, src)
        else:
            self.sender.begin(req.request_id, job.reservation, src)
            job.begun = True
        chunk = range(job.num_sent_blocks, upto)
        job.num_sent_blocks = max(job.num_sent_blocks, upto)
        return chunk

    def _hand_over(self, out: RequestOutput) -> None:
        job = self._jobs.get(out.request_id)
        if job is None or not out.new_token_ids:
            return
        token = out.new_token_ids[0]
        logprobs = out.new_logprobs
        extra = {
            "num_cached_tokens": out.num_cached_tokens,
            "logprobs": [[[k, v] for k, v in d.items()] for d in logprobs] if logprobs else None,
        }
        self.sender.finish(out.request_id, token, extra)
        job.result = PrefillResult(
            first_token_id=token,
            num_cached_tokens=out.num_cached_tokens,
            logprobs=logprobs,
            kv_bytes_sent=job.reservation.num_blocks_to_send * self._bytes_per_block,
        )

    def stats(self) -> dict[str, int]:
        """pb `EngineStats` fields: what this role holds now, and its counters."""
        engine = self.engine
        return {
            "num_used_blocks": engine.num_used_blocks,
            "num_free_blocks": engine.kv.num_free_blocks,
            "num_requests": len(self._jobs),
            "num_requests_running": len(engine.scheduler.running),
            "num_requests_waiting": len(engine.scheduler.waiting),
            "num_prefix_cache_queries": engine.kv.prefix_cache_queries,
            "num_prefix_cache_hits": engine.kv.prefix_cache_hits,
            "max_num_seqs": engine.args.max_num_seqs,
            "kv_bytes": int(self.sender.bytes_sent),
            "num_transfers_done": self.num_transfers_done,
            "num_transfer_failures": int(self.sender.num_failures),
        }
