"""Sampler: each transform against a plain per-row reference, then end-to-end behaviour."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from engine.sampler import (
    RequestSamplingState,
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
)
from engine.sampling_params import SamplingParams

torch.set_num_threads(1)
NEG_INF = float("-inf")
EOS = 2
THINK_END = 9


def state(
    prompt: Sequence[int] = (), output: Sequence[int] = (), **kw: object
) -> RequestSamplingState:
    eos = kw.pop("eos", (EOS,))
    return RequestSamplingState(
        params=SamplingParams(max_tokens=None, **kw),  # type: ignore[arg-type]
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=tuple(eos),  # type: ignore[arg-type]
    )


def random_logits(b: int, v: int, seed: int) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ---------------------------------------------------------------- plain per-row references


def ref_top_k(row: list[float], k: int) -> list[float]:
    if k <= 0 or k >= len(row):
        return row
    kth = sorted(row, reverse=True)[k - 1]
    return [x if x >= kth else NEG_INF for x in row]


def ref_softmax(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(x - m) if x != NEG_INF else 0.0 for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_top_p(row: list[float], p: float) -> list[float]:
    if p >= 1.0:
        return row
    probs = ref_softmax(row)
    order = sorted(range(len(row)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return [x if i in kept else NEG_INF for i, x in enumerate(row)]


def ref_min_p(row: list[float], min_p: float) -> list[float]:
    probs = ref_softmax(row)
    top = max(probs)
    return [x if probs[i] >= min_p * top else NEG_INF for i, x in enumerate(row)]


def ref_penalties(row: list[float], st: RequestSamplingState) -> list[float]:
    p = st.params
    out = list(row)
    for tok in set(st.prompt_token_ids) | set(st.output_token_ids):
        r = p.repetition_penalty
        out[tok] = out[tok] / r if out[tok] > 0 else out[tok] * r
    for tok in set(st.output_token_ids):
        count = st.output_token_ids.count(tok)
        out[tok] -= p.frequency_penalty * count + p.presence_penalty
    return out


def kept_ids(row: list[float]) -> set[int]:
    return {i for i, x in enumerate(row) if x != NEG_INF}


# ---------------------------------------------------------------- transforms vs references


def test_top_k_matches_reference() -> None:
    v = 50
    ks = [0, 1, 3, 10, 49, 50, 80]
    logits = random_logits(len(ks), v, seed=1)
    logits[2, 7] = logits[2, 8] = 20.0  # a tie at the top
    top_k = torch.tensor([k if 0 < k < v else v for k in ks])
    got = apply_top_k_top_p(logits, top_k, torch.ones(len(ks)))
    for i, k in enumerate(ks):
        assert kept_ids(got[i].tolist()) == kept_ids(ref_top_k(logits[i].tolist(), k)), k
        assert torch.equal(got[i][got[i] != NEG_INF], logits[i][got[i] != NEG_INF])


def test_top_p_matches_reference_and_composes_after_top_k() -> None:
    v = 64
    cases = [(0, 0.5), (0, 0.9), (0, 1.0), (0, 1e-9), (5, 0.7), (20, 0.95), (1, 0.3)]
    logits = random_logits(len(cases), v, seed=2)
    top_k = torch.tensor([k if k else v for k, _ in cases])
    top_p = torch.tensor([p for _, p in cases])
    got = apply_top_k_top_p(logits, top_k, top_p)
    for i, (k, p) in enumerate(cases):
        want = ref_top_p(ref_top_k(logits[i].tolist(), k), p)
        assert kept_ids(got[i].tolist()) == kept_ids(want), (k, p)
    assert kept_ids(got[3].tolist()) == {int(logits[3].argmax())}  # tiny top_p keeps the argmax
    assert kept_ids(got[2].tolist()) == set(range(v))  # top_p = 1 keeps everything


def test_min_p_matches_reference() -> None:
    min_ps = [0.0, 0.01, 0.1, 0.5, 1.0]
    logits = random_logits(len(min_ps), 40, seed=3)
    got = apply_min_p(logits, torch.tensor(min_ps))
    for i, mp in enumerate(min_ps):
        assert kept_ids(got[i].tolist()) == kept_ids(ref_min_p(logits[i].tolist(), mp)), mp


def test_penalties_match_reference() -> None:
    v = 30
    states = [
        state(prompt=[1, 2, 3], output=[4, 4, 4, 5], repetition_penalty=1.5),
        state(prompt=[7], output=[8, 8, 9, 8], frequency_penalty=0.7, presence_penalty=-0.4),
        state(
            prompt=[10, 11],
            output=[11, 12, 12],
            repetition_penalty=0.8,
            frequency_penalty=-1.0,
            presence_penalty=2.0,
        ),
        state(prompt=[1, 2], output=[3, 3], temperature=0.5),  # no penalties: untouched
        state(prompt=[], output=[], repetition_penalty=2.0),  # nothing seen yet
    ]
    logits = random_logits(len(states), v, seed=4)
    logits[0, 4] = -2.0  # negative logit on a repeated token: multiplied, not divided
    got = logits.clone()
    apply_penalties(got, states)
    for i, st in enumerate(states):
        want = torch.tensor(ref_penalties(logits[i].tolist(), st))
        torch.testing.assert_close(got[i], want)
    assert got[0, 4].item() == pytest.approx(-3.0)
    # frequency counts every occurrence: token 8 appears 3 times in row 1
    assert got[1, 8].item() == pytest.approx(logits[1, 8].item() - 0.7 * 3 + 0.4)
    # presence/frequency ignore the prompt; repetition covers it
    assert got[1, 7].item() == logits[1, 7].item()
    torch.testing.assert_close(got[3], logits[3])


# ---------------------------------------------------------------- the Sampler end to end


def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    v = 12
    logits = torch.zeros(4, v)
    logits[:, EOS] = 10.0
    logits[:, 5] = 9.0  # a stop token id
    logits[:, 6] = 8.0
    states = [
        state(output=[1, 1], min_tokens=3, stop_token_ids=[5], temperature=0.0),
        state(output=[1, 1, 1], min_tokens=3, stop_token_ids=[5], temperature=0.0),
        state(output=[], min_tokens=3, ignore_eos=True, temperature=0.0),
        state(output=[], min_tokens=3, stop_token_ids=[5], temperature=1.0, top_k=3),
    ]
    sampler = Sampler(torch.Generator().manual_seed(0))
    out = sampler(logits, states).sampled_token_ids.tolist()
    assert out[0] == 6  # EOS and stop id 5 both blocked
    assert out[1] == EOS  # min_tokens reached: EOS allowed again
    assert out[2] == EOS  # ignore_eos: EOS does not end the request, so it is not blocked
    for _ in range(50):  # sampled rows never draw a blocked id
        assert sampler(logits, states).sampled_token_ids[3].item() not in (EOS, 5)


def test_logprobs_are_raw_log_softmax_at_chosen_ids() -> None:
    v = 40
    logits = random_logits(3, v, seed=5)
    states = [
        state(output=[0, 0], logprobs=5, temperature=0.7, repetition_penalty=1.3, seed=3),
        state(logprobs=0, temperature=0.0, frequency_penalty=1.0, output=[1]),
        state(logprobs=None, temperature=1.0),
    ]
    out = Sampler(torch.Generator().manual_seed(0))(logits, states)
    assert out.logprobs is not None
    raw = torch.log_softmax(logits, dim=-1)
    ids, lps, ranks = out.logprobs.token_ids, out.logprobs.logprobs, out.logprobs.ranks
    assert ids.shape == lps.shape == (3, 6)
    assert torch.equal(ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(lps, raw.gather(1, ids))  # raw, not the penalised distribution
    for i in range(3):
        top = lps[i, 1:].tolist()
        assert top == sorted(top, reverse=True)
        assert ids[i, 1].item() == raw[i].argmax().item()
        assert ranks[i].item() == 1 + int((raw[i] > raw[i, ids[i, 0]]).sum())
    assert Sampler()(logits, [state(), state(), state()]).logprobs is None


def test_greedy_is_argmax_of_penalised_logits_and_deterministic() -> None:
    v = 25
    logits = random_logits(4, v, seed=6)
    top = int(logits[1].argmax())
    states = [
        state(temperature=0.0),
        state(temperature=0.0, output=[top], frequency_penalty=2.0, repetition_penalty=2.0),
        state(temperature=0.0, top_k=3, top_p=0.1, seed=11),
        state(temperature=1.0),  # a random row beside them must not disturb greedy rows
    ]
    penalised = logits.clone()
    apply_penalties(penalised, states)
    want = penalised.argmax(dim=-1)[:3]
    for seed in range(5):
        got = Sampler(torch.Generator().manual_seed(seed))(logits, states).sampled_token_ids
        assert torch.equal(got[:3], want)
    assert want[1].item() != top  # the penalty moved the argmax


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    ("kw", "transform"),
    [
        ({"temperature": 1.0}, lambda lg: lg),
        ({"temperature": 0.5}, lambda lg: lg / 0.5),
        ({"temperature": 1.0, "top_k": 3}, lambda lg: torch.tensor(ref_top_k(lg.tolist(), 3))),
        ({"temperature": 1.0, "top_p": 0.8}, lambda lg: torch.tensor(ref_top_p(lg.tolist(), 0.8))),
    ],
)
def test_sampling_distribution_matches_target(
    kw: dict[str, Any], transform: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    # 5 tokens, 20k draws from a fixed generator: deterministic (never flaky), and the
    # chi-square must stay under its 0.1% critical value when the sampler is right.
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    target = torch.softmax(transform(base), dim=-1)
    batch = 2000
    states = [state(**kw) for _ in range(batch)]
    sampler = Sampler(torch.Generator().manual_seed(1234))
    counts = torch.zeros(5)
    for _ in range(10):
        tokens = sampler(base.expand(batch, 5), states).sampled_token_ids
        counts += torch.bincount(tokens, minlength=5).float()
    support = target > 0
    assert counts[~support].sum() == 0  # filtered tokens are never drawn
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[int(support.sum()) - 1]
    assert _chi_square(counts[support], target[support]) < critical


def test_reasoning_budget_forces_think_end_exactly_when_spent() -> None:
    v, budget = 12, 4
    logits = torch.zeros(1, v)
    logits[0, 7] = 5.0  # the model would never close its reasoning
    st = state(temperature=0.0, reasoning_max_tokens=budget)
    st.think_end_token_id, st.in_reasoning = THINK_END, True
    sampler = Sampler()
    emitted = []
    for _ in range(budget + 3):
        token = int(sampler(logits, [st]).sampled_token_ids[0])
        st.append_token(token)
        emitted.append(token)
    assert emitted == [7] * budget + [THINK_END] + [7, 7]
    assert not st.in_reasoning and st.num_reasoning_tokens == budget


def test_reasoning_closed_by_model_or_eos_or_no_budget() -> None:
    v = 12
    logits = torch.zeros(3, v)
    logits[0, THINK_END] = 5.0  # the model closes the reasoning itself, under budget
    logits[1, EOS] = 5.0  # EOS inside the reasoning becomes </think>
    logits[2, 7] = 5.0  # no budget: nothing is forced
    states = [state(temperature=0.0, reasoning_max_tokens=10) for _ in range(2)]
    states.append(state(temperature=0.0))
    for st in states:
        st.think_end_token_id, st.in_reasoning = THINK_END, True
    sampler = Sampler()
    first = sampler(logits, states).sampled_token_ids.tolist()
    assert first == [THINK_END, THINK_END, 7]
    for st, tok in zip(states, first, strict=True):
        st.append_token(tok)
    assert [st.in_reasoning for st in states] == [False, False, True]
    # after </think>, EOS is a real EOS again
    assert sampler(logits, states).sampled_token_ids.tolist()[1] == EOS


def _model_logits(request_id: int, step: int, last_token: int, v: int) -> torch.Tensor:
    """A stand-in model: logits depend only on the request and its own history."""
    g = torch.Generator().manual_seed(request_id * 100_003 + step * 1_009 + last_token)
    return torch.randn(v, generator=g) * 2


def _run_batch(
    requests: list[tuple[int, RequestSamplingState]], steps: int, v: int
) -> dict[int, list[int]]:
    sampler = Sampler(torch.Generator().manual_seed(len(requests)))  # batch-dependent on purpose
    for step in range(steps):
        logits = torch.stack(
            [_model_logits(rid, step, (st.output_token_ids or [0])[-1], v) for rid, st in requests]
        )
        tokens = sampler(logits, [st for _, st in requests]).sampled_token_ids.tolist()
        for (_, st), tok in zip(requests, tokens, strict=True):
            st.append_token(tok)
    return {rid: st.output_token_ids for rid, st in requests}


def test_seeded_request_is_reproducible_whatever_the_batch() -> None:
    v, steps = 300, 30

    def seeded(seed: int = 42) -> RequestSamplingState:
        return state(seed=seed, temperature=0.9, top_p=0.95, presence_penalty=0.3)

    def other(i: int) -> RequestSamplingState:
        kinds = [
            {"temperature": 1.0},
            {"temperature": 0.0},
            {"temperature": 1.3, "top_k": 5, "seed": 7},
            {"temperature": 0.6, "min_p": 0.1, "seed": 42},  # same seed, other params
        ]
        return state(**kinds[i % len(kinds)])  # type: ignore[arg-type]

    alone = _run_batch([(0, seeded())], steps, v)[0]
    compositions = [
        [(0, seeded()), (1, other(0))],
        [(2, other(1)), (3, other(2)), (0, seeded()), (4, other(3))],
        [(5, other(0)), (6, other(0)), (7, other(2)), (8, other(1)), (9, other(3)), (0, seeded())],
    ]
    for batch in compositions:
        assert _run_batch(batch, steps, v)[0] == alone
    assert _run_batch([(0, seeded(seed=43))], steps, v)[0] != alone
    # A request handed over mid-way (prefill -> decode, or preempted) continues identically:
    # the draw at each position depends only on (seed, position).
    resumed = seeded()
    for tok in alone[:10]:
        resumed.append_token(tok)
    sampler = Sampler()
    for step in range(10, steps):
        logits = _model_logits(0, step, resumed.output_token_ids[-1], v)[None]
        resumed.append_token(int(sampler(logits, [resumed]).sampled_token_ids[0]))
    assert resumed.output_token_ids == alone


def test_seeded_draws_change_from_one_position_to_the_next() -> None:
    # Same logits every step: only fresh noise per position makes the tokens vary.
    st = state(seed=5, temperature=1.0)
    sampler = Sampler()
    for _ in range(40):
        st.append_token(int(sampler(torch.zeros(1, 50), [st]).sampled_token_ids[0]))
    assert len(set(st.output_token_ids)) > 15


def test_unseeded_rows_follow_the_shared_generator() -> None:
    logits = random_logits(8, 100, seed=8)
    states = [state(temperature=1.0) for _ in range(8)]
    a = Sampler(torch.Generator().manual_seed(5))(logits, states).sampled_token_ids
    b = Sampler(torch.Generator().manual_seed(5))(logits, states).sampled_token_ids
    assert torch.equal(a, b)


def test_bad_shapes_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, 5), [state()])
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(5), [state()])
    out = Sampler()(torch.zeros(0, 5), [])
    assert out.sampled_token_ids.shape == (0,)


def test_input_logits_untouched_and_bf16_accepted() -> None:
    logits = random_logits(2, 16, seed=9)
    before = logits.clone()
    states = [state(repetition_penalty=2.0, output=[1, 2], min_tokens=5), state(temperature=0.0)]
    Sampler()(logits, states)
    assert torch.equal(logits, before)
    out = Sampler()(logits.to(torch.bfloat16), states)
    assert out.sampled_token_ids.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_greedy_and_reproduces_seeded() -> None:
    logits = random_logits(4, 1000, seed=10)
    states = [
        state(temperature=0.0, repetition_penalty=1.2, output=[3]),
        state(seed=1),
        state(top_k=5, top_p=0.9, min_p=0.05),
        state(temperature=0.0, logprobs=3),
    ]
    cpu = Sampler()(logits, states)
    gpu = Sampler()(logits.cuda(), states)
    assert gpu.sampled_token_ids.is_cuda
    assert gpu.sampled_token_ids[[0, 3]].tolist() == cpu.sampled_token_ids[[0, 3]].tolist()
    again = Sampler()(logits.cuda(), states)
    assert again.sampled_token_ids[1].item() == gpu.sampled_token_ids[1].item()
