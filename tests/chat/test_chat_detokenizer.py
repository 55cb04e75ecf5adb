from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.detokenizer import IncrementalDetokenizer
from chat.tokenizer import Tokenizer

TEXTS = [
    "你好，世界！今天天气很好。",
    "emoji: 🙂🚀👩‍👩‍👧 done",
    "生僻字：龘靐齉 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<think>先想一想🤔</think>\n\n答案是42。</s>",
    "plain ascii text with  spaces\tand\nnewlines",
]


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    deltas = [detok.add_token(i) for i in ids]
    deltas.append(detok.finish())
    assert detok.num_tokens == len(ids)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_deltas_concatenate_to_the_full_decode(tokenizer: Tokenizer, text: str, skip: bool) -> None:
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids, skip)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_multibyte_characters_are_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("龘")  # rare: byte-fallback, three byte tokens
    assert len(ids) == 3
    assert stream(tokenizer, ids) == ["", "", "龘", ""]
    ids = tokenizer.encode("𓀀")  # four byte tokens
    assert stream(tokenizer, ids) == ["", "", "", "𓀀", ""]


def test_unfinished_bytes_become_replacement_chars(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("𓀀")[:2] + tokenizer.encode("ok")
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "\ufffdok"
    truncated = tokenizer.encode("𓀀")[:3]
    assert "".join(stream(tokenizer, truncated)) == tokenizer.decode(truncated) == "\ufffd"
    # an added token also ends a byte run
    cut = [*tokenizer.encode("龘")[:2], tokenizer.token_to_id("</think>")]
    assert "".join(stream(tokenizer, cut)) == tokenizer.decode(cut) == "\ufffd</think>"


def test_text_property_tracks_emitted_text(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    detok.add_tokens(tokenizer.encode("中文 text"))
    detok.finish()
    assert detok.text == "中文 text"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2999), max_size=40))
def test_any_id_sequence(tokenizer: Tokenizer, ids: list[int]) -> None:
    for skip in (False, True):
        assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )
