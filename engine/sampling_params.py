"""Per-request sampling parameters (the vLLM / OpenAI vocabulary), validated on construction.

`SamplingParams` is data: a frozen dataclass whose `__post_init__` rejects bad values with a
`ValueError` that names the field, and normalises a few equivalent spellings (`top_k=-1` and
`top_k=0` both mean "off" and are stored as 0; `stop` may be one string or a list and is stored
as a tuple). The engine's `Sampler` reads these fields; the detokenizing layer reads `stop`,
`include_stop_str_in_output` and `skip_special_tokens`; the scheduler reads `max_tokens`.

Ranges follow vLLM rather than OpenAI where they differ: `temperature` has no upper bound
(OpenAI caps it at 2; the gateway may enforce that for the REST API), and values below
`GREEDY_EPS` are greedy, like vLLM's `_SAMPLING_EPS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy (dividing by them would overflow).
GREEDY_EPS = 1e-5
# Seeds must fit a 64-bit torch generator seed (torch accepts signed and unsigned 64-bit).
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request. Every field is validated in `__post_init__`."""

    n: int = 1
    """Number of completions for the prompt (the engine forks the request; the sampler sees
    each completion as its own row)."""
    temperature: float = 1.0
    """Softmax temperature, >= 0; 0 (or below GREEDY_EPS) means greedy argmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass >= top_p.
    In (0, 1]; 1 = off."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 or -1 = off (stored as 0)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p * (the top token's probability). [0, 1]."""
    repetition_penalty: float = 1.0
    """HF/vLLM multiplicative penalty on tokens seen in the prompt or the output; > 0, 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI additive penalty on tokens present in the output so far; [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI additive penalty times each token's count in the output so far; [-2, 2]."""
    min_tokens: int = 0
    """EOS and stop_token_ids cannot be sampled before this many output tokens."""
    max_tokens: int | None = 16
    """Output token limit (>= 1); None = up to max_model_len, resolved by the engine."""
    stop: Sequence[str] = ()
    """Stop strings, applied by the detokenizing layer; a single string is accepted."""
    stop_token_ids: Sequence[int] = ()
    """Token ids that end the request (besides EOS); the sampler only uses them for min_tokens."""
    ignore_eos: bool = False
    """Keep generating past EOS (then EOS is not blocked by min_tokens either)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string in the returned text."""
    logprobs: int | None = None
    """Return this many top logprobs per output token; 0 = only the sampled token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever shares the batch."""
    reasoning_max_tokens: int | None = None
    """Budget of reasoning tokens; once spent, `</think>` is forced. None = unlimited."""
    skip_special_tokens: bool = True
    """Drop special tokens when detokenizing."""

    def __post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, minimum=-1)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
            if self.min_tokens > self.max_tokens:
                raise ValueError(
                    f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
                )
        object.__setattr__(self, "stop", _normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalize_token_ids(self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=_SEED_MIN, maximum=_SEED_MAX)
        self._check_reasoning_max_tokens()

    def _check_reasoning_max_tokens(self) -> None:
        if self.reasoning_max_tokens is None:
            return
        _check_int("reasoning_max_tokens", self.reasoning_max_tokens, minimum=0)
        if self.max_tokens is not None and self.reasoning_max_tokens > self.max_tokens:
            raise ValueError(
                f"reasoning_max_tokens ({self.reasoning_max_tokens}) must be <= "
                f"max_tokens ({self.max_tokens})"
            )

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax (no randomness is drawn for it)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """True when any repetition/presence/frequency penalty changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    # bool is an int subclass; `top_k=True` is a bug in the caller, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        left = "(" if low_open else "["
        right = ")" if math.isinf(high) else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def _normalize_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop must not contain empty strings")
    return tuple(stop)


def _normalize_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"stop_token_ids must be a list of ints, got {ids!r}")
    for token_id in ids:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {token_id!r}")
    return tuple(ids)
