"""The offline `LLM` API on the embedded model: prompt forms, n, stop strings, chat."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny-ernie-vl", device="cpu", dtype="float32")


def test_prompt_forms_and_greedy_determinism(llm: LLM) -> None:
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = llm.tokenizer.encode("Hello there")
    text_out, ids_out = llm.generate(["Hello there", {"prompt_token_ids": ids}], params)
    assert text_out.prompt_token_ids == ids
    assert text_out.outputs[0].token_ids == ids_out.outputs[0].token_ids
    assert len(text_out.outputs[0].token_ids) == 6
    assert text_out.outputs[0].finish_reason == "length"
    assert text_out.outputs[0].text == llm.tokenizer.decode(
        text_out.outputs[0].token_ids, skip_special_tokens=True
    )


def test_n_completions_with_seed_differ_and_repeat(llm: LLM) -> None:
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    first = llm.generate("Once upon a time", params)[0].outputs
    again = llm.generate("Once upon a time", params)[0].outputs
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1


def test_stop_string_truncates_and_finishes(llm: LLM) -> None:
    free = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    text = free[0].outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(
        "abc", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and text.startswith(out.text)
    assert llm.engine.num_used_blocks == 0


def test_chat_with_image_and_clear_errors(llm: LLM) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "what?"},
            ],
        }
    ]
    out = llm.chat(
        messages,
        SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
        chat_template_kwargs={"enable_thinking": False},
    )[0]
    image_id = llm.tokenizer.token_to_id("<|IMAGE_PLACEHOLDER|>")
    assert out.prompt_token_ids.count(image_id) > 0
    assert len(out.outputs[0].token_ids) == 3
    bad = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}],
        }
    ]
    with pytest.raises(ValueError, match="offline LLM"):
        llm.chat(bad)
