from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.stop import StopStringMatcher, truncate_at_stop


def run(stop, deltas, include=False):
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    updates = [matcher.feed(d) for d in deltas]
    tail = matcher.finish()
    return "".join(u.text for u in updates) + tail, updates, matcher


def test_stop_across_deltas_never_emits_a_partial() -> None:
    text, updates, matcher = run(["STOP"], ["Hello ST", "O", "P and more"])
    assert text == "Hello "
    assert [u.text for u in updates] == ["Hello ", "", ""]
    assert updates[1].stopped is False and updates[2].stopped is True
    assert updates[2].stop_str == "STOP" and updates[2].truncate_at == 6
    assert matcher.output_text == "Hello "


def test_include_stop_str_in_output() -> None:
    text, updates, matcher = run(["STOP"], ["Hello ST", "OP!"], include=True)
    assert text == "Hello STOP" and updates[-1].truncate_at == 10
    assert matcher.output_text == "Hello STOP"


def test_false_alarm_is_released() -> None:
    text, updates, _ = run(["</answer>"], ["x </ans", "wer-ish", " end"])
    assert text == "x </answer-ish end"
    assert updates[0].text == "x "


def test_unfinished_partial_released_at_finish() -> None:
    text, updates, _ = run(["\n\n"], ["line\n"])
    assert updates[0].text == "line" and text == "line\n"


def test_first_completed_stop_wins() -> None:
    # "b" completes before "abc" could; the earliest-ending match decides
    assert truncate_at_stop("xabc", ["abc", "b"]) == ("xa", "b")
    # same end: the longer string starts earlier
    assert truncate_at_stop("xabc", ["bc", "abc"]) == ("x", "abc")
    assert truncate_at_stop("xabc", ["bc", "abc"], include_stop_str_in_output=True) == (
        "xabc",
        "abc",
    )
    assert truncate_at_stop("none here", ["zzz"]) == ("none here", None)


def test_after_stop_nothing_more() -> None:
    matcher = StopStringMatcher("END")
    assert matcher.feed("aEND").stopped
    later = matcher.feed("more")
    assert later.text == "" and later.stopped and later.stop_str == "END"
    assert matcher.finish() == ""


def test_bad_stop_strings() -> None:
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringMatcher([""])
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringMatcher([None])  # type: ignore[list-item]


def test_no_stop_strings_passes_everything_through() -> None:
    assert run([], ["a", "b"])[0] == "ab"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc\n", max_size=30),
    st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(min_value=0, max_value=30), max_size=6),
    st.booleans(),
)
def test_streaming_equals_one_shot(text, stops, cuts, include) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    streamed, updates, _ = run(stops, deltas, include)
    expected, stop_str = truncate_at_stop(text, stops, include_stop_str_in_output=include)
    assert streamed == expected
    assert (updates[-1].stop_str if updates else None) == stop_str
    for stop in stops:
        if not include or stop_str is None:
            # no emitted delta ends with a partial that the final text doesn't contain
            assert stop not in streamed or (include and streamed.endswith(stop))
    emitted = ""
    for update in updates:
        emitted += update.text
        assert expected.startswith(emitted)
