"""The engine roles over the in-process transport: chunked prefill streams its KV chunk by
chunk, and decode honours `max_num_seqs` at reservation time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from engine.kv_transfer import FakeTransport
from engine.llm_engine import EngineArgs, LLMEngine
from engine.model_runner import ModelRunner
from engine.roles.decode import DecodeRole
from engine.roles.errors import NoCapacityError
from engine.roles.prefill import PrefillResult, PrefillRole
from engine.sampling_params import SamplingParams

BUDGET = 32  # prefill's tokens per step: a 150-token prompt takes 5 chunks
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@dataclass
class ListSink:
    """Stands in for `engine.roles.loop.Sink` (no event loop: the test is the engine thread)."""

    items: list[Any] = field(default_factory=list)

    def put(self, item: Any) -> None:
        self.items.append(item)


@dataclass
class Roles:
    prefill: PrefillRole
    decode: DecodeRole


@pytest.fixture(scope="module")
def roles() -> Iterator[Roles]:
    transport = FakeTransport()
    p = LLMEngine(EngineArgs(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=BUDGET))
    d = LLMEngine(EngineArgs(max_model_len=1024, max_num_seqs=2))
    rx = transport.receiver(d.runner.kv_caches, "kv")
    tx = transport.sender(p.runner.kv_caches)
    yield Roles(PrefillRole(p, tx), DecodeRole(d, rx))
    tx.close()
    rx.close()


def prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(300, 2000, n)]


def test_chunked_prefill_sends_kv_during_each_chunk(roles: Roles) -> None:
    p, d = roles.prefill, roles.decode
    ids = prompt(150, seed=1)
    psink, dsink = ListSink(), ListSink()
    res = d.reserve("c1", ids, GREEDY, [], None, dsink, 30.0)
    p.add("c1", ids, GREEDY, [], None, res, psink, 30.0)
    received = [d.receiver.bytes_received]
    while not psink.items:
        assert p.step()
        received.append(d.receiver.bytes_received)  # the fake transport delivers at once
        p.poll()
    block_bytes = ModelRunner.kv_bytes_per_block(
        p.engine.model_config, p.engine.args.block_size, p.engine.dtype
    )
    # 5 chunks of up to 32 tokens: each one's 2 blocks leave with that chunk, layer by layer
    assert np.diff(received).tolist() == [2 * block_bytes] * 5
    [result] = psink.items
    assert isinstance(result, PrefillResult) and result.kv_bytes_sent == 10 * block_bytes

    d.poll()  # DONE: the request joins decode's running batch
    while d.step():
        pass
    tokens = [t for out in dsink.items for t in out.new_token_ids]
    assert dsink.items[-1].finished and len(tokens) == 6
    d.engine.add_request("ref", ids, GREEDY, cache_salt="ref")  # salted: no prefix-cache hits
    want: list[int] = []
    while d.engine.has_unfinished_requests():
        want += [t for out in d.engine.step() for t in out.new_token_ids]
    assert tokens == want
    assert p.engine.num_used_blocks == 0 and d.engine.num_used_blocks == 0


def test_decode_refuses_past_max_num_seqs(roles: Roles) -> None:
    d = roles.decode
    used = d.engine.num_used_blocks
    for i in range(2):
        d.reserve(f"m{i}", prompt(20, seed=i), GREEDY, [], None, ListSink(), 30.0)
    assert d.stats()["num_requests_waiting"] == 2
    held = d.engine.num_used_blocks
    with pytest.raises(NoCapacityError, match="max_num_seqs"):
        d.reserve("m2", prompt(20, seed=2), GREEDY, [], None, ListSink(), 30.0)
    assert d.engine.num_used_blocks == held  # refused before taking anything
    d.abort("m0")
    d.reserve("m2", prompt(20, seed=2), GREEDY, [], None, ListSink(), 30.0)
    d.abort("m1")
    d.abort("m2")
    assert d.engine.num_used_blocks == used and d.num_requests == 0
