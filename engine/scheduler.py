"""Continuous batching over the paged KV cache.

Each step spends a token budget: running requests first (one token for those decoding,
the next chunk for those still in prefill), then waiting requests in arrival order. When
the pool runs out of blocks, the most recently admitted running request is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later (its
generated tokens are kept and become part of the recomputed prefix).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Requests in one step at most."""
    max_num_batched_tokens: int = 2048
    """Tokens (prefill chunks + decode tokens) in one step at most."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps; off = a prompt must fit the budget whole."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledStep:
    """The requests of one step and how many new tokens each computes."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Admit a request whose blocks are allocated and prompt KV computed elsewhere
        (disaggregated decode): it decodes from the next step on."""
        self.running.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(step, budget)
        if not step.preempted:
            self._schedule_waiting(step, budget)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if n <= 0:  # its last token is being computed (async scheduling): nothing to add
                i += 1
                continue
            if self.kv.allocate_slots(req, n) is not None:
                step.requests.append(req)
                step.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            victim = self.running.pop()  # newest admitted goes back to the queue
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is req:
                break
        return budget

    def _schedule_waiting(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            blocks, num_cached = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill and self.running:
                    break
                n = budget
            if self.kv.allocate_slots(req, n, blocks) is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached  # usage reports the first admission
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            step.requests.append(req)
            step.num_tokens.append(n)
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted): it leaves the queues, blocks freed."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req.request_id)
