"""`POST /v1/chat/completions`: messages → prompt ids (+ media) → choices, whole or as SSE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from chat.multimodal import expand_media
from chat.reasoning import ReasoningStatus
from chat.template import ChatTemplateError, MediaRef, media_refs
from chat.text_stream import TextOptions
from gateway.backend import EncodedMedia, GenerateRequest, MediaItem
from gateway.errors import InvalidRequestError, TooManyMediaError
from gateway.generation import (
    ChoiceDecoder,
    Run,
    TextDelta,
    choice_requests,
    open_choices,
)
from gateway.logprobs import chat_logprobs
from gateway.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    DeltaMessage,
)
from gateway.serving import (
    SSE_DONE,
    ServingContext,
    check_prompt_length,
    new_request_id,
    sampling_options,
    sse,
    sse_error,
    usage_of,
)

# Template kwargs the renderer sets itself.
_RESERVED_TEMPLATE_KWARGS = frozenset({"enable_thinking", "messages", "add_generation_prompt"})
# FastDeploy's per-video fields, read from a video part's `video_url` object.
_VIDEO_OVERRIDES = ("fps", "min_frames", "max_frames", "target_frames", "frames_sample")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]
    media: list[EncodedMedia]
    reasoning: ReasoningStatus


@dataclass
class ChatRun:
    """A started chat request: its prompt and the run generating its choices."""

    prompt: ChatPrompt
    run: Run


class ChatService:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def start(self, req: ChatCompletionRequest) -> ChatRun:
        """Validate, prepare and start generating; every refusal raises before output."""
        model = self.ctx.response_model(req.model)
        prompt = await self.prepare(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        check_prompt_length(len(prompt.token_ids), max_tokens, self.ctx.backend.max_model_len)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        base = GenerateRequest(
            new_request_id("chatcmpl"),
            prompt.token_ids,
            sampling_options(req, max_tokens, top_n),
            prompt.media,
        )
        started = await open_choices(self.ctx.backend, choice_requests(base, req.n))
        options = TextOptions(
            stop=req.stop_strings(),
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            reasoning=prompt.reasoning,
        )
        decoders = [ChoiceDecoder(i, self.ctx.tokenizer, options) for i in range(req.n)]
        run = Run(base.request_id, model, len(prompt.token_ids), started, decoders)
        return ChatRun(prompt, run)

    # -- prompt ---------------------------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest) -> ChatPrompt:
        try:
            refs = media_refs(req.messages)
        except ChatTemplateError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        media = await self._load_media(refs)
        kwargs = {
            k: v
            for k, v in (req.chat_template_kwargs or {}).items()
            if k not in _RESERVED_TEMPLATE_KWARGS
        }
        try:
            text = self.ctx.chat_template.render(
                req.messages, enable_thinking=req.enable_thinking, **kwargs
            )
        except ChatTemplateError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        ids = self.ctx.tokenizer.encode(text)
        if media:
            ids = self._expand(ids, media)
        return ChatPrompt(text, ids, media, ReasoningStatus.from_prompt_text(text))

    def _check_limits(self, refs: Sequence[MediaRef]) -> None:
        if refs and self.ctx.media_tokens is None:
            raise InvalidRequestError("this model takes text only", param="messages")
        for kind in ("image", "video"):
            count = sum(1 for r in refs if r.kind == kind)
            limit = self.ctx.limit_mm_per_prompt.get(kind)
            if limit is not None and count > limit:
                raise TooManyMediaError(
                    f"At most {limit} {kind}(s) may be provided in one request "
                    f"(--limit-mm-per-prompt); got {count}",
                    param="messages",
                )

    async def _load_media(self, refs: Sequence[MediaRef]) -> list[EncodedMedia]:
        self._check_limits(refs)
        if not refs:
            return []
        for ref in refs:
            if ref.url is None:
                raise InvalidRequestError(f"a {ref.kind} part needs a URL", param="messages")
        blobs = await asyncio.gather(
            *(self.ctx.media_fetcher.fetch(r.url or "", r.kind) for r in refs)
        )
        items = [
            MediaItem(r.kind, data, _video_overrides(r))
            for r, data in zip(refs, blobs, strict=True)
        ]
        return list(await asyncio.gather(*(self.ctx.backend.encode_media(i) for i in items)))

    def _expand(self, ids: list[int], media: Sequence[EncodedMedia]) -> list[int]:
        assert self.ctx.media_tokens is not None  # _check_limits refused media otherwise
        try:
            expanded = expand_media(
                ids,
                self.ctx.media_tokens,
                image_grids=[m.grid for m in media if m.kind == "image"],
                video_grids=[m.grid for m in media if m.kind == "video"],
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        return expanded.token_ids

    # -- responses ------------------------------------------------------------------------

    async def collect(self, chat: ChatRun, req: ChatCompletionRequest) -> ChatCompletionResponse:
        run = chat.run
        await run.run_to_end()
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        choices = []
        for d in run.decoders:
            message = ChatMessage(content=d.content, reasoning_content=d.reasoning)
            if req.return_token_ids:
                message.prompt_token_ids = chat.prompt.token_ids
                message.completion_token_ids = d.token_ids
            logprobs = None
            if top_n is not None:
                logprobs = chat_logprobs(self.ctx.tokenizer, d.token_ids, d.logprobs, top_n)
            choices.append(
                ChatChoice(
                    index=d.index,
                    message=message,
                    logprobs=logprobs,
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )
            )
        usage = usage_of(run.num_prompt_tokens, run.decoders)
        return ChatCompletionResponse(
            id=run.request_id, model=run.model, choices=choices, usage=usage
        )

    async def stream(self, chat: ChatRun, req: ChatCompletionRequest) -> AsyncGenerator[str, None]:
        """SSE events: a role chunk per choice, text chunks, optional usage, [DONE]."""
        run = chat.run
        top_n = (req.top_logprobs or 0) if req.logprobs else None

        def chunk(choices: list[ChatChunkChoice]) -> str:
            return sse(
                ChatCompletionChunk(
                    id=run.request_id, model=run.model, choices=choices
                ).model_dump()
            )

        try:
            for d in run.decoders:
                delta = DeltaMessage(role="assistant", content="")
                if req.return_token_ids:
                    delta.prompt_token_ids = chat.prompt.token_ids
                yield chunk([ChatChunkChoice(index=d.index, delta=delta)])
            async with aclosing(run.deltas()) as deltas:
                async for td in deltas:
                    choice = self._chunk_choice(td, req.return_token_ids, top_n)
                    if choice is not None:
                        yield chunk([choice])
            if req.include_usage:
                usage = usage_of(run.num_prompt_tokens, run.decoders)
                yield sse(
                    ChatCompletionChunk(
                        id=run.request_id, model=run.model, choices=[], usage=usage
                    ).model_dump()
                )
        except Exception as exc:  # the status line is gone: report in-band
            yield sse_error(exc)
        yield SSE_DONE

    def _chunk_choice(
        self, td: TextDelta, return_token_ids: bool, top_n: int | None
    ) -> ChatChunkChoice | None:
        # A token that completes no text yet still owes its logprobs / id to the client.
        owes_tokens = td.token_ids and (return_token_ids or top_n is not None)
        if not (td.reasoning or td.content or td.finish_reason or owes_tokens):
            return None
        delta = DeltaMessage(content=td.content or None, reasoning_content=td.reasoning or None)
        if return_token_ids:
            delta.completion_token_ids = td.token_ids
        logprobs = None
        if top_n is not None and td.logprobs:
            logprobs = chat_logprobs(self.ctx.tokenizer, td.token_ids, td.logprobs, top_n)
        return ChatChunkChoice(
            index=td.index,
            delta=delta,
            logprobs=logprobs,
            finish_reason=td.finish_reason,
            stop_reason=td.stop_reason,
        )


def _video_overrides(ref: MediaRef) -> dict[str, object]:
    if ref.kind != "video":
        return {}
    spec = ref.part.get("video_url")
    source = spec if isinstance(spec, dict) else ref.part
    return {k: source[k] for k in _VIDEO_OVERRIDES if k in source}
