"""Backend logprobs ({token id: logprob} per token, sampled token first) in OpenAI's shapes."""

from __future__ import annotations

from collections.abc import Sequence

from chat.tokenizer import Tokenizer
from gateway.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

_MISSING = -9999.0  # JSON has no -inf; used only if a backend omits the sampled token


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one token, as OpenAI's logprobs report it."""
    added = tokenizer.added_token(token_id)
    raw = added.content.encode() if added else tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    # The sampled token leads the dict; it belongs in the top n only on its merit.
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def chat_logprobs(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, float]],
    top_n: int,
) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        text, raw = token_text(tokenizer, token_id)
        tops = []
        for top_id, value in _top(entry, top_n):
            top_text, top_raw = token_text(tokenizer, top_id)
            tops.append(TopLogprob(token=top_text, logprob=value, bytes=top_raw))
        logprob = entry.get(token_id, _MISSING)
        content.append(ChatTokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=tops))
    return ChatLogprobs(content=content)


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, float]],
    top_n: int,
    text_offset: int = 0,
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = text_offset
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        text, _ = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(entry.get(token_id, _MISSING))
        out.top_logprobs.append({token_text(tokenizer, t)[0]: v for t, v in _top(entry, top_n)})
        out.text_offset.append(offset)
        offset += len(text)
    return out
