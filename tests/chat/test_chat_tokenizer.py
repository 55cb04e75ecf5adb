from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.tokenizer import Tokenizer, TokenizerError

SAMPLES = [
    "Hello world, 12345!",
    "你好，世界。今天天气很好🙂",
    "  def f(x):\n\treturn x + 1\n",
    "emoji 👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ｆｕｌｌ ｗｉｄｔｈ",
    "",
    " ",
    "\n\n",
    "价格：$12.50（打八折）——明天截止！",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


# U+2581 is SentencePiece's own space marker: it decodes to a space by design (HF too).
@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_characters="\u2581"), max_size=60))
def test_round_trip_any_text(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_split_first(tokenizer: Tokenizer) -> None:
    text = "User: Picture 1:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>hi</think>"
    ids = tokenizer.encode(text)
    for name in ("<|IMAGE_START|>", "<|image@placeholder|>", "<|IMAGE_END|>", "</think>"):
        assert ids.count(tokenizer.token_to_id(name)) == 1
    assert ids[-1] == tokenizer.token_to_id("</think>")
    # a control token written as text is matched too, as HF does
    assert tokenizer.encode("a</s>") == [*tokenizer.encode("a"), tokenizer.eos_token_id]


def test_decode_skips_only_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|begin_of_sentence|><think>why</think>ok</s>")
    assert tokenizer.decode(ids) == "<|begin_of_sentence|><think>why</think>ok</s>"
    # <think> markers are not special: the reasoning parser needs them in the text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>why</think>ok"


def test_vocabulary_lookups(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 3000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.token_to_id("<|IMAGE_PLACEHOLDER|>") == 9
    assert tokenizer.id_to_token(9) == "<|IMAGE_PLACEHOLDER|>"
    assert tokenizer.token_to_id("no-such-token") is None
    assert tokenizer.token_to_id("<unk>") == 0
    piece = tokenizer.id_to_token(2500)
    assert tokenizer.token_to_id(piece) == 2500
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.id_to_token(10**6)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([5, -1])
    with pytest.raises(TokenizerError, match="expects str"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]


def test_add_special_tokens_follows_config(tokenizer: Tokenizer) -> None:
    # ERNIE's config sets add_bos_token false: nothing is added
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")


def test_added_tokens_beyond_the_sp_vocab(tokenizer_variant) -> None:
    path = tokenizer_variant(
        {
            3000: {"content": "<|VIDEO_PLACEHOLDER|>"},
            5123: {"content": "<|LOC_0|>"},
            5124: {"content": "<|LOC_1000|>", "special": False},
        },
    )
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == 5125
    ids = tok.encode("box<|LOC_0|>,<|LOC_1000|> and <|VIDEO_PLACEHOLDER|>")
    assert 5123 in ids and 5124 in ids and 3000 in ids
    assert tok.decode(ids) == "box<|LOC_0|>,<|LOC_1000|> and <|VIDEO_PLACEHOLDER|>"
    assert tok.decode(ids, skip_special_tokens=True) == "box,<|LOC_1000|> and "
    assert tok.id_to_token(5123) == "<|LOC_0|>"
    with pytest.raises(TokenizerError):
        tok.decode([4000])  # a hole between the sp vocab and the added ids


def test_longest_added_token_wins(tokenizer_variant) -> None:
    path = tokenizer_variant({3000: {"content": "<think>x"}})
    tok = Tokenizer.from_dir(path)
    assert tok.encode("<think>x") == [3000]
    assert tok.encode("<think>y")[0] == tok.token_to_id("<think>")


def test_lstrip_rstrip_are_honoured(tokenizer_variant) -> None:
    path = tokenizer_variant({3000: {"content": "<X>", "lstrip": True, "rstrip": True}})
    tok = Tokenizer.from_dir(path)
    assert tok.encode("a  <X>  b") == [*tok.encode("a"), 3000, *tok.encode("b")]


def test_missing_or_broken_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.model"):
        Tokenizer.from_dir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer_dir, broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_dir(broken)
    (broken / "tokenizer_config.json").write_text("{}")
    (broken / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="cannot load"):
        Tokenizer.from_dir(broken)
