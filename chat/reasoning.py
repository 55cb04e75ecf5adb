"""Reasoning parser `ernie-45-vl`: split model output into reasoning and answer.

FastDeploy's semantics: the prompt decides where the output starts. If the last of
`<think>` / `</think>` in the prompt is `<think>` (the template's thinking-on generation
prompt ends with it), the output starts inside the reasoning and `</think>` ends it;
otherwise the whole output is content and reasoning is None. Output cut off before
`</think>` (max_tokens) stays reasoning. As a courtesy to templates that leave the
opening tag to the model, output that itself starts with `<think>` enters reasoning.

Streaming never emits part of a marker: a delta ending in "</thi" holds those
characters back until the next delta shows whether they are a marker.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

THINK_START = "<think>"
THINK_END = "</think>"
PARSER_NAMES = ("ernie-45-vl",)


class ReasoningStatus(enum.Enum):
    """Where the model's output starts."""

    THINKING = "thinking"
    RESPONDING = "responding"

    @classmethod
    def from_prompt_text(cls, prompt: str) -> ReasoningStatus:
        """Status from the rendered prompt text."""
        return (
            cls.THINKING if prompt.rfind(THINK_START) > prompt.rfind(THINK_END) else cls.RESPONDING
        )

    @classmethod
    def from_prompt_ids(
        cls, prompt_ids: Sequence[int], think_start_id: int, think_end_id: int
    ) -> ReasoningStatus:
        """Status from prompt token ids (the last think marker wins)."""
        for token_id in reversed(prompt_ids):
            if token_id == think_start_id:
                return cls.THINKING
            if token_id == think_end_id:
                return cls.RESPONDING
        return cls.RESPONDING


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def split_reasoning(text: str, status: ReasoningStatus) -> tuple[str | None, str]:
    """Non-streaming split of a full output into (reasoning or None, content)."""
    if status is ReasoningStatus.RESPONDING:
        if not text.startswith(THINK_START):
            return None, text
        text = text[len(THINK_START) :]
    reasoning, found, content = text.partition(THINK_END)
    return reasoning, content if found else ""


class _Phase(enum.Enum):
    OPENING = "opening"  # responding, but the output may still start with <think>
    REASONING = "reasoning"
    CONTENT = "content"


class ReasoningStream:
    """Streaming splitter: `feed(delta)` -> (reasoning_delta, content_delta)."""

    def __init__(self, status: ReasoningStatus) -> None:
        self.status = status
        self._phase = _Phase.REASONING if status is ReasoningStatus.THINKING else _Phase.OPENING
        self._held = ""
        self.saw_reasoning = status is ReasoningStatus.THINKING

    @property
    def in_reasoning(self) -> bool:
        """Whether the text seen so far is still inside the reasoning."""
        return self._phase is _Phase.REASONING

    def feed(self, delta: str) -> tuple[str, str]:
        """Consume a text delta; return what can be emitted as (reasoning, content)."""
        text = self._held + delta
        self._held = ""
        if self._phase is _Phase.OPENING:
            if THINK_START.startswith(text) and len(text) < len(THINK_START):
                self._held = text  # might still become <think>
                return "", ""
            if not text.startswith(THINK_START):
                self._phase = _Phase.CONTENT
                return "", text
            self._phase = _Phase.REASONING
            self.saw_reasoning = True
            text = text[len(THINK_START) :]
        if self._phase is _Phase.CONTENT:
            return "", text
        reasoning, found, content = text.partition(THINK_END)
        if found:
            self._phase = _Phase.CONTENT
            return reasoning, content
        keep = _partial_suffix(text, THINK_END)
        if keep:
            self._held = text[-keep:]
            text = text[:-keep]
        return text, ""

    def finish(self) -> tuple[str, str]:
        """End of output: release held-back text to the channel it was in."""
        held, self._held = self._held, ""
        if self._phase is _Phase.REASONING:
            return held, ""
        return "", held


class ReasoningParser:
    """The `--reasoning-parser ernie-45-vl` parser: status from the prompt, then split."""

    def __init__(self, name: str = "ernie-45-vl") -> None:
        if name not in PARSER_NAMES:
            raise ValueError(f"unknown reasoning parser {name!r}; available: {PARSER_NAMES}")
        self.name = name

    def status(self, prompt: str) -> ReasoningStatus:
        return ReasoningStatus.from_prompt_text(prompt)

    def split(self, text: str, status: ReasoningStatus) -> tuple[str | None, str]:
        return split_reasoning(text, status)

    def stream(self, status: ReasoningStatus) -> ReasoningStream:
        return ReasoningStream(status)
