"""From backend token deltas to text deltas, one choice at a time, and n choices at once.

`ChoiceDecoder` is the text side of one completion: incremental detokenizer → stop strings
→ reasoning split. `open_choices` starts n backend streams (one per choice, so n > 1 works
the same on any backend) and waits for each to produce its first delta, so a request the
backend refuses fails before any HTTP header is sent. `merge_choices` interleaves them.
Every backend stream is closed on exit (normal end, stop string, error or cancellation),
which is how a stop string or a client disconnect cancels the request in the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from chat.detokenizer import IncrementalDetokenizer
from chat.reasoning import ReasoningStatus, ReasoningStream
from chat.stop import StopStringMatcher
from chat.tokenizer import Tokenizer
from gateway.backend import Backend, GenerateDelta, GenerateRequest


@dataclass
class TextDelta:
    """What one choice adds to the response in one step."""

    index: int
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class TextOptions:
    """How a choice's tokens become text."""

    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    reasoning: ReasoningStatus | None = None
    """None = no reasoning parser (completions): everything is content."""


class ChoiceDecoder:
    """Tokens → (reasoning, content) text for one choice, with its counters."""

    def __init__(self, index: int, tokenizer: Tokenizer, options: TextOptions) -> None:
        self.index = index
        self._detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=options.skip_special_tokens
        )
        self._stop = StopStringMatcher(
            options.stop, include_stop_str_in_output=options.include_stop_str_in_output
        )
        status = options.reasoning
        self._reasoning = ReasoningStream(status) if status is not None else None
        self._counting_reasoning = status is ReasoningStatus.THINKING
        self._think_end_id = tokenizer.token_to_id("</think>")
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.reasoning_text: list[str] = []
        self.content_text: list[str] = []
        self.num_reasoning_tokens = 0
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None

    @property
    def saw_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.saw_reasoning

    def feed(self, delta: GenerateDelta) -> TextDelta:
        """Consume one backend delta; `finish_reason` is set once this choice is done."""
        out = TextDelta(self.index, token_ids=list(delta.token_ids), logprobs=delta.logprobs)
        if self.finish_reason is not None:
            return out
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self._count_tokens(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        text = self._detok.add_tokens(delta.token_ids)
        if delta.finished:
            text += self._detok.finish()
        update = self._stop.feed(text)
        text = update.text
        if update.stopped:
            self.finish_reason = "stop"
        elif delta.finished:
            text += self._stop.finish()
            self.finish_reason = delta.finish_reason or "stop"
        out.reasoning, out.content = self._split(text, final=self.finish_reason is not None)
        out.finish_reason = self.finish_reason
        self.reasoning_text.append(out.reasoning)
        self.content_text.append(out.content)
        return out

    def _count_tokens(self, token_ids: Sequence[int]) -> None:
        self.token_ids.extend(token_ids)
        for token_id in token_ids:
            if not self._counting_reasoning:
                break
            if token_id == self._think_end_id:
                self._counting_reasoning = False
            else:
                self.num_reasoning_tokens += 1

    def _split(self, text: str, *, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        reasoning, content = self._reasoning.feed(text)
        if final:
            more_reasoning, more_content = self._reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return reasoning, content

    @property
    def reasoning(self) -> str | None:
        """The whole reasoning text; None when the output had no reasoning part."""
        return "".join(self.reasoning_text) if self.saw_reasoning else None

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
