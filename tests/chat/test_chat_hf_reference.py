"""chat/ against HF transformers as an independent reference (tokenizer, template).

The HF tokenizer is the `tokenizers`-backed LlamaTokenizer that transformers converts
from the same tokenizer.model, a separate implementation of SentencePiece BPE.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chat.template import ChatTemplate, render_chat
from chat.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

SAMPLES = [
    "Hello world, 12345!",
    "你好，世界。今天天气很好🙂",
    "  def f(x):\n\treturn x + 1\n",
    "emoji 👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ｆｕｌｌ ｗｉｄｔｈ",
    " ",
    "价格：$12.50（打八折）——明天截止！",
]
CORPUS = Path(__file__).resolve().parents[2] / "chat" / "corpus"


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


def varied_texts() -> list[str]:
    rng = random.Random(7)
    corpus = "".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt")))
    texts = list(SAMPLES)
    texts += [corpus[i : i + rng.randrange(1, 300)] for i in rng.sample(range(len(corpus)), 150)]
    alphabet = "ab 你好\n\t🙂<>|/thinkIMAGE_START€é"
    texts += [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(150)
    ]
    texts += [
        "<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>hi",
        "a<s>b</s>c<unk>d<mask:3>",
        "<think>\nreasoning\n</think>\n\nanswer",
    ]
    return texts


def test_encode_matches_hf(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for text in varied_texts():
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text


def test_decode_matches_hf(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for text in varied_texts():
        ids = tokenizer.encode(text)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


def test_added_tokens_beyond_vocab_match_hf(tokenizer_variant) -> None:
    path = tokenizer_variant(
        {
            3000: {"content": "<|VIDEO_PLACEHOLDER|>"},
            3001: {"content": "<|LOC_7|>", "special": False},
        },
    )
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.vocab_size == len(hf)
    for text in (
        "x<|LOC_7|>y<|VIDEO_PLACEHOLDER|>z",
        "<|LOC_7|><|LOC_7|>你好",
        "<|VIDEO_PLACEHOLDER",
    ):
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(
            ids, skip_special_tokens=True
        )


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "text", "text": "Compare with"},
            {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        ],
    },
    {"role": "assistant", "content": "They match.", "reasoning_content": "Both show a cat."},
    {"role": "user", "content": "Sure?"},
]


@pytest.mark.parametrize("thinking", [True, False])
def test_template_renders_as_in_hf(tokenizer_dir: Path, hf_tokenizer, thinking: bool) -> None:
    ours = render_chat(MESSAGES, enable_thinking=thinking)
    theirs = hf_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    assert ours == theirs
    assert ChatTemplate.from_dir(tokenizer_dir).render(MESSAGES, enable_thinking=thinking) == ours
