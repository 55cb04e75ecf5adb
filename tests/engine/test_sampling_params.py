"""SamplingParams: defaults, normalisation, and one ValueError per bad field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from engine.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.min_tokens, p.max_tokens, p.logprobs, p.seed) == (0, 16, None, None)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert p.reasoning_max_tokens is None
    assert not p.is_greedy and not p.has_penalties


def test_is_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_off_spellings_are_both_accepted_and_stored_as_zero(top_k: int) -> None:
    assert SamplingParams(top_k=top_k).top_k == 0


def test_stop_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)


def test_greedy_and_penalty_flags() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert SamplingParams(temperature=5.0).temperature == 5.0  # no OpenAI cap of 2 here
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties
    assert SamplingParams(frequency_penalty=2.0).has_penalties


def test_valid_edge_values() -> None:
    SamplingParams(
        top_p=1e-9,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        max_tokens=None,
        min_tokens=100,
        logprobs=0,
        seed=2**64 - 1,
        reasoning_max_tokens=0,
    )
    SamplingParams(seed=-(2**63), max_tokens=8, min_tokens=8, reasoning_max_tokens=8)


BAD_VALUES: list[tuple[str, Any]] = [
    ("n", 0),
    ("n", 1.0),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", True),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -3.0),
    ("min_tokens", -1),
    ("max_tokens", 0),
    ("max_tokens", 2.0),
    ("stop", ["ok", ""]),
    ("stop", [1, 2]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", [1.5]),
    ("ignore_eos", 1),
    ("include_stop_str_in_output", "yes"),
    ("skip_special_tokens", None),
    ("logprobs", -1),
    ("logprobs", 1.0),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("seed", 1.5),
    ("reasoning_max_tokens", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_field_raises_value_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=20, max_tokens=10)
    SamplingParams(min_tokens=20, max_tokens=None)  # engine resolves; nothing to compare


def test_reasoning_max_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="reasoning_max_tokens"):
        SamplingParams(reasoning_max_tokens=17, max_tokens=16)
