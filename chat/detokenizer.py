"""Incremental detokenizer: token ids in one at a time, text deltas out.

The deltas concatenate to exactly `tokenizer.decode(all_ids)`. Byte-fallback tokens
that form one multi-byte UTF-8 character (Chinese, emoji) are held back until the
character is complete, so a delta never carries half a character; invalid or
unfinished byte runs become U+FFFD exactly as the full decode makes them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from chat.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas (one instance per sequence)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._num_tokens = 0
        self._text: list[str] = []

    @property
    def num_tokens(self) -> int:
        """Tokens consumed so far."""
        return self._num_tokens

    @property
    def text(self) -> str:
        """Text emitted so far (held-back bytes not included)."""
        return "".join(self._text)

    def add_token(self, token_id: int) -> str:
        """Consume one token id; return the text it completes (possibly empty)."""
        added = self._tokenizer.added_token(token_id)
        if added is None:
            delta = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        else:
            # An added token ends any byte run, as in Tokenizer.decode.
            delta = self._decoder.decode(b"", final=True)
            self._decoder.reset()
            if not (self._skip_special_tokens and added.special):
                delta += added.content
        self._num_tokens += 1
        if delta:
            self._text.append(delta)
        return delta

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Consume several ids; return their combined delta."""
        return "".join(self.add_token(t) for t in token_ids)

    def finish(self) -> str:
        """Flush held-back bytes at end of sequence (incomplete ones become U+FFFD)."""
        delta = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        if delta:
            self._text.append(delta)
        return delta
