"""ERNIE tokenizer: SentencePiece model plus added tokens, loaded from a checkpoint directory.

A checkpoint ships `tokenizer.model` (SentencePiece, byte fallback) and lists its added
tokens in tokenizer_config.json (`added_tokens_decoder`) and/or added_tokens.json. Added
tokens may live inside the SentencePiece vocabulary (user-defined pieces) or beyond it
(the real ERNIE vocabulary is 103424 ids, larger than its .model file).

Encoding splits the text on added tokens first (leftmost, longest match, as HF does) and
runs SentencePiece on the pieces between them. Decoding maps every id to bytes (byte
pieces to their byte, normal pieces with U+2581 as a space) and decodes UTF-8, so
decode(encode(x)) == x for any text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

SPACE_MARK = "\u2581"  # SentencePiece's visible space
# Named tokens a tokenizer_config may declare; image/video_token only in HF's layout.
SPECIAL_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "cls_token",
    "sep_token",
    "image_token",
    "video_token",
)


class TokenizerError(ValueError):
    """Tokenizer files that are missing or inconsistent, or ids outside the vocabulary."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in text before SentencePiece runs."""

    id: int
    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc


def _token_name(value: Any) -> str | None:
    # tokenizer_config stores specials either as "text" or as {"content": "text", ...}.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_from_config(
    config: Mapping[str, Any], added_json: Mapping[str, Any]
) -> list[AddedToken]:
    by_id: dict[int, AddedToken] = {}
    for content, token_id in added_json.items():
        by_id[int(token_id)] = AddedToken(int(token_id), content)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            raise TokenizerError(f"added_tokens_decoder[{key!r}] has no string 'content'")
        by_id[int(key)] = AddedToken(
            int(key),
            entry["content"],
            special=bool(entry.get("special", True)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
        )
    return sorted(by_id.values(), key=lambda t: t.id)


class Tokenizer:
    """Text <-> token ids for ERNIE checkpoints (torch-free, no transformers needed)."""

    def __init__(
        self,
        sp_model: spm.SentencePieceProcessor,
        added_tokens: Iterable[AddedToken] = (),
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ) -> None:
        self._sp = sp_model
        self._num_pieces = sp_model.get_piece_size()
        self._added = {t.id: t for t in added_tokens}
        self._added_by_text = {t.content: t for t in self._added.values()}
        self._piece_bytes = [self._bytes_of_piece(i) for i in range(self._num_pieces)]
        # Longest alternatives first: Python's regex takes the first alternative that
        # matches at the leftmost position, which then is the longest one.
        contents = sorted(self._added_by_text, key=len, reverse=True)
        self._split_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.special_tokens = dict(special_tokens or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.model plus tokenizer_config.json / added_tokens.json from a directory."""
        root = Path(path)
        model_file = root / "tokenizer.model"
        if not model_file.is_file():
            raise TokenizerError(f"{root} has no tokenizer.model")
        sp_model = spm.SentencePieceProcessor()
        try:
            sp_model.load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load {model_file}: {exc}") from exc
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            config = _read_json(root / "tokenizer_config.json")
        added_json: dict[str, Any] = {}
        if (root / "added_tokens.json").is_file():
            added_json = _read_json(root / "added_tokens.json")
        special_map: dict[str, Any] = {}
        if (root / "special_tokens_map.json").is_file():
            special_map = _read_json(root / "special_tokens_map.json")
        specials = {}
        for role in SPECIAL_ROLES:
            name = _token_name(config.get(role)) or _token_name(special_map.get(role))
            if name is not None:
                specials[role] = name
        return cls(
            sp_model,
            _added_from_config(config, added_json),
            special_tokens=specials,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    def _bytes_of_piece(self, token_id: int) -> bytes:
        sp = self._sp
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])  # "<0xAB>"
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""  # decoded through the added-token table when listed there
        return piece.replace(SPACE_MARK, " ").encode("utf-8")

    # -- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids: the SentencePiece pieces plus added tokens beyond them."""
        return max(self._num_pieces, max(self._added, default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token or SentencePiece piece; None when unknown."""
        if token in self._added_by_text:
            return self._added_by_text[token].id
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return int(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The added token or SentencePiece piece for an id."""
        if token_id in self._added:
            return self._added[token_id].content
        if 0 <= token_id < self._num_pieces:
            return str(self._sp.id_to_piece(token_id))
        raise TokenizerError(
            f"token id {token_id} is outside the vocabulary (0..{self.vocab_size})"
        )

    def added_token(self, token_id: int) -> AddedToken | None:
        """The added-token entry for an id, if it has one."""
        return self._added.get(token_id)

    def _special_id(self, role: str) -> int | None:
        name = self.special_tokens.get(role)
        return None if name is None else self.token_to_id(name)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    # -- encode / decode ----------------------------------------------------------------

    def _split(self, text: str) -> list[str | AddedToken]:
        """Text pieces and added tokens, in order, honouring lstrip/rstrip."""
        if self._split_re is None:
            return [text] if text else []
        parts: list[str | AddedToken] = []
        pos = 0
        strip_next = False
        for match in self._split_re.finditer(text):
            token = self._added_by_text[match.group()]
            chunk = text[pos : match.start()]
            if strip_next:
                chunk = chunk.lstrip()
            if token.lstrip:
                chunk = chunk.rstrip()
            if chunk:
                parts.append(chunk)
            parts.append(token)
            strip_next = token.rstrip
            pos = match.end()
        tail = text[pos:].lstrip() if strip_next else text[pos:]
        if tail:
            parts.append(tail)
        return parts

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; added tokens in the text become their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for part in self._split(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            else:
                ids.extend(self._sp.encode(part))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes a non-added token contributes to the decoded text."""
        if not 0 <= token_id < self._num_pieces:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size})"
            )
        return self._piece_bytes[token_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; added tokens appear verbatim unless special and skipped."""
        out: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token = self._added.get(token_id)
            if token is None:
                pending += self.token_bytes(token_id)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if not (skip_special_tokens and token.special):
                out.append(token.content)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)
