"""Async scheduling (`EngineArgs.async_scheduling`): the next decode step is launched before
the host reads the current step's tokens, and the tokens come out the same.

Each case runs one engine with async scheduling and one without, on the same requests and
the same calls (arrivals, aborts, stop strings), and compares what every call returned:
tokens, finish reasons, logprobs. The async engine must also have launched ahead on most
decode steps (else the test would compare the synchronous path with itself), and both
must give every KV block back.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.llm_engine import EngineArgs, LLMEngine
from engine.model_runner import ModelRunner
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams

Calls = list[list[tuple]]


def _prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 2000, (n,), generator=g).tolist() for n in lengths]


def _engine(async_: bool, graphs: bool = False, **kw) -> LLMEngine:
    kw = dict(dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=200), **kw)
    eng = LLMEngine(EngineArgs(async_scheduling=async_, **kw))
    if graphs:  # the CUDA-graph path's buffers and padding, replayed eagerly on the CPU
        r = eng.runner
        assert isinstance(r, ModelRunner)
        eng.runner = ModelRunner(
            r.model, r.cfg, r.num_blocks, r.block_size, r.dtype, r.device, cuda_graphs=True
        )
    return eng


def _key(o: RequestOutput) -> tuple:
    lp = None
    if o.new_logprobs is not None:
        lp = [{k: round(v, 4) for k, v in d.items()} for d in o.new_logprobs]
    return (o.request_id, tuple(o.new_token_ids), o.finished, o.finish_reason, lp)


def _drive(
    eng: LLMEngine,
    requests: list[tuple[str, list[int], SamplingParams]],
    between: Callable[[LLMEngine, int], None] | None = None,
    stagger: bool = False,
) -> tuple[Calls, int]:
    """Every call's outputs, and how many calls left a step launched ahead."""
    pending = list(requests)
    calls: Calls = []
    ahead = 0
    while pending or eng.has_unfinished_requests():
        for rid, ids, params in pending[:1] if stagger else pending:
            eng.add_request(rid, ids, params)
        pending = pending[1:] if stagger else []
        calls.append([_key(o) for o in eng.step()])
        ahead += eng._inflight is not None
        if between is not None:
            between(eng, len(calls))
    return calls, ahead


def _same(requests, between=None, stagger=False, min_ahead=0.5, **kw) -> Calls:
    """Run both engines; per call the same outputs (arrivals: per request, since a call
    that resolves a step launched ahead admits the new request one call later)."""
    sync, _ = _drive(e := _engine(False, **kw), requests, between, stagger)
    assert e.num_used_blocks == 0
    free = e.kv.num_free_blocks
    got, ahead = _drive(e := _engine(True, **kw), requests, between, stagger)
    if stagger:
        assert _tokens(got) == _tokens(sync) and _finals(got) == _finals(sync)
    else:
        assert got == sync
    assert e.num_used_blocks == 0 and e.kv.num_free_blocks == free
    assert ahead >= min_ahead * len(got), (ahead, len(got))
    return got


def _finals(calls: Calls) -> dict[str, str]:
    return {c[0]: c[3] for call in calls for c in call if c[2]}


def _tokens(calls: Calls) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for call in calls:
        for rid, toks, *_ in call:
            out.setdefault(rid, []).extend(toks)
    return out


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_greedy_lengths_and_stop_tokens(graphs: bool) -> None:
    """Requests ending by length at different steps, and by stop token / EOS mid-batch
    (rows the step launched ahead computed for nothing)."""
    prompts = _prompts(5, 17, 33, 9, 12)
    free = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    ref = _tokens(_drive(_engine(False), [("x", prompts[1], free)])[0])["x"]
    stop = SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[ref[4]])
    lengths = {
        i: SamplingParams(temperature=0, max_tokens=3 + 4 * i, ignore_eos=True) for i in (0, 2, 3)
    }
    reqs = [(f"len{i}", prompts[i], p) for i, p in lengths.items()]
    reqs += [("stop", prompts[1], stop), ("one", prompts[4], SamplingParams(max_tokens=1))]
    got = _same(reqs, graphs=graphs, min_ahead=0.4)
    toks = _tokens(got)
    assert toks["stop"] == ref[: ref.index(ref[4]) + 1]
    assert [len(toks[f"len{i}"]) for i in (0, 2, 3)] == [3, 11, 15]
    finals = _finals(got)
    assert finals["stop"] == "stop" and finals["len3"] == "length"


def test_abort_and_stop_string_while_a_step_is_ahead() -> None:
    """An abort, and a stop on the text side, between calls: no more outputs for those
    requests, nothing leaked, the others unchanged."""
    prompts = _prompts(6, 11, 8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]

    def between(eng: LLMEngine, call: int) -> None:
        if call == 4:
            eng.abort("r1")
        if call == 7:
            eng.stop_request("r2")

    got = _same(reqs, between)
    toks = _tokens(got)
    assert len(toks["r0"]) == 16 and 0 < len(toks["r1"]) < 8 and 0 < len(toks["r2"]) < 12
    assert not [c for call in got[4:] for c in call if c[0] == "r1"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(max_num_batched_tokens=7),  # prompts in chunks beside decode rows
        dict(num_kv_blocks=14, block_size=4, max_num_batched_tokens=16),  # preemption
        dict(max_num_batched_tokens=3),  # fewer rows a step than requests decoding
    ],
    ids=["default", "chunked", "preempt", "tight"],
)
@pytest.mark.parametrize("ahead", [False, True], ids=["arrivals-wait", "arrivals-ahead"])
def test_staggered_arrivals(monkeypatch, kw, ahead: bool) -> None:
    """A new request each call. With `ASYNC_WITH_ARRIVALS` it joins the step planned ahead
    (its prompt beside the pending decode rows, prompt chunks, preemption of requests
    whose token is in flight), else it stops the launching ahead for a call; tokens as
    without async scheduling, whatever the calls they come in."""
    import engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "ASYNC_WITH_ARRIVALS", ahead)
    prompts = _prompts(9, 4, 13, 7, 10, 5)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    _same(reqs, stagger=True, min_ahead=0.8 if ahead else 0.2, **kw)


