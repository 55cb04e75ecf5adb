"""The text side of one completion: token ids in, (reasoning, content) text deltas out.

Incremental detokenizer → stop strings → reasoning split (`ernie-45-vl`), with the
counters usage needs. Torch-free, so the gateway (`gateway.generation.ChoiceDecoder`, over
any backend) and decode_svc (text in `Decode.Generate` deltas, for clients that ask for
it) run the very same code. A stop string never leaks
partially: the matcher holds back any tail that could still grow into one, and a marker
such as "</thi" is held back until the next delta settles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from chat.detokenizer import IncrementalDetokenizer
from chat.reasoning import ReasoningStatus, ReasoningStream
from chat.stop import StopStringMatcher
from chat.tokenizer import Tokenizer


@dataclass(frozen=True)
class TextOptions:
    """How a choice's tokens become text."""

    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    reasoning: ReasoningStatus | None = None
    """None = no reasoning parser (completions): everything is content."""


@dataclass
class TextChunk:
    """What one batch of tokens adds to the output."""

    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    """Set once the output is done ('stop' for a stop string, else the engine's reason)."""
    stop_str: str | None = None
    """The stop string that ended the output, if one did."""
    token_ids: list[int] = field(default_factory=list)


class TextStream:
    """Tokens → (reasoning, content) text for one sequence, with its counters."""

    def __init__(self, tokenizer: Tokenizer, options: TextOptions) -> None:
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
        self.num_reasoning_tokens = 0
        self.finish_reason: str | None = None

    @property
    def saw_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.saw_reasoning

    def feed(
        self, token_ids: Sequence[int], *, finished: bool = False, finish_reason: str | None = None
    ) -> TextChunk:
        """Consume new tokens; `finished` when the engine ended the sequence with them."""
        out = TextChunk(token_ids=list(token_ids))
        if self.finish_reason is not None:
            return out
        self._count_tokens(token_ids)
        text = self._detok.add_tokens(token_ids)
        if finished:
            text += self._detok.finish()
        update = self._stop.feed(text)
        text = update.text
        if update.stopped:
            self.finish_reason = "stop"
            out.stop_str = update.stop_str
        elif finished:
            text += self._stop.finish()
            self.finish_reason = finish_reason or "stop"
        out.reasoning, out.content = self._split(text, final=self.finish_reason is not None)
        out.finish_reason = self.finish_reason
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
