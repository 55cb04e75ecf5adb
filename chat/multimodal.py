"""Image/video placeholder expansion and ERNIE-4.5-VL's 3-D rotary positions (numpy only).

After tokenization each media item is one marker token between its start and end
tokens, e.g. `<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>`. Expansion replaces
the marker with one placeholder token per embedding the vision tower will produce:

    image with patch grid (t, h, w):  t*h*w / merge**2            tokens
    video with patch grid (t, h, w):  t*h*w / merge**2 / t_merge  tokens

(merge = 2 spatially, t_merge = 2 in time for ERNIE-4.5-VL). This matches HF's
Ernie4_5_VLMoeProcessor. Markers: the template's `<|image@placeholder|>` /
`<|video@placeholder|>`, or the placeholder token itself when a checkpoint's own
template writes that (HF layout). Checkpoints in Baidu's layout expand videos to the
image placeholder `<|IMAGE_PLACEHOLDER|>` too; HF-converted ones declare a separate
`video_token` in tokenizer_config.json, and we follow whichever the checkpoint says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from chat.tokenizer import Tokenizer

MediaKind = Literal["image", "video"]
TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as in HF


@dataclass(frozen=True)
class MediaTokens:
    """Token ids that frame and fill media spans in a prompt."""

    image_token_id: int
    video_token_id: int
    image_marker_ids: frozenset[int]
    video_marker_ids: frozenset[int]
    image_start_id: int
    image_end_id: int
    video_start_id: int
    video_end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> MediaTokens:
        """Look the tokens up by name (the checkpoint's image_token/video_token if declared)."""
        names = {"image_token": "<|IMAGE_PLACEHOLDER|>", "video_token": "<|IMAGE_PLACEHOLDER|>"}
        names.update({k: v for k, v in tokenizer.special_tokens.items() if k in names})

        def need(name: str) -> int:
            token_id = tokenizer.token_to_id(name)
            if token_id is None:
                raise ValueError(f"tokenizer has no {name!r} token, so it cannot carry media")
            return token_id

        image_id, video_id = need(names["image_token"]), need(names["video_token"])
        image_markers = {image_id}
        video_markers = set() if video_id == image_id else {video_id}
        for name, markers in (
            ("<|image@placeholder|>", image_markers),
            ("<|video@placeholder|>", video_markers),
        ):
            if (marker := tokenizer.token_to_id(name)) is not None:
                markers.add(marker)
        return cls(
            image_token_id=image_id,
            video_token_id=video_id,
            image_marker_ids=frozenset(image_markers),
            video_marker_ids=frozenset(video_markers),
            image_start_id=need("<|IMAGE_START|>"),
            image_end_id=need("<|IMAGE_END|>"),
            video_start_id=need("<|VIDEO_START|>"),
            video_end_id=need("<|VIDEO_END|>"),
        )


@dataclass(frozen=True)
class MediaGrid:
    """Patch grid (t, h, w) of one image or video, as the vision encoder reports it."""

    t: int
    h: int
    w: int

    def num_tokens(
        self, kind: MediaKind, spatial_merge_size: int = 2, temporal_merge_size: int = 2
    ) -> int:
        """Placeholder tokens (= embeddings) this item occupies in the prompt."""
        if min(self.t, self.h, self.w) <= 0:
            raise ValueError(f"{kind} grid must be positive, got {self}")
        t_merge = temporal_merge_size if kind == "video" else 1
        if self.h % spatial_merge_size or self.w % spatial_merge_size or self.t % t_merge:
            raise ValueError(
                f"{kind} grid {self} is not divisible by the merge sizes "
                f"(spatial {spatial_merge_size}, temporal {t_merge})"
            )
        return self.t * self.h * self.w // (spatial_merge_size**2 * t_merge)


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's placeholder tokens sit in the expanded prompt."""

    kind: MediaKind
    index: int  # position among items of the same kind
    offset: int
    length: int
    grid: MediaGrid


@dataclass(frozen=True)
class ExpandedPrompt:
    """Prompt ids with media expanded, per-token modality and per-item spans."""

    token_ids: list[int]
    mm_token_type_ids: list[int]
    spans: list[MediaSpan]


def _as_grids(grids: Sequence[MediaGrid | Sequence[int]]) -> list[MediaGrid]:
    out = []
    for g in grids:
        if isinstance(g, MediaGrid):
            out.append(g)
        elif len(g) == 3:
            out.append(MediaGrid(int(g[0]), int(g[1]), int(g[2])))
        else:
            raise ValueError(f"a media grid is (t, h, w), got {g!r}")
    return out


def expand_media(
    token_ids: Sequence[int],
    tokens: MediaTokens,
    *,
    image_grids: Sequence[MediaGrid | Sequence[int]] = (),
    video_grids: Sequence[MediaGrid | Sequence[int]] = (),
    spatial_merge_size: int = 2,
    temporal_merge_size: int = 2,
) -> ExpandedPrompt:
    """Replace each media marker with its placeholder tokens (grids consumed in order)."""
    grids = {"image": _as_grids(image_grids), "video": _as_grids(video_grids)}
    used = {"image": 0, "video": 0}
    out_ids: list[int] = []
    types: list[int] = []
    spans: list[MediaSpan] = []
    for token_id in token_ids:
        if token_id in tokens.image_marker_ids:
            kind: MediaKind = "image"
        elif token_id in tokens.video_marker_ids:
            kind = "video"
        else:
            out_ids.append(token_id)
            types.append(TEXT)
            continue
        index = used[kind]
        if index >= len(grids[kind]):
            given = len(grids[kind])
            raise ValueError(f"the prompt has more {kind} placeholders than the {given} given")
        grid = grids[kind][index]
        length = grid.num_tokens(kind, spatial_merge_size, temporal_merge_size)
        fill = tokens.image_token_id if kind == "image" else tokens.video_token_id
        spans.append(MediaSpan(kind, index, len(out_ids), length, grid))
        out_ids.extend([fill] * length)
        types.extend([IMAGE if kind == "image" else VIDEO] * length)
        used[kind] += 1
    for name, count in used.items():
        if count != len(grids[name]):
            given = len(grids[name])
            raise ValueError(f"{given} {name}(s) given but the prompt has {count} placeholder(s)")
    return ExpandedPrompt(out_ids, types, spans)


def _vision_positions(
    start: int, grid: MediaGrid, t_merge: int, spatial_merge_size: int
) -> np.ndarray:
    # [3, n]: t, h, w indices of the merged grid in raster order (t slowest), all offset
    # by the position the span starts at.
    llm_t, llm_h, llm_w = (
        grid.t // t_merge,
        grid.h // spatial_merge_size,
        grid.w // spatial_merge_size,
    )
    t, h, w = np.meshgrid(np.arange(llm_t), np.arange(llm_h), np.arange(llm_w), indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()]).astype(np.int64) + start


