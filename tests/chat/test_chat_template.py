from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat.template import (
    ERNIE_VL_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    media_refs,
    render_chat,
)

IMG = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
VID = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}
PIC = "<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>"
MOV = "<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>"


def test_thinking_is_on_by_default() -> None:
    prompt = render_chat([{"role": "user", "content": "Hi"}])
    assert prompt == "<|begin_of_sentence|>User: Hi\nAssistant: <think>"


def test_thinking_off_closes_the_think_block() -> None:
    prompt = render_chat([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert prompt == "<|begin_of_sentence|>User: Hi\nAssistant: <think>\n\n</think>\n\n"


def test_no_generation_prompt() -> None:
    prompt = render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert prompt == "<|begin_of_sentence|>User: Hi"


def test_media_are_numbered_across_the_conversation() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "and"}, VID, IMG]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "text", "text": "This one?"}, IMG]},
    ]
    assert render_chat(messages, enable_thinking=False) == (
        "<|begin_of_sentence|>Be brief.\n"
        f"User: Picture 1:{PIC}andVideo 1:{MOV}Picture 2:{PIC}"
        "\nAssistant: Two cats.<|end_of_sentence|>"
        f"User: This one?Picture 3:{PIC}"
        "\nAssistant: <think>\n\n</think>\n\n"
    )
    assert [r.kind for r in media_refs(messages)] == ["image", "video", "image", "image"]
    assert media_refs(messages)[1].url == "https://example.com/v.mp4"


def test_assistant_reasoning_history() -> None:
    field = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "\nthink hard\n"},
    ]
    inline = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\nthink hard\n</think>\n\nA"},
    ]
    expected = (
        "<|begin_of_sentence|>User: Q"
        "\nAssistant: <think>\nthink hard\n</think>\n\nA<|end_of_sentence|>"
    )
    assert render_chat(field, add_generation_prompt=False) == expected
    assert render_chat(inline, add_generation_prompt=False) == expected
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    assert render_chat(parts, add_generation_prompt=False).endswith(
        "Assistant: A<|end_of_sentence|>"
    )
    none = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]
    assert render_chat(none, add_generation_prompt=False).endswith("Assistant: <|end_of_sentence|>")


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        ([{"role": "tool", "content": "x"}], "unsupported role 'tool'"),
        ([{"content": "x"}], "unsupported role None"),
        (["hi"], "must be an object"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "audio_url"}]}], "unsupported content part type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "needs 'image_url'"),
        ([{"role": "user", "content": ["plain"]}], "must be an object"),
        ([{"role": "system", "content": [IMG]}], "only user messages"),
        ([{"role": "assistant", "content": "a", "reasoning_content": 5}], "reasoning_content"),
    ],
)
def test_bad_messages_get_clear_errors(messages, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        render_chat(messages)


def test_template_errors_are_clear() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    raising = "{{ raise_exception('no system prompts here') }}"
    with pytest.raises(ChatTemplateError, match="no system prompts here"):
        render_chat([{"role": "user", "content": "x"}], template=raising)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages[0].content.nope() }}")


def test_sandbox_blocks_python_internals() -> None:
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "x"}], template=escape)


def test_model_dir_template_wins(tmp_path: Path) -> None:
    assert ChatTemplate.from_dir(tmp_path).source == ERNIE_VL_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "cfg"}))
    assert ChatTemplate.from_dir(tmp_path).source == "cfg"
    named = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "named"}]
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.from_dir(tmp_path).source == "named"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    template = ChatTemplate.from_dir(tmp_path)
    assert template.render([{"role": "user", "content": "hey"}]) == "hey!"
    assert render_chat([{"role": "user", "content": "hey"}], template=template) == "hey!"


def test_model_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="does not exist"):
        ChatTemplate.from_dir(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        ChatTemplate.from_dir(tmp_path)


def test_enable_thinking_reaches_checkpoint_templates() -> None:
    probe = "{{ enable_thinking }}|{{ chat_template_kwargs.enable_thinking }}"
    assert render_chat([{"role": "user", "content": "x"}], template=probe) == "True|True"
    off = render_chat([{"role": "user", "content": "x"}], template=probe, enable_thinking=False)
    assert off == "False|False"