def test_a_failed_launch_ahead_loses_no_token() -> None:
    """The step planned ahead raises while launching (say, out of memory capturing a new
    graph): the call raises; the next calls hand out the tokens read meanwhile and go on,
    ending with the synchronous engine's tokens."""

    def run(async_: bool) -> dict[str, list[int]]:
        eng = _engine(async_)
        real = eng.runner.run
        calls = {"n": 0}

        def flaky(seqs, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 4:  # a decode step's launch fails once
                raise RuntimeError("transient failure")
            return real(seqs, *a, **kw)

        eng.runner.run = flaky  # type: ignore[method-assign]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for i, p in enumerate(_prompts(6, 9)):
            eng.add_request(f"r{i}", p, params)
        toks: dict[str, list[int]] = {}
        failures = 0
        for _ in range(100):  # bounded: a lost token leaves a request stuck
            if not (eng.has_unfinished_requests() or eng._undelivered):
                break
            try:
                outs = eng.step()
            except RuntimeError:
                failures += 1
                continue
            for o in outs:
                toks.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert failures == 1 and eng.num_used_blocks == 0
        return toks

    want = _tokens(
        _drive(
            _engine(False),
            [
                (f"r{i}", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                for i, p in enumerate(_prompts(6, 9))
            ],
        )[0]
    )
    assert run(True) == want


def test_logprobs_and_history_dependent_sampling() -> None:
    """Logprobs come with the tokens launched ahead; a request whose sampling reads its
    output so far (penalties, min_tokens, seeded) is never launched ahead of its tokens."""
    prompts = _prompts(7, 10, 5, 8)
    reqs = [
        ("lp", prompts[0], SamplingParams(temperature=0, max_tokens=9, logprobs=3)),
        ("plain", prompts[1], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
    ]
    _same(reqs)
    for params in (
        SamplingParams(temperature=0, max_tokens=9, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=9, min_tokens=6),
        SamplingParams(temperature=0.8, max_tokens=9, seed=7),
    ):
        got, ahead = _drive(_engine(True), [("h", prompts[2], params), *reqs])
        sync, _ = _drive(_engine(False), [("h", prompts[2], params), *reqs])
        assert got == sync
        if params.min_tokens:
            assert ahead > 0  # once min_tokens are out, the request is launched ahead too
        else:
            assert ahead == 0


def test_unseeded_random_sampling_runs_ahead() -> None:
    """Unseeded random rows sample on the device from the shared generator: lengths and
    finish reasons hold, every token is in the vocabulary, nothing leaks."""
    eng = _engine(True)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True)
    calls, ahead = _drive(eng, [(f"r{i}", p, params) for i, p in enumerate(_prompts(6, 9, 4))])
    toks = _tokens(calls)
    assert [len(t) for t in toks.values()] == [12, 12, 12] and ahead >= 8
    vocab = eng.model_config.text.vocab_size
    assert all(0 <= t < vocab for ts in toks.values() for t in ts)
    assert eng.num_used_blocks == 0


def test_engine_reused_after_a_step_left_ahead() -> None:
    """A step launched ahead for a request that then ended by a stop token is dropped
    (nothing holds the request any more); a later request on the same engine decodes as
    on a fresh one."""
    prompts = _prompts(9, 12)
    ref = _tokens(_drive(_engine(False), [("x", prompts[0], SamplingParams(temperature=0))])[0])
    stop_at = ref["x"][3]
    eng = _engine(True)
    first = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at])
    _drive(eng, [("a", prompts[0], first)])
    assert eng._inflight is None and not eng.requests  # its one row: computed, dropped
    later = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    again = _tokens(_drive(eng, [("b", prompts[1], later)])[0])
    fresh = _tokens(_drive(_engine(False), [("b", prompts[1], later)])[0])
    assert again == fresh and eng.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_async_matches_sync_under_cuda_graphs() -> None:
    """On the GPU: pinned token copies and events, the sampled ids copied into a captured
    graph's input buffer. Lengths, a stop token, an abort: the same outputs per call."""
    prompts = _prompts(5, 17, 33, 9, 12)
    free = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    ref = _tokens(_drive(_engine(False, device="cuda"), [("x", prompts[1], free)])[0])["x"]
    reqs = [
        (
            f"len{i}",
            prompts[i],
            SamplingParams(temperature=0, max_tokens=3 + 4 * i, ignore_eos=True),
        )
        for i in (0, 2)
    ]
    reqs += [
        ("stop", prompts[1], SamplingParams(temperature=0, max_tokens=14, stop_token_ids=[ref[4]])),
        ("abort", prompts[3], free),
    ]

    def between(eng: LLMEngine, call: int) -> None:
        assert getattr(eng.runner, "graphs", None) is not None
        if call == 5:
            eng.abort("abort")

    toks = _tokens(_same(reqs, between, device="cuda", min_ahead=0.4))
    assert toks["stop"] == ref[: ref.index(ref[4]) + 1] and len(toks["len2"]) == 11


def test_every_preemption_is_reported(monkeypatch) -> None:
    """`last_preempted` names every request a call's plans preempted, the step planned
    ahead's included (the decode role fails media requests it cannot recompute by it).
    Both plans of one call preempt when arrivals are planned ahead: the newest request,
    penalised, keeps steps synchronous until the first plan preempts it."""
    import engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "ASYNC_WITH_ARRIVALS", True)
    eng = _engine(True, num_kv_blocks=20, block_size=4, max_num_batched_tokens=16)
    preempted: list[str] = []
    real = eng.scheduler._preempt

    def spy(req) -> None:
        preempted.append(req.request_id)
        real(req)

    eng.scheduler._preempt = spy  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    penalised = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.2
    )
    for i, p in enumerate(_prompts(9, 4, 13, 7, 10, 5)):
        eng.add_request(f"r{i}", p, penalised if i == 5 else params)
    reported: list[str] = []
    while eng.has_unfinished_requests():
        eng.step()
        reported += [r.request_id for r in eng.last_preempted]
    assert preempted and reported == preempted
