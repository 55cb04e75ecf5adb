"""Tensor parallelism on CPU ranks (gloo): KV hand-off between engines of different sizes,
clear errors for splits the model or machine cannot take, and no worker outlives its
engine. Token-level parity with transformers lives in test_generate.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from engine.kv_transfer import FakeTransport
from engine.llm_engine import EngineArgs, LLMEngine
from engine.parallel import TensorParallelError
from engine.roles.decode import DecodeRole
from engine.roles.prefill import PrefillResult, PrefillRole
from engine.sampling_params import SamplingParams
from tests.engine.test_kv_transfer_roles import ListSink

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(300, 2000, n)]


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[int, LLMEngine]]:
    """A single-rank and a two-rank engine of the embedded model (each used as prefill
    and as decode: roles only borrow the engine)."""
    made = {
        tp: LLMEngine(
            EngineArgs(
                max_model_len=512,
                max_num_seqs=4,
                max_num_batched_tokens=32,
                tensor_parallel_size=tp,
            )
        )
        for tp in (1, 2)
    }
    yield made
    for e in made.values():
        e.shutdown()


def generate(engine: LLMEngine, ids: list[int]) -> list[int]:
    engine.add_request("ref", ids, GREEDY, cache_salt=f"ref{time.monotonic()}")
    out: list[int] = []
    while engine.has_unfinished_requests():
        out += [t for o in engine.step() for t in o.new_token_ids]
    return out


@pytest.mark.parametrize("p_tp, d_tp", [(2, 1), (1, 2)])
def test_kv_hand_off_between_tensor_parallel_sizes(engines, p_tp, d_tp):
    """Whole heads on the wire: prefill gathers its ranks' heads of each layer, decode
    writes each rank's heads; the tokens equal one engine generating alone."""
    ids = prompt(90, seed=p_tp * 10 + d_tp)  # 3 chunks of 32 tokens
    want = generate(engines[1], ids)
    transport = FakeTransport()
    pe, de = engines[p_tp], engines[d_tp]
    rx = transport.receiver(de.runner.kv_caches, f"kv{p_tp}{d_tp}")
    tx = transport.sender(pe.runner.kv_caches)
    try:
        p, d = PrefillRole(pe, tx), DecodeRole(de, rx)
        psink, dsink = ListSink(), ListSink()
        rid = f"r{p_tp}{d_tp}"
        res = d.reserve(rid, ids, GREEDY, [], f"salt{p_tp}{d_tp}", dsink, 30.0)
        p.add(rid, ids, GREEDY, [], f"salt{p_tp}{d_tp}", res, psink, 30.0)
        while not psink.items:
            assert p.step()
            p.poll()
        assert isinstance(psink.items[0], PrefillResult)
        d.poll()
        while d.step():
            pass
        got = [t for out in dsink.items for t in out.new_token_ids]
        assert got == want
        assert pe.num_used_blocks == 0 and de.num_used_blocks == 0
    finally:
        tx.close()
        rx.close()


def test_split_the_model_cannot_take_is_refused_before_any_process_starts():
    # the embedded model has 4 query heads and 2 KV heads
    with pytest.raises(TensorParallelError, match="does not divide the model's attention heads"):
        LLMEngine(EngineArgs(tensor_parallel_size=3))
    with pytest.raises(TensorParallelError, match="needs 2 GPUs"):
        LLMEngine(EngineArgs(tensor_parallel_size=2, device="cuda"))
    with pytest.raises(ValueError, match="at least 1"):
        EngineArgs(tensor_parallel_size=0)


def test_workers_stop_with_the_engine_and_a_lost_worker_fails_clearly():
    engine = LLMEngine(EngineArgs(tensor_parallel_size=2))
    [pid] = engine.runner.workers.pids
    os.kill(pid, signal.SIGKILL)
    engine.add_request("a", prompt(8, seed=0), GREEDY)
    with pytest.raises(RuntimeError, match="rank 1 is gone"):
        engine.step()
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert engine.runner.workers.alive() == [False]

    engine = LLMEngine(EngineArgs(tensor_parallel_size=2))
    workers = engine.runner.workers
    del engine  # dropped without shutdown: the finalizer stops the workers
    import gc

    gc.collect()
    assert workers.alive() == [False]
