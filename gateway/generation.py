"""From backend token deltas to text deltas, one choice at a time, and n choices at once.

`ChoiceDecoder` is one choice of a response: a `chat.text_stream.TextStream` (incremental
detokenizer → stop strings → reasoning split, the very code decode_svc runs) plus what the
response needs beside the text: its index, logprobs, usage counters and why it stopped.
`open_choices` starts n backend streams (one per choice, so n > 1 works the same on any
backend) and waits for each to produce its first delta, so a request the backend refuses
fails before any HTTP header is sent. `merge_choices` interleaves them. Every backend
stream is closed on exit (normal end, stop string, error or cancellation), which is how a
stop string or a client disconnect cancels the request in the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from chat.text_stream import TextChunk, TextOptions, TextStream
from chat.tokenizer import Tokenizer
from gateway.backend import Backend, GenerateDelta, GenerateRequest
from gateway.protocol import StopReason


@dataclass
class TextDelta:
    """What one choice adds to the response in one step."""

    index: int
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: StopReason = None
    """Set with `finish_reason` when a stop string or a stop token ended the choice."""


class ChoiceDecoder:
    """Tokens → (reasoning, content) text for one choice, with its counters."""

    def __init__(self, index: int, tokenizer: Tokenizer, options: TextOptions) -> None:
        self.index = index
        self._text = TextStream(tokenizer, options)
        self.logprobs: list[dict[int, float]] = []
        self.reasoning_text: list[str] = []
        self.content_text: list[str] = []
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.stop_reason: StopReason = None

    @property
    def token_ids(self) -> list[int]:
        return self._text.token_ids

    @property
    def num_reasoning_tokens(self) -> int:
        return self._text.num_reasoning_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._text.finish_reason

    def feed(self, delta: GenerateDelta) -> TextDelta:
        """Consume one backend delta; `finish_reason` is set once this choice is done."""
        out = TextDelta(self.index, token_ids=list(delta.token_ids), logprobs=delta.logprobs)
        if self.finish_reason is not None:
            return out
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self.logprobs.extend(delta.logprobs or ())
        chunk = self._text.feed(
            delta.token_ids, finished=delta.finished, finish_reason=delta.finish_reason
        )
        if chunk.finish_reason is not None:
            self.stop_reason = self._stop_reason(chunk, delta)
        out.reasoning, out.content = chunk.reasoning, chunk.content
        out.finish_reason, out.stop_reason = chunk.finish_reason, self.stop_reason
        self.reasoning_text.append(out.reasoning)
        self.content_text.append(out.content)
        return out

    def _stop_reason(self, chunk: TextChunk, delta: GenerateDelta) -> StopReason:
        if chunk.stop_str is not None:
            return chunk.stop_str
        # The engine finishes 'stop' only on the token that ended it (EOS or a
        # stop_token_ids entry), which is then the choice's last token.
        if delta.finished and delta.finish_reason == "stop" and self.token_ids:
            return self.token_ids[-1]
        return None

    @property
    def reasoning(self) -> str | None:
        """The whole reasoning text; None when the output had no reasoning part."""
        return "".join(self.reasoning_text) if self._text.saw_reasoning else None

    @property
    def content(self) -> str:
        return "".join(self.content_text)


def choice_requests(base: GenerateRequest, n: int) -> list[GenerateRequest]:
    """One backend request per choice; a seed moves by the choice index so choices differ
    yet the whole response stays reproducible."""
    out = []
    for i in range(n):
        sampling = base.sampling
        if sampling.seed is not None and i:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63)
        out.append(
            dataclasses.replace(base, request_id=f"{base.request_id}-{i}", sampling=sampling)
        )
    return out


@dataclass
class StartedChoice:
    """A backend stream whose first delta has arrived (so the backend accepted it)."""

    request: GenerateRequest
    first: GenerateDelta
    stream: AsyncGenerator[GenerateDelta, None]

    async def close(self) -> None:
        """Cancel in the backend (a no-op once the stream has ended)."""
        await self.stream.aclose()


async def _start(backend: Backend, request: GenerateRequest) -> StartedChoice:
    stream = backend.generate(request)
    try:
        return StartedChoice(request, await anext(stream), stream)
    except BaseException:
        await stream.aclose()
        raise


async def open_choices(
    backend: Backend, requests: Sequence[GenerateRequest]
) -> list[StartedChoice]:
    """Start every request; raise the first failure (closing the others) before any
    output is sent."""
    results = await asyncio.gather(*(_start(backend, r) for r in requests), return_exceptions=True)
    started = [r for r in results if isinstance(r, StartedChoice)]
    for r in results:
        if isinstance(r, BaseException):
            for s in started:
                await s.close()
            raise r
    return started


async def decode_choice(
    started: StartedChoice, decoder: ChoiceDecoder
) -> AsyncGenerator[TextDelta, None]:
    """Text deltas of one choice; returning early (stop string) closes the backend stream."""
    async with aclosing(started.stream) as stream:
        out = decoder.feed(started.first)
        yield out
        if out.finish_reason is not None:
            return
        async for delta in stream:
            out = decoder.feed(delta)
            yield out
            if out.finish_reason is not None:
                return


async def merge_choices(
    streams: Sequence[AsyncGenerator[TextDelta, None]],
) -> AsyncGenerator[TextDelta, None]:
    """Interleave several choices' deltas as they come; closes all of them on exit."""
    if len(streams) == 1:
        async with aclosing(streams[0]):
            async for item in streams[0]:
                yield item
        return
    queue: asyncio.Queue[TextDelta | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[TextDelta, None]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            got = await queue.get()
            if got is None:
                remaining -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Run:
    """A started request: its choices' backend streams and the decoders reading them."""

    request_id: str
    model: str
    num_prompt_tokens: int
    started: list[StartedChoice]
    decoders: list[ChoiceDecoder]

    async def deltas(self) -> AsyncGenerator[TextDelta, None]:
        """Every choice's text deltas as they come; closing this cancels the rest."""
        try:
            choices = [
                decode_choice(s, d) for s, d in zip(self.started, self.decoders, strict=True)
            ]
            async with aclosing(merge_choices(choices)) as merged:
                async for item in merged:
                    yield item
        finally:
            await self.close()

    async def run_to_end(self) -> None:
        async with aclosing(self.deltas()) as deltas:
            async for _ in deltas:
                pass

    async def close(self) -> None:
        for s in self.started:
            await s.close()
