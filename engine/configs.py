"""Named model configs: real shapes without a checkpoint, for the `dummy` load format.

`EngineArgs(model=NAME, load_format="dummy")` builds the model of one of these configs with
random weights (`engine.models.build_random_model`) and no tokenizer, so benchmarks can run
at real shapes on a machine that holds no weights (and has no transformers installed).
The dicts are config.json contents in transformers' nested `ernie4_5_vl_moe` spelling.
"""

from __future__ import annotations

import copy
from typing import Any

from engine.tiny import tiny_config

ERNIE_45_VL_28B_A3B: dict[str, Any] = {
    # transformers' `Ernie4_5_VLMoeConfig().to_dict()` (5.23), bookkeeping keys left out.
    "model_type": "ernie4_5_vl_moe",
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
    "text_config": {
        "model_type": "ernie4_5_vl_moe_text",
        "vocab_size": 103424,
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "use_bias": False,
        "moe_intermediate_size": [1536, 512],
        "moe_k": 6,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "moe_norm_min": 1e-12,
        "mlp_layer_types": ["dense"] + ["sparse"] * 27,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "vision_config": {
        "model_type": "ernie4_5_vl_moe_vision",
        "depth": 32,
        "hidden_size": 1280,
        "hidden_act": "quick_gelu",
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_merge_size": 2,
        "intermediate_size": 5120,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
    },
    "image_start_token_id": 101304,
    "image_end_token_id": 101305,
    "image_token_id": 100295,
    "video_start_token_id": 101306,
    "video_end_token_id": 101307,
    "video_token_id": 103367,
    "tie_word_embeddings": True,
}

# The ids engine/tiny.py's tokenizer gives its special tokens (tests check they agree).
TINY_TOKEN_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|end_of_sentence|>": 4,
    "<|IMAGE_START|>": 5,
    "<|IMAGE_END|>": 6,
    "<|VIDEO_START|>": 7,
    "<|VIDEO_END|>": 8,
    "<|IMAGE_PLACEHOLDER|>": 9,
}
TINY_VOCAB_SIZE = 3000

TINY_ERNIE_VL: dict[str, Any] = {
    "model_type": "ernie4_5_vl_moe",
    "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
    **tiny_config(TINY_TOKEN_IDS, TINY_VOCAB_SIZE),
}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    "ernie-4.5-vl-28b-a3b": ERNIE_45_VL_28B_A3B,
    "tiny-ernie-vl": TINY_ERNIE_VL,
}


def named_config(name: str) -> dict[str, Any] | None:
    """A copy of the config called `name` (case-insensitive), or None if none is."""
    found = NAMED_CONFIGS.get(name.lower())
    return None if found is None else copy.deepcopy(found)
