"""Engine role `prefill`: compute a prompt, stream its KV to decode, hand over the first token.

A prefill request is an ordinary engine request capped at one output token: it gets the
prefix cache, chunked prefill and continuous batching for free. What the role adds is the
KV hand-off. In the step that computes a request's last prompt chunk the role registers it
with the `KVSender` (its whole block table is known from then on) and, after each layer,
queues that layer's blocks decode lacks (`send_layer`); earlier chunks' KV is already in
the cache, so it leaves with the same layer. Then the first token is sampled and sent with
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
from engine.request import RequestOutput
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
    result: PrefillResult | None = None


class PrefillRole:
    def __init__(self, engine: LLMEngine, sender: KVSender) -> None:
        self.engine = engine
        self.sender = sender
        self._jobs: dict[str, _Job] = {}
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
        for out in self.engine.step(self._after_layer):
            self._hand_over(out)
        return True

    def fail_all(self, exc: Exception) -> None:
        for request_id, job in list(self._jobs.items()):
            self.abort(request_id)
            job.sink.put(exc)

    # -- internals ------------------------------------------------------------------------

    def _after_layer(self, plan: ScheduledStep, layer: int) -> None:
        for req, n in zip(plan.requests, plan.num_tokens, strict=True):
            job = self._jobs.get(req.request_id)
            if job is None or req.num_computed_tokens + n < req.num_prompt_tokens:
                continue  # not the last prompt chunk yet: its KV leaves with the last one
            if not job.begun:
                src = self.engine.kv.block_ids(req.request_id)
                self.sender.begin(req.request_id, job.reservation, src)
                job.begun = True
            self.sender.send_layer(req.request_id, layer)

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
        return {
            "num_used_blocks": self.engine.num_used_blocks,
            "num_free_blocks": self.engine.kv.num_free_blocks,
            "num_requests": len(self._jobs),
            "kv_bytes": int(self.sender.bytes_sent),
            "num_transfer_failures": int(self.sender.num_failures),
        }
