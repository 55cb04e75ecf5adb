from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.reasoning import (
    ReasoningParser,
    ReasoningStatus,
    ReasoningStream,
    split_reasoning,
)
from chat.template import render_chat
from chat.tokenizer import Tokenizer

THINKING, RESPONDING = ReasoningStatus.THINKING, ReasoningStatus.RESPONDING


def run_stream(
    status: ReasoningStatus, deltas: list[str]
) -> tuple[str, str, list[tuple[str, str]]]:
    stream = ReasoningStream(status)
    pieces = [stream.feed(d) for d in deltas] + [stream.finish()]
    return "".join(p[0] for p in pieces), "".join(p[1] for p in pieces), pieces


def test_status_from_the_prompt(tokenizer: Tokenizer) -> None:
    on = render_chat([{"role": "user", "content": "hi"}])
    off = render_chat([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert ReasoningStatus.from_prompt_text(on) is THINKING
    assert ReasoningStatus.from_prompt_text(off) is RESPONDING
    assert ReasoningStatus.from_prompt_text("no markers") is RESPONDING
    start, end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    assert ReasoningStatus.from_prompt_ids(tokenizer.encode(on), start, end) is THINKING
    assert ReasoningStatus.from_prompt_ids(tokenizer.encode(off), start, end) is RESPONDING
    assert ReasoningStatus.from_prompt_ids([5, 6], start, end) is RESPONDING
    assert ReasoningParser().status(on) is THINKING


def test_split() -> None:
    assert split_reasoning("hmm\n</think>\n\nAnswer", THINKING) == ("hmm\n", "\n\nAnswer")
    assert split_reasoning("cut off by max_tokens", THINKING) == ("cut off by max_tokens", "")
    assert split_reasoning("just the answer", RESPONDING) == (None, "just the answer")
    assert split_reasoning("a</think>b</think>c", THINKING) == ("a", "b</think>c")
    # a model that opens the block itself
    assert split_reasoning("<think>r</think>c", RESPONDING) == ("r", "c")


def test_stream_holds_back_partial_markers() -> None:
    reasoning, content, pieces = run_stream(
        THINKING, ["Let me", " see.</th", "ink>\n\nIt is", " 4."]
    )
    assert (reasoning, content) == ("Let me see.", "\n\nIt is 4.")
    assert pieces[1] == (" see.", "")  # "</th" held back, never emitted as reasoning
    assert pieces[2] == ("", "\n\nIt is")


def test_stream_releases_a_false_alarm() -> None:
    reasoning, content, pieces = run_stream(THINKING, ["a</t", "able> b"])
    assert (reasoning, content) == ("a</table> b", "")
    assert pieces[0] == ("a", "")


def test_stream_cut_off_stays_reasoning() -> None:
    assert run_stream(THINKING, ["still thinking </thi"])[:2] == ("still thinking </thi", "")


def test_stream_responding() -> None:
    assert run_stream(RESPONDING, ["Hello", " world"])[:2] == ("", "Hello world")
    assert run_stream(RESPONDING, ["<th", "ink>r</think>", "c"])[:2] == ("r", "c")
    assert run_stream(RESPONDING, ["<th", "is is content"])[:2] == ("", "<this is content")
    assert run_stream(RESPONDING, ["<th"])[:2] == ("", "<th")
    stream = ReasoningStream(RESPONDING)
    stream.feed("plain")
    assert not stream.in_reasoning and not stream.saw_reasoning


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab</think>\n ", max_size=40),
    st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    st.sampled_from([THINKING, RESPONDING]),
)
def test_stream_equals_split(text: str, cuts: list[int], status: ReasoningStatus) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    reasoning, content, _ = run_stream(status, deltas)
    expected_reasoning, expected_content = split_reasoning(text, status)
    assert reasoning == (expected_reasoning or "")
    assert content == expected_content


def test_unknown_parser_name() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen3'"):
        ReasoningParser("qwen3")
    parser = ReasoningParser("ernie-45-vl")
    assert parser.split("x</think>y", THINKING) == ("x", "y")
    assert isinstance(parser.stream(THINKING), ReasoningStream)
