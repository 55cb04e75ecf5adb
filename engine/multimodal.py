"""From token ids plus preprocessed media to what the model runner needs for a prompt.

A prompt reaches the engine already expanded: every image/video is a run of placeholder
ids, as many as the item has language-model tokens. Here each run is matched to its item
(in order), the item's embeddings are computed by the vision tower (or taken from a cache
by content hash), the 3-D positions are laid out, and the rows that go to the vision
experts are marked (placeholders and the image/video start/end markers, as ERNIE trains).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from chat.multimodal import MediaGrid, MediaSpan, position_ids
from engine.config import ModelConfig
from engine.model_runner import MediaSlice
from engine.models.ernie45_vision import num_media_tokens


class PromptError(ValueError):
    """The prompt's placeholders and its media do not agree."""


@dataclass
class MediaInput:
    """One preprocessed image or video."""

    kind: str  # "image" | "video"
    pixel_values: torch.Tensor  # [t*h*w, 3*14*14] flattened patches
    grid: tuple[int, int, int]  # (t, h, w) in patches
    content_hash: str = ""
    embeds: torch.Tensor | None = None  # [n, D] when already encoded (cache hit)


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    positions: torch.Tensor  # [3, T] (VL) or [T] (text)
    delta: int  # position of generated token i is i + delta
    spans: list[MediaSpan] = field(default_factory=list)
    media: list[MediaSlice] = field(default_factory=list)
    vision_rows: torch.Tensor | None = None  # [T] bool

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """Positions of sequence rows `[start, end)`, prompt or generated."""
        if self.positions.dim() == 1:
            return torch.arange(start, end)
        p = self.positions.shape[1]
        head = self.positions[:, start : min(end, p)]
        tail = torch.arange(max(start, p), max(end, p)) + self.delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)


def media_token_ids(cfg: ModelConfig) -> set[int]:
    ids = (
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.image_start_token_id,
        cfg.image_end_token_id,
        cfg.video_start_token_id,
        cfg.video_end_token_id,
    )
    return {i for i in ids if i is not None}


def find_spans(token_ids: list[int], cfg: ModelConfig, media: list[MediaInput]) -> list[MediaSpan]:
    """Match each media item, in order, to its run of placeholder ids."""
    assert cfg.vision is not None
    merge, tmerge = cfg.vision.spatial_merge_size, cfg.vision.temporal_merge_size
    ids = np.asarray(token_ids)
    spans, cursor = [], 0
    for i, item in enumerate(media):
        placeholder = cfg.image_token_id if item.kind == "image" else cfg.video_token_id
        n = num_media_tokens(item.grid, merge, tmerge)
        hits = np.flatnonzero(ids[cursor:] == placeholder)
        if hits.size == 0:
            raise PromptError(f"{item.kind} {i + 1} has no placeholder in the prompt")
        start = cursor + int(hits[0])
        run = ids[start : start + n]
        if run.size < n or not bool((run == placeholder).all()):
            raise PromptError(
                f"{item.kind} {i + 1} needs {n} placeholder tokens at row {start}, "
                f"the prompt has fewer"
            )
        index = sum(1 for m in media[:i] if m.kind == item.kind)
        spans.append(MediaSpan(item.kind, index, start, n, MediaGrid(*item.grid)))
        cursor = start + n
    leftover = np.isin(ids[cursor:], [cfg.image_token_id, cfg.video_token_id]).sum()
    if leftover:
        raise PromptError(f"the prompt has {int(leftover)} placeholder tokens without media")
    return spans


def layout_prompt(
    cfg: ModelConfig, token_ids: list[int], media: list[MediaInput]
) -> PreparedPrompt:
    """Spans, 3-D positions and vision-expert rows of a prompt; no vision tower runs."""
    if not cfg.is_multimodal:
        if media:
            raise PromptError("this model takes text only")
        return PreparedPrompt(token_ids, torch.arange(len(token_ids)), 0)
    spans = find_spans(token_ids, cfg, media)
    v = cfg.vision
    assert v is not None
    positions, delta = position_ids(
        len(token_ids),
        spans,
        spatial_merge_size=v.spatial_merge_size,
        temporal_merge_size=v.temporal_merge_size,
    )
    rows = torch.from_numpy(np.isin(np.asarray(token_ids), list(media_token_ids(cfg))))
    return PreparedPrompt(token_ids, torch.from_numpy(positions), delta, spans, [], rows)


def prepare_prompt(
    model: torch.nn.Module, cfg: ModelConfig, token_ids: list[int], media: list[MediaInput]
) -> PreparedPrompt:
    """`layout_prompt` plus each item's embeddings (encoded now unless already cached)."""
    prompt = layout_prompt(cfg, token_ids, media)
    prompt.media = [
        MediaSlice(span.offset, encode(model, item))
        for span, item in zip(prompt.spans, media, strict=True)
    ]
    return prompt


@torch.inference_mode()
def encode(model: torch.nn.Module, item: MediaInput) -> torch.Tensor:
    if item.embeds is None:
        device = next(model.parameters()).device
        item.embeds = model.encode_media(item.pixel_values.to(device), [item.grid])
    return item.embeds
