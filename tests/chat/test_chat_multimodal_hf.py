"""Placeholder expansion and 3-D positions against HF's Ernie4_5_VLMoe processor and model.

HF's processor runs for real on the text side and with its PIL image processor; its
video processor needs torchvision, so a stand-in reports chosen video grids and HF's own
replace_video_token / text-replacement code does the expansion. Positions come from
Ernie4_5_VLMoeModel.get_rope_index on HF's ids and token types.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from chat.multimodal import MediaTokens, expand_media, position_ids
from chat.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (  # noqa: E402
    Ernie4_5_VLMoeImageProcessorPil,
)
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (  # noqa: E402
    Ernie4_5_VLMoeModel,
)

HF_IMAGE = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
HF_VIDEO = "<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>"
CASES = {
    "text_only": ("User: hello there\nAssistant: <think>", [], []),
    "one_image": (f"User: Picture 1:{HF_IMAGE}What is it?\nAssistant: ", [(60, 100)], []),
    "two_images": (f"Picture 1:{HF_IMAGE} vs Picture 2:{HF_IMAGE}", [(100, 60), (500, 300)], []),
    "one_video": (f"User: Video 1:{HF_VIDEO}Describe.", [], [(4, 6, 8)]),
    "mixed": (
        f"Picture 1:{HF_IMAGE}b Video 1:{HF_VIDEO}c{HF_IMAGE}{HF_VIDEO} end",
        [(60, 100), (300, 500)],
        [(4, 6, 8), (2, 4, 4)],
    ),
}


class StandInVideoProcessor:
    """Reports fixed grids; HF's processor only needs merge sizes and video_grid_thw."""

    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, grids: list[tuple[int, int, int]]) -> None:
        self.grids = grids

    def __call__(self, videos, **kwargs):
        return {"video_grid_thw": np.array(self.grids)}


@pytest.fixture(scope="module")
def hf_layout_dir(tokenizer_dir, tmp_path_factory):
    """Our tokenizer converted to HF's layout: a separate <|VIDEO_PLACEHOLDER|> token."""
    import json
    import shutil

    dst = tmp_path_factory.mktemp("hf_layout") / "tok"
    shutil.copytree(tokenizer_dir, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["3000"] = {
        "content": "<|VIDEO_PLACEHOLDER|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    for kind in ("image", "video"):
        placeholder = "<|IMAGE_PLACEHOLDER|>" if kind == "image" else "<|VIDEO_PLACEHOLDER|>"
        config[f"{kind}_token"] = placeholder
        config[f"{kind}_start_token"] = f"<|{kind.upper()}_START|>"
        config[f"{kind}_end_token"] = f"<|{kind.upper()}_END|>"
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def hf_tokenizer(hf_layout_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_layout_dir))


def hf_processor(hf_tokenizer, video_grids):
    # The processor's constructor insists on a real (torchvision) video processor, so we
    # assemble it the way its __init__ would.
    proc = transformers.Ernie4_5_VLMoeProcessor.__new__(transformers.Ernie4_5_VLMoeProcessor)
    proc.tokenizer = hf_tokenizer
    proc.image_processor = Ernie4_5_VLMoeImageProcessorPil()
    proc.video_processor = StandInVideoProcessor(video_grids)
    proc.chat_template = None
    for kind in ("image", "video"):
        for role in ("token", "start_token", "end_token"):
            setattr(proc, f"{kind}_{role}", getattr(hf_tokenizer, f"{kind}_{role}"))
            setattr(proc, f"{kind}_{role}_id", getattr(hf_tokenizer, f"{kind}_{role}_id"))
    return proc


def run_hf(hf_tokenizer, text, image_sizes, video_grids):
    images = [Image.fromarray(np.full((h, w, 3), 128, np.uint8)) for h, w in image_sizes]
    videos = [np.zeros((g[0], 28, 28, 3), np.uint8) for g in video_grids]
    out = hf_processor(hf_tokenizer, video_grids)(
        text=[text], images=images or None, videos=videos or None
    )
    image_grids = out["image_grid_thw"].tolist() if images else []
    return out["input_ids"][0], out["mm_token_type_ids"][0], image_grids


def hf_positions(input_ids, mm_types, image_grids, video_grids):
    config = transformers.Ernie4_5_VLMoeConfig()
    model = types.SimpleNamespace(
        config=config,
        get_vision_position_ids=lambda *a, **k: Ernie4_5_VLMoeModel.get_vision_position_ids(
            None, *a, **k
        ),
    )
    positions, delta = Ernie4_5_VLMoeModel.get_rope_index(
        model,
        torch.tensor([input_ids]),
        torch.tensor([mm_types]),
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None,
    )
    return positions[:, 0].numpy(), int(delta)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("markers", ["template", "hf"])
def test_matches_hf_processor_and_rope(hf_layout_dir, hf_tokenizer, case, markers) -> None:
    text, image_sizes, video_grids = CASES[case]
    hf_ids, hf_types, image_grids = run_hf(hf_tokenizer, text, image_sizes, video_grids)

    ours = Tokenizer.from_dir(hf_layout_dir)
    if markers == "template":  # what our chat template writes
        text = text.replace("<|IMAGE_PLACEHOLDER|>", "<|image@placeholder|>")
        text = text.replace("<|VIDEO_PLACEHOLDER|>", "<|video@placeholder|>")
    expanded = expand_media(
        ours.encode(text),
        MediaTokens.from_tokenizer(ours),
        image_grids=image_grids,
        video_grids=video_grids,
    )
    assert expanded.token_ids == list(hf_ids)
    assert expanded.mm_token_type_ids == list(hf_types)
    assert [s.kind for s in expanded.spans].count("image") == len(image_sizes)

    positions, delta = position_ids(len(expanded.token_ids), expanded.spans)
    hf_pos, hf_delta = hf_positions(hf_ids, hf_types, image_grids, video_grids)
    np.testing.assert_array_equal(positions, hf_pos)
    assert delta == hf_delta
