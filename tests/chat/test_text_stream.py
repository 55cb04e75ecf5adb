"""`TextStream`: token ids → (reasoning, content) deltas, the text side both the gateway
(`ChoiceDecoder`) and decode_svc run. Checked one token per feed (the hardest case for
held-back text) and in random chunks against the non-streaming answer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.reasoning import ReasoningStatus
from chat.text_stream import TextChunk, TextOptions, TextStream
from chat.tokenizer import Tokenizer

THINKING, RESPONDING = ReasoningStatus.THINKING, ReasoningStatus.RESPONDING
POEM = "床前明月光，疑是地上霜。 STOP here"  # byte-fallback pieces, and a stop string
REASONING = "Let me think about it."
ANSWER = "The answer is 42. Done."


def feed_all(
    stream: TextStream,
    ids: Sequence[int],
    sizes: Sequence[int] = (1,),
    finish_reason: str = "stop",
) -> list[TextChunk]:
    """Feed `ids` in chunks of the given sizes (cycled); the last feed finishes."""
    chunks, i, k = [], 0, 0
    while i < len(ids):
        step = max(1, sizes[k % len(sizes)])
        batch, i, k = ids[i : i + step], i + step, k + 1
        done = i >= len(ids)
        chunks.append(
            stream.feed(batch, finished=done, finish_reason=finish_reason if done else None)
        )
    return chunks


def joined(chunks: Sequence[TextChunk]) -> tuple[str, str]:
    return "".join(c.reasoning for c in chunks), "".join(c.content for c in chunks)


def test_text_equals_the_full_decode(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode(POEM), tokenizer.token_to_id("</s>")]
    chunks = feed_all(TextStream(tokenizer, TextOptions()), ids)
    assert joined(chunks) == ("", tokenizer.decode(ids, skip_special_tokens=True))
    assert all("\ufffd" not in c.content for c in chunks)  # half a character is held back
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_str is None
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_any_chunking_gives_the_same_text(tokenizer: Tokenizer, sizes: list[int]) -> None:
    ids = tokenizer.encode(REASONING + "</think>" + POEM)
    one = joined(feed_all(TextStream(tokenizer, TextOptions(reasoning=THINKING)), ids))
    many = joined(feed_all(TextStream(tokenizer, TextOptions(reasoning=THINKING)), ids, sizes))
    assert one == many == (REASONING, POEM)


def test_stop_string_never_leaks_partially(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(POEM)  # " S", "T", "O", "P" arrive one token each
    stream = TextStream(tokenizer, TextOptions(stop=["STOP"]))
    chunks = feed_all(stream, ids)
    emitted = ""
    for c in chunks:
        emitted += c.content
        assert "S" not in emitted  # not even the first letter before the match settles
    assert emitted == "床前明月光，疑是地上霜。 "
    stopped = next(i for i, c in enumerate(chunks) if c.finish_reason is not None)
    assert chunks[stopped].stop_str == "STOP" and chunks[stopped].finish_reason == "stop"
    assert all(c.content == "" and c.finish_reason is None for c in chunks[stopped + 1 :])
    assert stream.token_ids == ids[: stopped + 1]  # tokens after the stop are not counted


def test_stop_string_kept_when_asked(tokenizer: Tokenizer) -> None:
    options = TextOptions(stop=["STOP"], include_stop_str_in_output=True)
    _, content = joined(feed_all(TextStream(tokenizer, options), tokenizer.encode(POEM)))
    assert content == "床前明月光，疑是地上霜。 STOP"


def test_stop_string_look_alike_is_released(tokenizer: Tokenizer) -> None:
    chunks = feed_all(TextStream(tokenizer, TextOptions(stop=["STOPPED"])), tokenizer.encode(POEM))
    assert joined(chunks) == ("", POEM) and chunks[-1].stop_str is None


def test_reasoning_split_holds_back_a_partial_think_end(tokenizer: Tokenizer) -> None:
    # "</think>" spelled in ordinary pieces: "</", "th", "i", "n", "k", ">"
    ids = tokenizer.encode("hmm </thi") + tokenizer.encode("nk>yes")
    stream = TextStream(tokenizer, TextOptions(reasoning=THINKING))
    chunks = feed_all(stream, ids)
    reasoning = ""
    for c in chunks:
        reasoning += c.reasoning
        assert "<" not in reasoning  # "</thi" waits until "nk>" settles it
    assert joined(chunks) == ("hmm ", "yes")
    assert stream.saw_reasoning


def test_reasoning_split_on_the_marker_token(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(f"{REASONING}</think>{ANSWER}")
    stream = TextStream(tokenizer, TextOptions(reasoning=THINKING))
    assert joined(feed_all(stream, ids)) == (REASONING, ANSWER)
    assert stream.num_reasoning_tokens == len(tokenizer.encode(REASONING))


def test_thinking_cut_by_max_tokens_stays_reasoning(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("still thinking </thi")  # a partial marker at the very end, too
    stream = TextStream(tokenizer, TextOptions(reasoning=THINKING))
    chunks = feed_all(stream, ids, finish_reason="length")
    assert joined(chunks) == ("still thinking </thi", "")
    assert chunks[-1].finish_reason == "length"
    assert stream.num_reasoning_tokens == len(ids)


def test_thinking_off_is_all_content(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, TextOptions(reasoning=RESPONDING))
    assert joined(feed_all(stream, tokenizer.encode(ANSWER))) == ("", ANSWER)
    assert not stream.saw_reasoning and stream.num_reasoning_tokens == 0


def test_no_parser_keeps_markers_as_content(tokenizer: Tokenizer) -> None:
    text = f"{REASONING}</think>{ANSWER}"
    stream = TextStream(tokenizer, TextOptions())
    assert joined(feed_all(stream, tokenizer.encode(text))) == ("", text)


@pytest.mark.parametrize("stop", ["42", "answer is 4"])
def test_stop_string_inside_the_answer_after_reasoning(tokenizer: Tokenizer, stop: str) -> None:
    ids = tokenizer.encode(f"{REASONING}</think>{ANSWER}")
    stream = TextStream(tokenizer, TextOptions(stop=[stop], reasoning=THINKING))
    chunks = feed_all(stream, ids)
    assert joined(chunks) == (REASONING, ANSWER[: ANSWER.index(stop)])
    assert stream.finish_reason == "stop"
    assert [c.stop_str for c in chunks if c.stop_str] == [stop]


def test_nothing_after_finish(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, TextOptions())
    stream.feed(tokenizer.encode("hi"), finished=True, finish_reason="length")
    later = stream.feed(tokenizer.encode("more"))
    assert (later.content, later.finish_reason) == ("", None)
    assert stream.finish_reason == "length"
