"""ERNIE-4.5-VL chat template: OpenAI-style messages -> prompt text.

The built-in template reproduces the prompt format of baidu/ERNIE-4.5-VL-28B-A3B
(the `chat_template` its checkpoints ship and HF's conversion script keeps):

    <|begin_of_sentence|>{system}\\n
    User: {text, with "Picture N:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>" per image}
    \\nAssistant: {reasoning/answer}<|end_of_sentence|>
    ...
    \\nAssistant: <think>                      (generation prompt, thinking on)
    \\nAssistant: <think>\\n\\n</think>\\n\\n   (generation prompt, thinking off)

Images and videos are numbered across the whole conversation. Thinking is on by
default here (FastDeploy's serving default); the checkpoint's own template treats a
missing `enable_thinking` as off, which is why we always pass it explicitly.
A model directory's own template (chat_template.jinja, chat_template.json or
tokenizer_config.json) takes precedence when present: see `ChatTemplate.from_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
TEXT_PART_TYPES = ("text",)
IMAGE_PART_TYPES = ("image_url", "image")
VIDEO_PART_TYPES = ("video_url", "video")
PART_TYPES = TEXT_PART_TYPES + IMAGE_PART_TYPES + VIDEO_PART_TYPES

ERNIE_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}\n"
    "{%- set video_count = namespace(value=0) -%}\n"
    "{%- macro text_of(field) -%}\n"
    "  {%- if field is string -%}{{ field }}\n"
    "  {%- elif field is iterable -%}\n"
    "    {%- for part in field if part.type == 'text' -%}{{ part.text }}{%- endfor -%}\n"
    "  {%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{{- '<|begin_of_sentence|>' -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message.role in ['system', 'user'] -%}\n"
    "    {%- if message.role == 'user' -%}{{- 'User: ' -}}{%- endif -%}\n"
    "    {%- if message.content is string -%}{{- message.content -}}\n"
    "    {%- else -%}\n"
    "      {%- for part in message.content -%}\n"
    "        {%- if part.type == 'text' -%}{{- part.text -}}\n"
    "        {%- elif part.type in ['image_url', 'image'] -%}\n"
    "          {%- set image_count.value = image_count.value + 1 -%}\n"
    "          {{- 'Picture ' ~ image_count.value"
    " ~ ':<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>' -}}\n"
    "        {%- elif part.type in ['video_url', 'video'] -%}\n"
    "          {%- set video_count.value = video_count.value + 1 -%}\n"
    "          {{- 'Video ' ~ video_count.value"
    " ~ ':<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>' -}}\n"
    "        {%- endif -%}\n"
    "      {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {%- if message.role == 'system' -%}{{- '\\n' -}}{%- endif -%}\n"
    "  {%- elif message.role == 'assistant' -%}\n"
    "    {%- set reasoning = text_of(message.reasoning_content) -%}\n"
    "    {%- set content = text_of(message.content) -%}\n"
    "    {%- if '</think>' in content -%}\n"
    "      {%- set reasoning = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') -%}\n"
    "      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}\n"
    "    {%- endif -%}\n"
    "    {%- if reasoning -%}\n"
    "      {{- '\\nAssistant: <think>\\n' ~ reasoning.strip('\\n') ~ '\\n</think>\\n\\n'"
    " ~ content.lstrip('\\n') -}}\n"
    "    {%- else -%}{{- '\\nAssistant: ' ~ content -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|end_of_sentence|>' -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}\n"
    "  {{- '\\nAssistant: ' -}}\n"
    "  {%- if enable_thinking is defined and enable_thinking -%}{{- '<think>' -}}\n"
    "  {%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}\n"
    "  {%- endif -%}\n"
    "{%- endif -%}\n"
)


class ChatTemplateError(ValueError):
    """A message list or template the renderer cannot turn into a prompt."""


@dataclass(frozen=True)
class MediaRef:
    """One image or video part, in the order its placeholder appears in the prompt."""

    kind: Literal["image", "video"]
    url: str | None
    part: Mapping[str, Any]


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # Same environment settings as HF's apply_chat_template, so checkpoint
    # templates render here exactly as they do there.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def _part_url(part: Mapping[str, Any], key: str) -> str | None:
    value = part.get(key)
    if isinstance(value, Mapping):
        value = value.get("url")
    return value if isinstance(value, str) else None


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, Mapping):
        raise ChatTemplateError(f"{where}: a content part must be an object, got {type(part)}")
    kind = part.get("type")
    if kind not in PART_TYPES:
        raise ChatTemplateError(
            f"{where}: unsupported content part type {kind!r}; use {PART_TYPES}"
        )
    if kind == "text" and not isinstance(part.get("text"), str):
        raise ChatTemplateError(f"{where}: a text part needs a string 'text'")
    if kind in ("image_url", "video_url") and _part_url(part, kind) is None:
        raise ChatTemplateError(f"{where}: a {kind} part needs '{kind}': {{'url': ...}}")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check roles and content parts; return plain-dict copies ready for rendering."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role', 'content'} objects")
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where} must be an object, got {type(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"{where}: unsupported role {role!r}; use one of {ROLES}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatTemplateError(f"{where}: reasoning_content must be a string")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            pass
        elif isinstance(content, Sequence):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
            if role != "user" and any(p["type"] not in TEXT_PART_TYPES for p in content):
                raise ChatTemplateError(f"{where}: only user messages may carry images or videos")
            content = [dict(p) for p in content]
        else:
            raise ChatTemplateError(f"{where}: content must be a string or a list of parts")
        checked.append({**message, "content": content})
    return checked


def media_refs(messages: Sequence[Mapping[str, Any]]) -> list[MediaRef]:
    """Image/video parts in prompt order (the order their placeholders are rendered)."""
    refs = []
    for message in validate_messages(messages):
        content = message["content"]
        for part in content if isinstance(content, list) else ():
            if part["type"] in IMAGE_PART_TYPES:
                refs.append(MediaRef("image", _part_url(part, "image_url"), part))
            elif part["type"] in VIDEO_PART_TYPES:
                refs.append(MediaRef("video", _part_url(part, "video_url"), part))
    return refs


def _template_from_config(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's named-template form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A compiled chat template; `render` turns validated messages into prompt text."""

    def __init__(self, source: str = ERNIE_VL_CHAT_TEMPLATE) -> None:
        self.source = source
        self._template = _compile(source)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """The model directory's own template if it ships one, else the built-in ERNIE one."""
        root = Path(model_dir)
        if not root.is_dir():
            raise ChatTemplateError(f"model directory {root} does not exist")
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"))
        for name in ("chat_template.json", "tokenizer_config.json"):
            path = root / name
            if not path.is_file():
                continue
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ChatTemplateError(f"{path} is not valid JSON: {exc}") from exc
            if isinstance(config, Mapping) and (template := _template_from_config(config)):
                return cls(template)
        return cls()

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render messages to the prompt string (not yet tokenized or expanded)."""
        checked = validate_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                chat_template_kwargs={"enable_thinking": enable_thinking, **template_kwargs},
                **template_kwargs,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    template: str | ChatTemplate | None = None,
) -> str:
    """Render OpenAI-style messages with `template` (default: the ERNIE-4.5-VL one)."""
    if template is None:
        chat_template = ChatTemplate()
    elif isinstance(template, ChatTemplate):
        chat_template = template
    else:
        chat_template = ChatTemplate(template)
    return chat_template.render(
        messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )
