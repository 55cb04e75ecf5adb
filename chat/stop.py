"""Stop strings for streamed text.

The output stops as soon as any stop string is complete, i.e. at the earliest *end*
position among matches (ties go to the longest string, which starts earliest). That
rule gives the same answer whether the text arrives in one piece or in deltas of any
size. A delta never carries part of a stop string: the longest tail of the text that
could still grow into one is held back until the next delta (or `finish`) settles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopUpdate:
    """Result of feeding one delta.

    text: what may be emitted now. stopped: a stop string completed. stop_str: which
    one. truncate_at: length of the final output text (in characters) once stopped.
    """

    text: str
    stopped: bool = False
    stop_str: str | None = None
    truncate_at: int | None = None


class StopStringMatcher:
    """Watches a growing output text for stop strings (one instance per sequence)."""

    def __init__(self, stop: Sequence[str], *, include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stop = tuple(dict.fromkeys(stop))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._text = ""
        self._emitted = 0
        self._result: StopUpdate | None = None

    @property
    def stopped(self) -> bool:
        return self._result is not None

    @property
    def output_text(self) -> str:
        """The output so far, truncated at the stop point once stopped."""
        if self._result is not None and self._result.truncate_at is not None:
            return self._text[: self._result.truncate_at]
        return self._text

    def _find(self, scan_from: int) -> tuple[int, int, str] | None:
        """(start, end, stop_str) of the match that completes first, if any."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            start = self._text.find(s, max(0, scan_from - len(s) + 1))
            if start < 0:
                continue
            end = start + len(s)
            if best is None or end < best[1] or (end == best[1] and start < best[0]):
                best = (start, end, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest text tail that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for size in range(min(len(s) - 1, len(self._text) - self._emitted), longest, -1):
                if s.startswith(self._text[-size:]):
                    longest = size
                    break
        return longest

    def feed(self, delta: str) -> StopUpdate:
        """Add a delta; return the text that is safe to emit and whether we stopped."""
        if self._result is not None:
            return StopUpdate("", True, self._result.stop_str, self._result.truncate_at)
        scan_from = len(self._text)
        self._text += delta
        match = self._find(scan_from)
        if match is not None:
            start, end, stop_str = match
            cut = end if self.include_stop_str_in_output else start
            text = self._text[self._emitted : cut]
            self._emitted = cut
            self._result = StopUpdate("", True, stop_str, cut)
            return StopUpdate(text, True, stop_str, cut)
        safe = len(self._text) - self._held_back()
        text = self._text[self._emitted : safe]
        self._emitted = safe
        return StopUpdate(text)

    def finish(self) -> str:
        """End of output without a stop: release the held-back tail."""
        if self._result is not None:
            return ""
        text = self._text[self._emitted :]
        self._emitted = len(self._text)
        return text


def truncate_at_stop(
    text: str, stop: Sequence[str], *, include_stop_str_in_output: bool = False
) -> tuple[str, str | None]:
    """Non-streaming: (text cut at the first completed stop string, that string or None)."""
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include_stop_str_in_output)
    update = matcher.feed(text)
    return matcher.output_text, update.stop_str