def position_ids(
    num_tokens: int,
    spans: Sequence[MediaSpan],
    *,
    spatial_merge_size: int = 2,
    temporal_merge_size: int = 2,
) -> tuple[np.ndarray, int]:
    """3-D rotary positions [3, T] (t, h, w) and the delta for decoding (max + 1 - T).

    Text tokens count up by one on all three axes. A media span gets its merged grid's
    (t, h, w) indices offset by the current position, after which the position moves on
    by max(h, w) of the merged grid (not by the span length), as in HF's get_rope_index.
    Tokens generated later sit at index + delta on all three axes.
    """
    positions = np.zeros((3, num_tokens), dtype=np.int64)  # [3, T]
    cursor = 0  # next token index
    current = 0  # next position value
    for span in sorted(spans, key=lambda s: s.offset):
        if span.offset < cursor or span.offset + span.length > num_tokens:
            raise ValueError(
                f"media span {span} overlaps another or lies outside {num_tokens} tokens"
            )
        text_len = span.offset - cursor
        positions[:, cursor : span.offset] = np.arange(current, current + text_len)
        current += text_len
        t_merge = temporal_merge_size if span.kind == "video" else 1
        block = _vision_positions(current, span.grid, t_merge, spatial_merge_size)
        if block.shape[1] != span.length:
            raise ValueError(
                f"media span {span} has {span.length} tokens but its grid gives {block.shape[1]}"
            )
        positions[:, span.offset : span.offset + span.length] = block
        current += max(span.grid.h, span.grid.w) // spatial_merge_size
        cursor = span.offset + span.length
    positions[:, cursor:] = np.arange(current, current + num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
