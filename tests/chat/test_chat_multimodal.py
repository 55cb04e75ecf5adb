from __future__ import annotations

import numpy as np
import pytest

from chat.multimodal import (
    IMAGE,
    TEXT,
    VIDEO,
    MediaGrid,
    MediaTokens,
    expand_media,
    position_ids,
)
from chat.template import render_chat
from chat.tokenizer import Tokenizer

IMG = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
VID = {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}


@pytest.fixture(scope="module")
def media(tokenizer: Tokenizer) -> MediaTokens:
    return MediaTokens.from_tokenizer(tokenizer)


def test_grid_token_counts() -> None:
    assert MediaGrid(1, 8, 4).num_tokens("image") == 8
    assert MediaGrid(4, 6, 8).num_tokens("video") == 24
    assert MediaGrid(2, 4, 4).num_tokens("video", spatial_merge_size=1, temporal_merge_size=1) == 32
    with pytest.raises(ValueError, match="not divisible"):
        MediaGrid(1, 3, 4).num_tokens("image")
    with pytest.raises(ValueError, match="not divisible"):
        MediaGrid(3, 4, 4).num_tokens("video")
    with pytest.raises(ValueError, match="must be positive"):
        MediaGrid(0, 4, 4).num_tokens("image")


def test_baidu_layout_fills_videos_with_the_image_placeholder(
    tokenizer: Tokenizer, media: MediaTokens
) -> None:
    assert media.image_token_id == media.video_token_id == 9
    prompt = render_chat([{"role": "user", "content": [IMG, VID, {"type": "text", "text": "?"}]}])
    ids = tokenizer.encode(prompt)
    out = expand_media(ids, media, image_grids=[(1, 4, 6)], video_grids=[(2, 4, 4)])
    image, video = out.spans
    assert (image.kind, image.length, video.kind, video.length) == ("image", 6, "video", 4)
    assert out.token_ids[image.offset - 1] == tokenizer.token_to_id("<|IMAGE_START|>")
    assert out.token_ids[image.offset + image.length] == tokenizer.token_to_id("<|IMAGE_END|>")
    assert out.token_ids[video.offset - 1] == tokenizer.token_to_id("<|VIDEO_START|>")
    assert set(out.token_ids[video.offset : video.offset + 4]) == {9}
    assert out.mm_token_type_ids[image.offset : image.offset + 6] == [IMAGE] * 6
    assert out.mm_token_type_ids[video.offset : video.offset + 4] == [VIDEO] * 4
    assert out.mm_token_type_ids.count(TEXT) == len(ids) - 2
    assert len(out.token_ids) == len(ids) - 2 + 10
    # text around the media is untouched
    assert tokenizer.decode(out.token_ids[: image.offset]) == tokenizer.decode(
        ids[: ids.index(tokenizer.token_to_id("<|image@placeholder|>"))]
    )


def test_hf_layout_declares_its_own_video_token(tokenizer_variant) -> None:
    path = tokenizer_variant(
        {3000: {"content": "<|VIDEO_PLACEHOLDER|>"}},
        image_token="<|IMAGE_PLACEHOLDER|>",
        video_token="<|VIDEO_PLACEHOLDER|>",
    )
    tok = Tokenizer.from_dir(path)
    media = MediaTokens.from_tokenizer(tok)
    assert media.video_token_id == 3000
    # both the template's marker and the bare placeholder mark a video
    for marker in ("<|video@placeholder|>", "<|VIDEO_PLACEHOLDER|>"):
        ids = tok.encode(f"a<|VIDEO_START|>{marker}<|VIDEO_END|>")
        out = expand_media(ids, media, video_grids=[MediaGrid(2, 2, 2)])
        assert out.token_ids.count(3000) == 1 and out.mm_token_type_ids.count(VIDEO) == 1


def test_count_mismatches_are_errors(tokenizer: Tokenizer, media: MediaTokens) -> None:
    ids = tokenizer.encode(render_chat([{"role": "user", "content": [IMG, IMG]}]))
    with pytest.raises(ValueError, match="more image placeholders than the 1 given"):
        expand_media(ids, media, image_grids=[(1, 2, 2)])
    with pytest.raises(ValueError, match="3 image"):
        expand_media(ids, media, image_grids=[(1, 2, 2)] * 3)
    with pytest.raises(ValueError, match="1 video"):
        expand_media(ids, media, image_grids=[(1, 2, 2)] * 2, video_grids=[(2, 2, 2)])
    with pytest.raises(ValueError, match=r"grid is \(t, h, w\)"):
        expand_media(ids, media, image_grids=[(2, 2), (1, 2, 2)])


def test_missing_media_tokens_are_reported(tokenizer_variant) -> None:
    tok = Tokenizer.from_dir(tokenizer_variant({}, video_token="<|NO_SUCH|>"))
    with pytest.raises(ValueError, match="NO_SUCH"):
        MediaTokens.from_tokenizer(tok)


def test_text_only_positions_count_up() -> None:
    pos, delta = position_ids(5, [])
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 3 and delta == 0


def test_image_positions_by_hand(tokenizer: Tokenizer, media: MediaTokens) -> None:
    # 2 text tokens, a 1x4x6 patch grid (merged 2x3 -> 6 tokens), 2 text tokens
    ids = [100, 101, *tokenizer.encode("<|image@placeholder|>"), 102, 103]
    out = expand_media(ids, media, image_grids=[(1, 4, 6)])
    pos, delta = position_ids(len(out.token_ids), out.spans)
    assert pos.dtype == np.int64 and pos.shape == (3, 10)
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert delta == 7 - 10


def test_video_positions_advance_time(tokenizer: Tokenizer, media: MediaTokens) -> None:
    ids = tokenizer.encode("<|video@placeholder|>")
    out = expand_media(ids, media, video_grids=[(4, 2, 2)])  # 2 merged frames of 1x1
    pos, delta = position_ids(len(out.token_ids), out.spans)
    assert pos.tolist() == [[0, 1], [0, 0], [0, 0]] and delta == 0


def test_inconsistent_spans_are_rejected(tokenizer: Tokenizer, media: MediaTokens) -> None:
    out = expand_media(tokenizer.encode("<|image@placeholder|>"), media, image_grids=[(1, 2, 2)])
    with pytest.raises(ValueError, match="outside"):
        position_ids(0, out.spans)
    with pytest.raises(ValueError, match="overlaps"):
        position_ids(2, [out.spans[0], out.spans[0]])
